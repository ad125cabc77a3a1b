"""What one torchrun process of train.py ends with, for tests/test_train.py's two-process test.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py OUT [train.py options]

Runs train.py's main() unchanged in each process and, when training ends, writes OUT.rank<N>.json:
the world size, the captions this rank trained on, and a sha1 and sum of its parameters. The counting
and the dump wrap train.py's functions from outside, so train.py carries no test hook.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402
import training  # noqa: E402
from training import Run  # noqa: E402

OUT = sys.argv[1]
seen = {"captions": 0}
runs: list[Run] = []
_step, _build, _train = training.train_step, training.build_run, train.train


def counting_step(model, x, captions, lengths, *args, **kwargs):
    seen["captions"] += lengths.numel()
    return _step(model, x, captions, lengths, *args, **kwargs)


def keeping_build(*args, **kwargs) -> Run:
    runs.append(_build(*args, **kwargs))
    return runs[-1]


def dumping_train(*args, **kwargs):
    result = _train(*args, **kwargs)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # set by torchrun
    flat = torch.cat([p.detach().cpu().float().flatten() for p in runs[-1].model.parameters()])
    Path(f"{OUT}.rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": world, "sha1": hashlib.sha1(flat.numpy().tobytes()).hexdigest(),
        "sum": float(flat.double().sum()), "samples": seen["captions"]}))
    return result


training.train_step, training.build_run, train.train = counting_step, keeping_build, dumping_train

if __name__ == "__main__":
    train.main(sys.argv[2:])
