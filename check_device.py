"""Does a device compute like the CPU? A few identical training steps on both, compared.

    python check_device.py mps --data data/processed/shapes --encoder smallcnn
    python check_device.py cuda:1                  # any train.py option sets the model and the batch

The same weights and the same first batch of the training split go through `steps` Adam steps on the
CPU and on DEV (dropout off, float32, no TF32). Each step prints the loss on both and the largest
difference of any gradient; the exit status is 1 when a difference exceeds the tolerance (relative
to the largest |loss| or |gradient|), so a script can refuse to train on a device whose kernels are
wrong, as some MPS releases were.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch.utils.data import DataLoader

from all_models import Captioner, compute_loss
from pytorch_dataset_class import CaptionDataset, open_data, to_model_input
from run_state import make_model_config, make_optimizer
from train import TrainConfig, build_parser
from utils import EXIT_BAD_INPUT, UserError, pick_device, run_cli, seed_everything

STEPS = 3  # identical Adam steps on cpu and on the checked device
RTOL = 1e-3  # largest difference allowed, relative to the largest |loss| or |gradient|


def check_device(cfg: TrainConfig, device_name: str, steps: int = STEPS, rtol: float = RTOL) -> bool:
    """Run `steps` identical Adam steps on cpu and on `device_name` from the same weights and batch
    and print the largest differences of loss and gradients per step.

    Returns True when every difference is within `rtol` of the largest |loss| / |gradient|.
    """
    cfg.validate()
    device = pick_device(device_name)
    data = open_data(cfg.data)
    seed_everything(cfg.seed)
    model_cfg = dataclasses.replace(make_model_config(cfg, len(data.word_map)), dropout=0.0)
    cpu_model = Captioner(model_cfg, encoder_weights=cfg.encoder_weights)
    dev_model = copy.deepcopy(cpu_model).to(device)
    ds = CaptionDataset(data.folder / "train.h5")
    x, caps, lens = next(iter(DataLoader(ds, batch_size=min(cfg.batch_size, len(ds)), shuffle=False)))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    print(f"check-device: {steps} Adam steps on cpu and {device} "
          f"(encoder {cfg.encoder}, batch {len(caps)}, dropout 0, float32)")
    try:
        runs = []
        for m, dev in ((cpu_model, torch.device("cpu")), (dev_model, device)):
            m.train()
            opt = make_optimizer(m, cfg)
            per_step = []
            x_dev, caps_dev, lens_dev = to_model_input(x, dev), caps.to(dev), lens.to(dev)
            for _ in range(steps):
                logits, alphas = m(x_dev, caps_dev, lens_dev)  # (B, T, V), (B, T, P)
                loss, _, _ = compute_loss(logits, alphas, caps_dev, lens_dev, cfg.alpha_c)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grads = {n: p.grad.detach().cpu().double() for n, p in m.named_parameters() if p.grad is not None}
                per_step.append((loss.item(), grads))
                opt.step()
            runs.append(per_step)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    ok = True
    for i, ((l_cpu, g_cpu), (l_dev, g_dev)) in enumerate(zip(*runs), start=1):
        d_loss = abs(l_cpu - l_dev)
        g_max = max((g.abs().max().item() for g in g_cpu.values()), default=0.0)
        d_grad = max(((g_cpu[n] - g_dev[n]).abs().max().item() for n in g_cpu), default=0.0)
        finite = math.isfinite(l_dev) and all(bool(torch.isfinite(g).all()) for g in g_dev.values())
        good = finite and d_loss <= rtol * max(abs(l_cpu), 1e-12) and d_grad <= rtol * max(g_max, 1e-12)
        ok &= good
        print(f"step {i}: loss cpu {l_cpu:.6f} {device} {l_dev:.6f} (|diff| {d_loss:.2e})  "
              f"gradients: max |diff| {d_grad:.2e} of max |grad| {g_max:.2e}  {'ok' if good else 'DISAGREE'}")
    print(f"check-device: cpu and {device} {'agree' if ok else 'disagree'} (tolerance {rtol:g} relative)")
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.prog = "check_device.py"
    parser.add_argument("dev", metavar="DEV", help="the device to compare with the CPU: cuda, cuda:N, mps or cpu")
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if not check_device(cfg, args.dev):
        raise UserError(f"{args.dev}: the device disagrees with the CPU (see above); do not train on it",
                        EXIT_BAD_INPUT)


if __name__ == "__main__":
    run_cli(main)
