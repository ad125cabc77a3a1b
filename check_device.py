"""Does a device compute like the CPU? A few identical training steps on both, compared.

    python check_device.py mps --data data/processed/shapes --encoder smallcnn
    python check_device.py cuda:1                  # any train.py option sets the model and the batch

The same weights and the same first batch of the training split go through a few Adam steps on the CPU
and on DEV (dropout off, float32, no TF32). Each step prints the loss on both and the largest difference
of any gradient; the exit status is 1 when a difference exceeds the tolerance (relative to the largest
|loss| or |gradient|), so a script can refuse to train on a device whose kernels are wrong, as some MPS
releases were.

This is `python train.py --check-device DEV [train.py's options]`: the options are train.py's, so it runs
train.py (the check itself is runtime.check_device, on the model and batch run_start.check_device_for builds).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cli import EXIT_BAD_OPTION, UserError, run_cli

TRAIN = Path(__file__).resolve().parent / "train.py"
DEVICE = re.compile(r"cpu|mps|auto|cuda(:\S*)?")  # train.py says which of them is not a device here


def train_argv(argv: list[str]) -> list[str] | None:
    """check_device.py's arguments as train.py's: DEV, the one device name not given to --device, becomes
    --check-device DEV, the others are passed on as they are; None when there is not exactly one DEV."""
    devs = [i for i, a in enumerate(argv) if DEVICE.fullmatch(a) and (i == 0 or argv[i - 1] != "--device")]
    if len(devs) != 1:
        return None
    i = devs[0]
    return ["--check-device", argv[i], *argv[:i], *argv[i + 1:]]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return
    args = train_argv(argv)
    if args is None:
        raise UserError(f"name one device to compare with the cpu (cpu, mps, cuda or cuda:N), got "
                        f"{' '.join(argv) or 'none'} (see --help)", EXIT_BAD_OPTION)
    # A few steps: the output is passed on when train.py ends, its lines in this script's name.
    proc = subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(re.sub(r"(?m)^train\.py: ", "check_device.py: ", proc.stderr))
    if proc.returncode:
        sys.exit(proc.returncode)


if __name__ == "__main__":
    run_cli(main)
