"""Where a training run executes: its precision on the device, torchrun, the stop signals, the RNG states,
torch.compile, and the device check (train.py --check-device, check_device.py).

The device itself is cli.pick_device's choice and each precision cli.pick_amp's: this module applies them to a run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from all_models import Captioner
from cli import EXIT_BAD_OPTION, Terminated, UserError, autocast, pick_amp, pick_device, short_repr
from optim import Rates, make_optimizer
from pytorch_dataset_class import to_model_input

# ----------------------------------------------------------------------------------------------
# Precision and torch.compile


def make_autocast(device: torch.device, amp: str, say: bool = False,
                  cache: bool = False) -> tuple[AbstractContextManager, torch.amp.GradScaler, AbstractContextManager]:
    """(the training step's autocast context, its GradScaler, the feature cache's autocast context) for `--amp`
    (cli.pick_amp chooses each dtype; `say`: print the choice in one line, the cache's too when `cache`); fp16
    needs the scaler. The weights, the optimizer's state and the checkpoints stay float32; the loss is computed in
    float32."""
    dtype, note = pick_amp(device, amp, "train")
    cache_dtype, cache_note = pick_amp(device, amp, "encode")
    if say:
        print(f"precision: {note}" + (f"; feature cache: {cache_note}" if cache and cache_dtype != dtype else ""),
              flush=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16 and device.type == "cuda")
    return autocast(device, dtype), scaler, autocast(device, cache_dtype)


def allow_tf32(device: torch.device) -> None:
    """CUDA's float32 matrix products and convolutions in TF32 (a run's, never the device check's)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def check_compile(device: torch.device) -> None:
    """Refuse --compile on a CPU (one line, exit 2): there it was measured 13x slower than without (a tiny run took
    243 s against 18 s), with a page of torch's warnings, as the decoder step recompiled until torch's limit."""
    if device.type == "cpu":
        raise UserError("--compile: on a CPU torch.compile makes training slower, not faster (the decoder step "
                        "recompiles for batch after batch); leave it out (--no-compile, for a resumed run that has "
                        "it), or train on a GPU", EXIT_BAD_OPTION)


def compile_model(model: Captioner) -> None:
    """torch.compile the hot paths in place: the CNN and the recurrent part of the decoder's step.

    Not the whole model: the teacher-forced loop drops finished captions from the batch, so one graph
    of the unrolled loop would fit one pattern of caption lengths and recompile for nearly every batch.
    The compiled functions live in instance attributes, so state_dict() keeps its plain keys.
    """
    model.encoder.cnn.forward = torch.compile(model.encoder.cnn.forward)
    model.decoder.advance = torch.compile(model.decoder.advance, dynamic=True)  # the batch shrinks step by step


# ----------------------------------------------------------------------------------------------
# torchrun


def distributed() -> bool:
    """True inside a process group (train.py under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK; without it this is a single process."""
    device = pick_device(device_name)
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"--device {device_name}: torchrun runs on cuda (nccl) or cpu (gloo)", EXIT_BAD_OPTION)
    # Rank 0 validates and builds feature caches while the others wait: allow that to take long.
    dist.init_process_group(backend, timeout=timedelta(hours=3))
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def torchrun(device_name: str) -> Iterator[tuple[int, int, torch.device]]:
    """setup_distributed's (rank, world_size, device) for the block; a process group ends with it."""
    rank, world, device = setup_distributed(device_name)
    try:
        yield rank, world, device
    finally:
        if distributed():
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums of `values` over all ranks (the values themselves in a single process)."""
    if not distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(value: object) -> object:
    """Rank 0's `value` on every rank (the value itself in a single process)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# Stopping: Ctrl-C and SIGTERM


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill, a job scheduler's time limit, docker stop


class StopFlag:
    """The first SIGINT or SIGTERM asks the training loop to stop after the current step (it then saves
    last.pt); a second one of either kind raises KeyboardInterrupt (Terminated for SIGTERM) at once.
    `signum` is the first signal's number. Only installed in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signum = signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\ntrain.py: {what}: stopping after this step and saving last.pt (Ctrl-C or SIGTERM again quits "
              "without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)


class RankSync:
    """Whether to stop after this step, the same answer on every rank. Under torchrun all ranks must stop at the
    same step: once per step, before the backward pass, one all_reduce tells every rank whether any has a NaN/inf
    loss and whether any was asked to stop. A single process reads its own StopFlag."""

    def __init__(self, flag: StopFlag, device: torch.device) -> None:
        self.flag, self.device, self._any_stop = flag, device, False

    def any_bad(self, bad: bool) -> bool:
        """Whether any rank's loss is bad (optim.optimize asks before it touches the weights)."""
        if not distributed():
            return bad
        t = torch.tensor([float(bad), float(self.flag.requested)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self._any_stop = bool(t[1])
        return bool(t[0])

    @property
    def stop(self) -> bool:
        return self._any_stop if distributed() else self.flag.requested


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving; the message says how to resume. `code` is the exit
    status: 128 + the signal's number, as a shell reports a process that a signal ended (130, 143)."""

    def __init__(self, message: str, code: int = 130) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------
# Seeds and RNG states


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG that training draws from, as plain tensors and numbers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    """The inverse of rng_state()."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


def rng_state_problem(state: object) -> str | None:
    """What keeps set_rng_state(state) from working (a checkpoint's saved RNGs), or None. It is tried on
    this process's CPU RNGs, which are put back; CUDA's states need only be a list of byte tensors."""
    if not isinstance(state, dict) or not state:
        return f"not a dict of RNG states but {short_repr(state)}"
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                                for t in cuda)):
        return "its cuda states are not a list of byte tensors"
    saved = {**rng_state(), "cuda": None}
    try:
        set_rng_state({**state, "cuda": None})
    except Exception as err:  # whatever torch, numpy or random raise about a malformed state
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'malformed'}"
    finally:
        set_rng_state(saved)
    return None


# ----------------------------------------------------------------------------------------------
# Does a device compute like the CPU? (train.py --check-device DEV, check_device.py DEV)


CHECK_STEPS = 3  # identical Adam steps on cpu and on the checked device
CHECK_RTOL = 1e-3  # largest difference allowed, relative to the largest |loss| or |gradient|


def check_device(model: Captioner, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], device: torch.device, *,
                 rates: Rates, alpha_c: float, steps: int = CHECK_STEPS, rtol: float = CHECK_RTOL) -> bool:
    """Run `steps` identical Adam steps of `model` (on the cpu) on the cpu and on `device`, from the same weights
    and `batch` (images, captions, lengths), and print the largest differences of loss and gradients per step.

    Returns True when every difference is within `rtol` of the largest |loss| / |gradient|.
    """
    cpu_model, dev_model = model, copy.deepcopy(model).to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare float32 with float32
    print(f"check-device: {steps} Adam steps on cpu and {device} "
          f"(encoder {model.config.encoder}, batch {len(batch[1])}, dropout 0, float32)")
    try:
        runs = [_adam_steps(m, batch, dev, rates, alpha_c, steps)
                for m, dev in ((cpu_model, torch.device("cpu")), (dev_model, device))]
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


def _adam_steps(model: Captioner, batch: tuple[torch.Tensor, ...], device: torch.device, rates: Rates,
                alpha_c: float, steps: int) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """(loss, {parameter name: gradient in float64 on the cpu}) of each of `steps` Adam steps on `device`."""
    model.train()
    optimizer = make_optimizer(model, rates.decoder, rates.encoder)
    x, caps, lens = to_model_input(batch[0], device), batch[1].to(device), batch[2].to(device)
    per_step = []
    for _ in range(steps):
        loss, _, _ = model(x, caps, lens).loss(alpha_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.detach().cpu().double() for n, p in model.named_parameters() if p.grad is not None}
        per_step.append((loss.item(), grads))
        optimizer.step()
    return per_step
