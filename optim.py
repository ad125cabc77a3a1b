"""The optimisation of a run: Adam with named parameter groups, the learning-rate schedules, the one `optimize` path
(backward, clipping, the step, the fp16 GradScaler) and the moving average of the weights (--ema-decay).

The groups are named "decoder" and, when the encoder is fine-tuned, "encoder"; `is_encoder` is the one place that
tells them apart.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from all_models import Captioner

ENCODER, DECODER = "encoder", "decoder"  # the parameter groups' names


class Rates(NamedTuple):
    """Learning rates, one per parameter group."""

    decoder: float  # --decoder-lr
    encoder: float  # --encoder-lr (a fine-tuned encoder's)

    def of(self, group: dict) -> float:
        """The rate of an optimizer's parameter group."""
        return self.encoder if is_encoder(group) else self.decoder

    @classmethod
    def now(cls, optimizer: torch.optim.Optimizer) -> Rates:
        """The rates the optimizer steps with now (0 for an encoder it does not train)."""
        rates = {is_encoder(group): group["lr"] for group in optimizer.param_groups}
        return cls(decoder=rates[False], encoder=rates.get(True, 0.0))


def is_encoder(group: dict) -> bool:
    """Whether an optimizer's parameter group is the encoder's (every other group is the decoder's)."""
    return group.get("name") == ENCODER


def make_optimizer(model: Captioner, decoder_lr: float, encoder_lr: float) -> torch.optim.Adam:
    """Adam with one parameter group for the decoder and, when it is fine-tuned, one for the encoder."""
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": decoder_lr,
               "name": DECODER}]
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    if enc:
        groups.append({"params": enc, "lr": encoder_lr, "name": ENCODER})
    # fused: one pass over each parameter instead of a dozen small operations; the released decoder's 10.2M
    # parameters take 6-7 ms a step on 2 CPU threads against 28-29 for the loop. The CPU and CUDA have it.
    return torch.optim.Adam(groups, fused=next(model.parameters()).device.type in ("cpu", "cuda"))


def take_new_rates(optimizer: torch.optim.Optimizer, saved: Rates, given: Rates) -> None:
    """After loading a saved optimizer state: a rate given on this command line (other than the saved run's
    option) replaces the one the state carries."""
    for group in optimizer.param_groups:
        if saved.of(group) != given.of(group):
            group["lr"] = given.of(group)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules


LR_SCHEDULES = ("plateau", "cosine", "constant")


class Schedule:
    """--lr-schedule constant: the rates the options set, all run long. The other schedules change what they
    need of it."""

    def at_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Before step `step` (from 1) of epoch `epoch` (from 0)."""

    def end_epoch(self, score: float) -> None:
        """After an epoch's validation, with its val score (higher is better)."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class Cosine(Schedule):
    """Cosine decay from each group's configured rate at the run's first step to 0 at its end. It depends on the
    position in the run alone, so a resumed run continues the same curve (and saves no state)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rates: Rates, epochs: int) -> None:
        self.optimizer, self.rates, self.epochs = optimizer, rates, epochs

    def at_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        progress = (epoch * steps_per_epoch + step - 1) / (self.epochs * steps_per_epoch)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        for group in self.optimizer.param_groups:
            group["lr"] = factor * self.rates.of(group)


class Plateau(Schedule):
    """Multiply the rates by `decay` after `patience` epochs without a new best val score."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay: float, patience: int) -> None:
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=decay,
                                                                    patience=patience)

    def end_epoch(self, score: float) -> None:
        self.scheduler.step(score)

    def state_dict(self) -> dict | None:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """The saved state (its best score, its count of bad epochs); the decay and the patience given now win."""
        factor, patience = self.scheduler.factor, self.scheduler.patience
        if state:
            self.scheduler.load_state_dict(state)
        self.scheduler.factor, self.scheduler.patience = factor, patience


def make_schedule(name: str, optimizer: torch.optim.Optimizer, rates: Rates, *, epochs: int, decay: float,
                  patience: int) -> Schedule:
    """--lr-schedule `name`: plateau, cosine or constant."""
    if name == "plateau":
        return Plateau(optimizer, decay, patience)
    if name == "cosine":
        return Cosine(optimizer, rates, epochs)
    return Schedule()


# ----------------------------------------------------------------------------------------------
# The step


class NonFiniteLoss(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(f"loss is {value}")
        self.value = value


def optimize(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, grad_clip: float = 0.0,
             scaler: torch.amp.GradScaler | None = None, any_bad: Callable[[bool], bool] | None = None) -> float:
    """Backward and one optimizer step, with gradient clipping when grad_clip > 0; returns the loss's value.

    One path for every precision: a disabled GradScaler (float32, bf16) passes the loss and the step through, an
    enabled one (fp16) scales the loss and unscales the gradients before clipping. Raises NonFiniteLoss before
    touching the weights when the loss is NaN or infinite; under torchrun `any_bad(bad)` says whether any
    process's loss is, so that all of them stop together.
    """
    value = loss.item()
    bad = not math.isfinite(value)
    if any_bad(bad) if any_bad is not None else bad:
        raise NonFiniteLoss(value)
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return value


# ----------------------------------------------------------------------------------------------
# Weight averaging


class WeightAverage:
    """An exponential moving average of a model's weights (--ema-decay d): after the n-th optimizer step,
    avg <- r * avg + (1 - r) * w with r = min(d, (1 + n) / (10 + n)), so that the first steps follow the weights
    instead of dragging the random start along. Buffers (BatchNorm statistics) are copied as they are.

    Averaging the weights of the last few thousand steps smooths the noise of the steps around where the run
    ends up; validation, best.pt and last.pt's model_state (what evaluate.py and inference.py read) are the
    average, and last.pt keeps the trained weights too for --resume."""

    def __init__(self, model: Captioner, decay: float) -> None:
        self.model = copy.deepcopy(model).eval()  # (the same device and dtype)
        self.model.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: Captioner) -> None:
        self.updates += 1
        rate = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = [(a, w) for a, w in zip(self.model.parameters(), model.parameters(), strict=True) if w.requires_grad]
        if pairs:  # a frozen weight equals its average already
            averages, weights = zip(*pairs, strict=True)
            torch._foreach_lerp_(list(averages), list(weights), 1.0 - rate)
        for a, w in zip(self.model.buffers(), model.buffers(), strict=True):
            a.copy_(w)
