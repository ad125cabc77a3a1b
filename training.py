"""What a training run holds and does: `RunState` (where the run stands), `Run` (what one process trains with,
and its checkpoint() / restore() pair), building a run and its loaders, the checks of a checkpoint that --resume
reads, the run folder and its lock, the step, one epoch, validation, the end-of-epoch bookkeeping, stopping on
Ctrl-C or SIGTERM, RNG states, mixed precision and torchrun.

train.py holds `TrainConfig` and the loop that calls these. A module never imports a script, so the functions
here take train.py's TrainConfig as `cfg` (typed `Config`) and read its fields.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import typing
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from all_models import Captioner, ModelConfig, top5_correct
from checkpoints import (
    CHECKPOINT_FORMAT,
    checkpoint_config,
    load_checkpoint,
    save_checkpoint,
    with_packaged_encoder,
)
from cli import EXIT_BAD_OPTION, Terminated, UserError, autocast, cut, pick_amp, pick_device, short_repr
from decoding import decode_words, greedy_decode
from feature_cache import build_split_caches
from files import atomic_path, atomic_write_text, process_alive, writing
from metrics import CiderD, nltk_bleu4
from pytorch_dataset_class import (
    CaptionDataset,
    DataInfo,
    EpochSampler,
    ImageDataset,
    ignore_stop_signals,
    open_data,
    to_model_input,
)
from scst import scst_loss
from tensorboard_log import TENSORBOARD_DIR, TensorBoardLog, val_samples

Config = typing.Any  # train.py's TrainConfig


# ----------------------------------------------------------------------------------------------
# The run: where it stands, and what one process trains with


@dataclass
class RunState:
    """Where a run stands. `state_dict` and `from_checkpoint` are the one save/restore pair (the keys are
    those of every checkpoint train.py has written)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch (> 0 only when stopped mid-epoch)
    partial: dict | None = None  # the current epoch's running loss sums when stopped mid-epoch
    best_score: float = float("-inf")  # the best val score so far (BLEU-4; CIDEr-D with --scst)
    best_epoch: int = 0  # the epoch that reached it
    since_best: int = 0  # epochs since then (early stopping counts these)
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch, as in metrics.jsonl

    KEYS: typing.ClassVar[dict[str, str]] = {
        "epoch": "epoch", "step": "step_in_epoch", "partial": "partial_epoch", "best_score": "best_score",
        "best_epoch": "best_epoch", "since_best": "epochs_since_improvement", "history": "history"}

    def state_dict(self) -> dict:
        return {key: copy.deepcopy(getattr(self, name)) for name, key in self.KEYS.items()}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        get = {name: ckpt.get(key) for name, key in cls.KEYS.items()}
        return cls(epoch=int(get["epoch"]), step=int(get["step"] or 0), partial=get["partial"],
                   best_score=float(get["best_score"] if get["best_score"] is not None else float("-inf")),
                   best_epoch=int(get["best_epoch"] or 0), since_best=int(get["since_best"] or 0),
                   history=[dict(h) for h in get["history"] or []])


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


@dataclass
class Run:
    """What one process trains with. `model` is what gets saved; `train_model` is it, DDP-wrapped under torchrun."""

    cfg: Config  # train.py's
    model_cfg: ModelConfig
    data: DataInfo
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    model: Captioner
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    autocast: AbstractContextManager  # the training step's and validation's
    scaler: torch.amp.GradScaler
    cache_autocast: AbstractContextManager  # the feature cache's CNN
    train_model: nn.Module | None = None
    tb: TensorBoardLog | None = None  # rank 0 with --tensorboard
    ema: WeightAverage | None = None  # with --ema-decay

    @property
    def eval_model(self) -> Captioner:
        """What validation scores and checkpoints' model_state hold: the weight average, if any, else the model."""
        return self.ema.model if self.ema is not None else self.model

    @property
    def ddp(self) -> bool:
        return distributed()

    @property
    def master(self) -> bool:
        return self.rank == 0

    def checkpoint(self, state: RunState) -> dict:
        """Everything --resume needs, as plain data; restore() is its inverse."""
        averaged = {"trained_state": self.model.state_dict(), "ema_updates": self.ema.updates} if self.ema else {}
        return {"format_version": CHECKPOINT_FORMAT, "model_config": asdict(self.model_cfg),
                "model_state": self.eval_model.state_dict(), **averaged, "word_map": dict(self.data.word_map),
                "word_map_sha1": self.data.word_map_sha1, "image_size": self.data.image_size,
                "dataset": self.data.dataset, "train_config": asdict(self.cfg),
                "optimizer_state": self.optimizer.state_dict(), "scheduler_state": self.scheduler.state_dict(),
                "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng_state": rng_state(), **state.state_dict()}

    def restore(self, ckpt: dict) -> RunState:
        """Load what checkpoint() saved. Learning rates and plateau settings given on this command line win."""
        if self.ema is not None:
            self.model.load_state_dict(ckpt["trained_state"])
            self.ema.model.load_state_dict(ckpt["model_state"])
            self.ema.updates = ckpt["ema_updates"]
        else:
            self.model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        for group in self.optimizer.param_groups:  # a rate given on this command line replaces the saved one
            option = "encoder_lr" if group.get("name") == "encoder" else "decoder_lr"
            if ckpt["train_config"].get(option) != getattr(self.cfg, option):
                group["lr"] = getattr(self.cfg, option)
        if ckpt.get("scheduler_state"):
            self.scheduler.load_state_dict(ckpt["scheduler_state"])
        self.scheduler.factor, self.scheduler.patience = self.cfg.lr_decay, self.cfg.lr_patience
        if ckpt.get("scaler_state") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler_state"])
        state = RunState.from_checkpoint(ckpt)
        set_rng_state(ckpt["rng_state"])  # exact for one process; under torchrun these are rank 0's
        if self.ddp and self.rank > 0:
            torch.manual_seed(self.cfg.seed + 1009 * self.rank + 100_003 * state.epoch + state.step)  # own dropout
        return state

    def save(self, state: RunState, *names: str) -> None:
        """Write the checkpoint under each name, in order (rank 0 only)."""
        if self.master:
            ck = self.checkpoint(state)
            for name in names:
                save_checkpoint(self.run_dir / name, ck)


# ----------------------------------------------------------------------------------------------
# Building a run: model, optimizer, schedulers, loaders


def make_optimizer(model: Captioner, decoder_lr: float, encoder_lr: float) -> torch.optim.Adam:
    """Adam with one parameter group for the decoder and, when it is fine-tuned, one for the encoder."""
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": decoder_lr,
               "name": "decoder"}]
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    if enc:
        groups.append({"params": enc, "lr": encoder_lr, "name": "encoder"})
    # fused: one pass over each parameter instead of a dozen small operations; the released decoder's 10.2M
    # parameters take 6-7 ms a step on 2 CPU threads against 28-29 for the loop. The CPU and CUDA have it.
    return torch.optim.Adam(groups, fused=next(model.parameters()).device.type in ("cpu", "cuda"))


MODEL_FIELDS = ("encoder", "encoded_size", "fine_tune_encoder", "embed_dim", "attention_dim", "decoder_dim",
                "dropout", "annotation_dropout", "deep_output", "position")


def make_model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS})


def build_run(cfg: Config, data: DataInfo, run_dir: Path, rank: int, world: int, device: torch.device,
              resuming: bool, init: dict | None = None) -> Run:
    """Model, optimizer and schedulers from the seed. The same seed on every rank gives the same weights.
    `init`: the --init-from checkpoint (checked by _train), whose weights the model starts from."""
    model_cfg = make_model_config(cfg, len(data.word_map))
    seed_everything(cfg.seed)
    # Resumed or initialised weights come from a checkpoint: never load pretrained ones for that.
    weights = "none" if resuming or init is not None else cfg.encoder_weights
    try:
        model = Captioner(model_cfg, encoder_weights=weights)
    except ValueError as err:  # encoder weights that do not load (no download, no such file): one line
        raise UserError(str(err)) from None
    model = model.to(device)
    if init is not None:  # only fine_tune_encoder may differ: the usual second stage
        src_cfg = dataclasses.replace(model_cfg, fine_tune_encoder=bool(init["model_config"].get("fine_tune_encoder")))
        model.load_state_dict(with_packaged_encoder(src_cfg, init["model_state"]))
    optimizer = make_optimizer(model, cfg.decoder_lr, cfg.encoder_lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay,
                                                           patience=cfg.lr_patience)
    autocast_ctx, scaler, cache_autocast = make_autocast(device, cfg.amp, say=rank == 0, cache=cfg.cache_features)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run = Run(cfg, model_cfg, data, run_dir, device, rank, world, model, optimizer, scheduler, autocast_ctx, scaler,
              cache_autocast)
    if cfg.ema_decay > 0:
        run.ema = WeightAverage(model, cfg.ema_decay)  # (an --init-from model is its start)
    return run


@dataclass
class Loaders:
    train: DataLoader
    sampler: EpochSampler
    steps_per_epoch: int
    val: DataLoader | None  # rank 0 validates
    references: list[list[list[str]]]
    train_references: list[list[list[str]]] = field(default_factory=list)  # --scst: each training image's
    cider: CiderD | None = None  # --scst: the reward, with the training references' document frequencies


VAL_BATCH_CACHED = 64  # photos a validation batch holds when the annotations come from the feature cache


def make_loaders(run: Run, show: bool) -> Loaders:
    """Cached annotations when asked for (built here by rank 0), else images through the CNN."""
    cfg, folder = run.cfg, run.data.folder
    train_feats = val_feats = None
    if cfg.cache_features:
        train_feats, val_feats = build_split_caches(
            run.model.encoder, folder, run.model_cfg, cfg.encoder_weights, batch_size=cfg.batch_size,
            workers=cfg.workers, autocast=run.cache_autocast, build=run.master, progress=show)
        if run.ddp:
            dist.barrier()
    dataset_class = ImageDataset if cfg.group_captions or cfg.scst else CaptionDataset  # --scst: images
    train_ds = dataset_class(folder / "train.h5", feature_path=train_feats)
    sampler = EpochSampler(train_ds, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed)
    # Own generators: making a DataLoader iterator draws a seed for its workers, which must not come from
    # the global RNG (dropout's), or a run resumed mid-epoch would see other dropout masks.
    pin = run.device.type == "cuda"
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=pin, persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=ignore_stop_signals)
    val_loader, references = None, []
    if run.master:
        val_ds = ImageDataset(folder / "val.h5", feature_path=val_feats)
        if cfg.val_max_images is not None and cfg.val_max_images > len(val_ds):  # before the run writes a file
            raise UserError(f"--val-max-images {cfg.val_max_images}: the val split of --data {folder} holds "
                            f"{len(val_ds)} images (pass at most {len(val_ds)}, or none for all)", EXIT_BAD_OPTION)
        n_val = len(val_ds) if cfg.val_max_images is None else cfg.val_max_images
        # Cached annotations are small, and decoding many photos at once shares each step's fixed costs: 64
        # photos a batch validated Flickr8k's 1,000 in 20 s against 25-30 s at 16 (greedy captions the same).
        val_batch = max(cfg.batch_size, VAL_BATCH_CACHED) if cfg.cache_features else cfg.batch_size
        val_loader = DataLoader(Subset(val_ds, range(n_val)), batch_size=val_batch, shuffle=False,
                                num_workers=cfg.workers, pin_memory=pin,
                                generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=ignore_stop_signals)
        references = val_ds.references()[:n_val]
    loaders = Loaders(loader, sampler, math.ceil(sampler.num_samples / cfg.batch_size), val_loader, references)
    if cfg.scst:
        loaders.train_references = train_ds.references()
        loaders.cider = CiderD(loaders.train_references)
    return loaders


def start_run(cfg: Config, data: DataInfo, run_dir: Path, ckpt: dict | None, init: dict | None, rank: int,
              world: int, device: torch.device, show: bool) -> tuple[Run, RunState, Loaders]:
    """The run, its state and its loaders, once its folder is settled (by rank 0): from `ckpt` when resuming, from
    `init`'s weights with --init-from. Its files are written once the model and the data are ready: a run that
    fails before (weights that do not download, a feature cache that cannot be built) leaves no config.json that
    would pass for a run."""
    run = build_run(cfg, data, run_dir, rank, world, device, resuming=ckpt is not None, init=init)
    state = run.restore(ckpt) if ckpt is not None else RunState()
    if ckpt is not None and run.master:
        where = f"epoch {state.epoch + 1}, step {state.step + 1}" if state.step else f"epoch {state.epoch + 1}"
        print(f"resuming {cfg.resume} at {where}, writing into {run_dir}", flush=True)
    if run.ddp and ckpt is None:
        torch.manual_seed(cfg.seed + rank)  # different dropout masks on each rank
    loaders = make_loaders(run, show)
    if cfg.compile:
        compile_model(run.model)
    run.train_model = DDP(run.model, device_ids=[device.index] if device.type == "cuda" else None) if run.ddp \
        else run.model
    if run.master:
        atomic_write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        write_metrics(run_dir, state.history)
        if state.epoch >= cfg.epochs:
            print(f"nothing to do: {state.epoch} epochs already trained (pass --epochs N with N > {state.epoch} to "
                  "go on)")
        if cfg.tensorboard:  # last: a run that fails to start leaves no event file (train.py closes the writer)
            run.tb = TensorBoardLog(run_dir / TENSORBOARD_DIR, loaders.steps_per_epoch, state.epoch, state.step,
                                    val_samples(loaders.val.dataset, run.data.folder / "val.h5", loaders.references),
                                    run.data.word_map, cfg.max_decode_len, run.autocast)
    return run, state, loaders


# ----------------------------------------------------------------------------------------------
# Resuming: the checks of the checkpoint that --resume reads


def load_resume(path: str | os.PathLike) -> dict:
    """A training checkpoint for --resume, every field of its training state checked (one line naming the file).
    train.py checks its train config's fields against TrainConfig."""
    ckpt = load_checkpoint(path, option="--resume")
    missing = [k for k in ("train_config", "optimizer_state", "epoch", "rng_state") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path}: not a training checkpoint (it has no {', '.join(missing)}); "
                        "resume from a run's last.pt")
    raw = ckpt["train_config"]
    problem = None if isinstance(raw, dict) and raw else \
        f"its train_config is not a non-empty dict but {short_repr(raw)}"
    problem = problem or _position_problem(ckpt) or _average_problem(ckpt) or _optimizer_problem(ckpt)
    if problem:
        raise UserError(f"--resume {path}: {problem}; {RESUME_FIX}")
    return ckpt


RESUME_FIX = "resume from a run's last.pt as train.py wrote it"
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_ce", "val_bleu4")  # what plot_curves reads
PARTIAL_KEYS = ("loss", "n", "seconds")  # the running sums of an epoch stopped part-way (and the step's statistics)


def _position_problem(ckpt: dict) -> str | None:
    """The epoch, step, best score, history and the sums of a stopped epoch."""
    for key in ("epoch", "step_in_epoch", "best_epoch", "epochs_since_improvement"):
        value = ckpt.get(key)
        if (value is not None or key == "epoch") and (type(value) is not int or value < 0):
            return f"its {key} must be an integer >= 0, got {short_repr(value)}"
    best = ckpt.get("best_score")
    if best is not None and (type(best) not in (int, float) or math.isnan(best)):
        return f"its best_score must be a number, got {short_repr(best)}"

    def numbers(d: object, keys: tuple[str, ...]) -> bool:
        return isinstance(d, dict) and all(type(d.get(k)) in (int, float) for k in keys)

    history, partial = ckpt.get("history") or [], ckpt.get("partial_epoch")
    if not isinstance(history, list) or not all(numbers(h, HISTORY_KEYS) for h in history):
        return f"its history must be a list of per-epoch metrics ({', '.join(HISTORY_KEYS)})"
    if partial is not None and not (numbers(partial, PARTIAL_KEYS) and numbers(partial, tuple(partial))):
        return f"its partial_epoch must be the running sums of a stopped epoch, got {short_repr(partial)}"
    return None


def _average_problem(ckpt: dict) -> str | None:
    """With --ema-decay, model_state is the weight average: the trained weights and the count of updates too."""
    if not ckpt["train_config"].get("ema_decay"):
        return None
    updates, trained = ckpt.get("ema_updates"), ckpt.get("trained_state")
    if type(updates) is not int or updates < 0:
        return f"its ema_updates must be an integer >= 0, got {short_repr(updates)}"
    if not isinstance(trained, dict) or set(trained) != set(ckpt["model_state"]):
        return "its trained_state (the weights --ema-decay averages) is missing or does not fit its model_state"
    return None


def _optimizer_problem(ckpt: dict) -> str | None:
    """The RNG states, tried; the optimizer and scheduler states, loaded into a model built on the meta device
    (no memory), as Run.restore will load them into the real one."""
    problem = rng_state_problem(ckpt["rng_state"])
    if problem:
        return f"its rng_state cannot be restored ({problem})"
    for key in ("scheduler_state", "scaler_state"):
        if not isinstance(ckpt.get(key), (dict, type(None))):
            return f"its {key} must be a dict, got {short_repr(ckpt.get(key))}"
    with torch.device("meta"):
        model = Captioner(checkpoint_config(ckpt))
    optimizer = make_optimizer(model, 1.0, 1.0)  # its groups are what matters: load_state_dict sets the rates
    try:
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        scheduler.load_state_dict(ckpt.get("scheduler_state") or {})
        scheduler.step(0.0)  # reads the fields that the epochs to come read
    except Exception as err:  # KeyError, ValueError, TypeError...: torch checks little and says it in many ways
        return (f"its optimizer or scheduler state does not fit its model ({type(err).__name__}: "
                f"{cut(str(err), 120)})")
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if name != "step" and not (isinstance(value, torch.Tensor) and value.shape == p.shape):
                    return f"its optimizer_state's {name} of a {tuple(p.shape)} weight is {short_repr(value)}"
    return None


# ----------------------------------------------------------------------------------------------
# The run folder: claimed by one run, locked while it trains


def check_options_fit(cfg: Config, data: DataInfo, ckpt: dict | None) -> None:
    """Refuse (one line, exit 2) before anything is written an option that cannot mean what it says with this
    data or this resumed run, rather than train on something else than it records. (--val-max-images is checked
    against the val split where make_loaders opens it.)"""
    if cfg.captions_per_image > data.captions_per_image:
        n = data.captions_per_image
        raise UserError(f"--captions-per-image {cfg.captions_per_image}: the images of --data {data.folder} have {n} "
                        f"captions each (pass at most {n}, or 0 for all)", EXIT_BAD_OPTION)
    if ckpt is None:
        return
    saved = ckpt["train_config"]
    done = int(ckpt["epoch"])
    if cfg.epochs < done:
        raise UserError(f"--epochs {cfg.epochs}: the run in {cfg.resume} has already trained {done} epochs (pass "
                        f"--epochs N with N > {done} to go on)", EXIT_BAD_OPTION)
    if bool(cfg.ema_decay) != bool(saved.get("ema_decay")):
        was = "with" if saved.get("ema_decay") else "without"
        raise UserError(f"--ema-decay {cfg.ema_decay}: the run in {cfg.resume} was trained {was} a weight average; "
                        f"resume it {was} one, or start a new run from it with --init-from {cfg.resume}",
                        EXIT_BAD_OPTION)
    before = saved.get("lr_schedule", "plateau")
    if cfg.lr_schedule != before:
        # cosine leaves its rates where its curve was (near 0 at its end): another schedule would go on from there
        raise UserError(f"--lr-schedule {cfg.lr_schedule}: the run in {cfg.resume} was trained with {before}, which "
                        f"set its learning rates; resume it with {before}, or start a new run from it with "
                        f"--init-from {cfg.resume}", EXIT_BAD_OPTION)


RUN_FILES = ("best.pt", "last.pt", "config.json", "metrics.jsonl")  # a folder holding one of these holds a run
PICTURES = ("curves.png",)  # a run's other output, replaced with its files


def claim_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to write a new run into a folder that holds another run's files, unless --overwrite; then they
    are removed, so that none of them passes for the new run's. --resume continues the run in its own folder.

    The refusal never advises deleting a run the user did not name: --overwrite is offered only for a folder
    named with --run, and never to a resumed run (which would delete one run to continue another)."""
    if cfg.resume and Path(cfg.resume).resolve().parent == run_dir.resolve():
        return
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if not cfg.overwrite:
        files = ", ".join(found)
        if cfg.resume:
            raise UserError(f"{run_dir} already holds another run ({files}); resume {cfg.resume} in its own folder "
                            "(leave out --run and --out-dir) or in a new one (--run NAME)", EXIT_BAD_OPTION)
        last = run_dir / "last.pt"
        go_on = f"continue it with --resume {last}, or " if "last.pt" in found else ""
        replace = ", or delete its files and start over there with --overwrite" if cfg.run else ""
        raise UserError(f"{run_dir} already holds a run ({files}); {go_on}start a new one with --run NAME{replace}",
                        EXIT_BAD_OPTION)
    for name in RUN_FILES + PICTURES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)  # --tensorboard's event files
    print(f"--overwrite: removed the files of the run that was in {run_dir} ({', '.join(found)})", flush=True)


LOCK_NAME = ".lock"


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when it is gone, or not written yet."""
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _refuse_or_clear(lock: Path, what: str, host: str) -> None:
    """Someone else's lock: a UserError while its process runs; removed when the process is gone."""
    owner = _lock_owner(lock)
    if owner is None:  # created an instant ago and not written yet, or just removed: look again
        time.sleep(0.01)
        return
    pid, owner_host = owner
    if owner_host != host or process_alive(pid):
        where = "" if owner_host == host else f" on {owner_host}"
        raise UserError(f"{lock.parent}: the {what} is in use by another process (pid {pid}{where}, lock file "
                        f"{lock}); wait for it to end, or remove {lock} if no process uses the folder")
    print(f"{Path(sys.argv[0]).name}: taking over the stale lock {lock} of pid {pid}, which is no longer running",
          file=sys.stderr, flush=True)
    if _lock_owner(lock) == owner:  # not taken over by another process meanwhile
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Own `folder` while the block runs: `folder/.lock` holds this process's pid and host.

    The lock is created with O_CREAT | O_EXCL, so of two processes only one gets it; the other gets a
    UserError naming the owner. A lock whose process is gone (killed by SIGKILL, a machine that lost power)
    is stale: it is taken over, with one line on stderr. The lock of a process on another host cannot be
    checked and counts as held. The lock is removed when the block ends, however it ends.
    """
    folder = Path(folder)
    lock = folder / LOCK_NAME
    host = socket.gethostname()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{folder}: cannot create the {what} ({err.strerror or err})") from None
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_or_clear(lock, what, host)
            continue
        except OSError as err:
            raise UserError(f"{folder}: cannot write in the {what} ({err.strerror or err})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
        break
    else:
        raise UserError(f"{lock}: an unreadable lock file; remove it if no process uses {folder}")
    try:
        yield lock
    finally:
        if _lock_owner(lock) == (os.getpid(), host):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


# ----------------------------------------------------------------------------------------------
# The step


class NonFiniteLoss(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(f"loss is {value}")
        self.value = value


def train_step(model: nn.Module, x: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
               optimizer: torch.optim.Optimizer, *, alpha_c: float, label_smoothing: float = 0.0,
               grad_clip: float = 0.0, scaler: torch.amp.GradScaler | None = None,
               autocast: AbstractContextManager | None = None,
               any_bad: typing.Callable[[bool], bool] | None = None) -> dict[str, float]:
    """One optimisation step. x: images (B, 3, S, S) or cached annotations (B, P, D); captions (B, L) and
    lengths (B,), or (B, C, L) and (B, C) for C captions per image.

    Raises NonFiniteLoss before touching the weights when the loss is NaN or infinite. Under DDP,
    `any_bad(bad)` says whether any process has a bad loss, so that all of them stop together.
    """
    with autocast or nullcontext():
        tf = model(x, captions, lengths)  # logits (M, V) for the batch's M real tokens
    loss, ce, dsr = tf.loss(alpha_c, label_smoothing)
    value = optimize(loss, optimizer, grad_clip=grad_clip, scaler=scaler, any_bad=any_bad)
    return {"loss": value, "ce": ce.item(), "dsr": dsr.item()}


def optimize(loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, grad_clip: float = 0.0,
             scaler: torch.amp.GradScaler | None = None,
             any_bad: typing.Callable[[bool], bool] | None = None) -> float:
    """Backward and one optimizer step (GradScaler under fp16, gradient clipping); returns the loss's value.
    Raises NonFiniteLoss before touching the weights when the loss is NaN or infinite."""
    value = loss.item()
    bad = not math.isfinite(value)
    if any_bad(bad) if any_bad is not None else bad:
        raise NonFiniteLoss(value)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            _clip(optimizer, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip > 0:
            _clip(optimizer, grad_clip)
        optimizer.step()
    return value


def _clip(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def set_cosine_lr(optimizer: torch.optim.Optimizer, cfg: Config, progress: float) -> None:
    """Cosine decay from each group's configured learning rate at progress 0 to 0 at progress 1. It
    depends on the position in the run alone, so a resumed run continues the same curve."""
    factor = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = factor * (cfg.encoder_lr if group.get("name") == "encoder" else cfg.decoder_lr)


def pick_captions(caps: torch.Tensor, lengths: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k of each image's C captions, at random: caps (B, C, L), lengths (B, C) -> (B, k, L), (B, k). The draw has
    its own generator, seeded by the step's position, so the global RNG (dropout's) is untouched and a resumed run
    draws the same captions."""
    B, C, L = caps.shape
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(B, C, generator=g).argsort(dim=1)[:, :k].to(caps.device)  # (B, k)
    return caps.gather(1, pick.unsqueeze(2).expand(B, k, L)), lengths.gather(1, pick)


# ----------------------------------------------------------------------------------------------
# One epoch, validation and the end of an epoch


SCORE = {False: "val_bleu4", True: "val_cider"}  # the val score that selects best.pt, by cfg.scst
SCORE_NAME = {False: "val BLEU-4", True: "val CIDEr-D"}


def train_epoch(run: Run, loaders: Loaders, state: RunState, stop: StopFlag, show: bool) -> dict:
    """One epoch from `state.step` on: returns its loss sums {"loss", "ce", "dsr", "n", "seconds", "images_per_s"}.
    On Ctrl-C or SIGTERM it saves last.pt after the current step and raises Interrupted."""
    cfg, steps = run.cfg, loaders.steps_per_epoch
    sync = RankSync(stop, run.device) if run.ddp else None  # under torchrun, every rank stops at the same step
    loaders.sampler.set_epoch(state.epoch)
    loaders.sampler.skip = state.step * cfg.batch_size
    keys = ("loss", "reward", "baseline") if cfg.scst else ("loss", "ce", "dsr")  # what a step reports
    if cfg.scst and cfg.scst_ce_weight > 0:
        keys += ("ce",)
    if cfg.scst and cfg.scst_entropy_weight > 0:
        keys += ("entropy",)
    stats = dict(state.partial) if state.partial else {**dict.fromkeys(keys, 0.0), "n": 0, "seconds": 0.0}
    # SCST samples from the policy it follows: eval mode, and any dropout is scst_loss's, the same masks in both passes.
    run.train_model.train(not cfg.scst)
    # disable=None: tqdm draws bars on a terminal only, so a log file holds the epoch lines alone.
    bar = tqdm(_batches(loaders.train, run.device), total=steps, initial=state.step, disable=None if show else True,
               desc=f"epoch {state.epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
    t0, n0 = time.perf_counter(), stats["n"]
    if run.tb is not None:
        run.tb.start_window(stats)
    for step, (x, caps, lens, index) in enumerate(bar, start=state.step + 1):
        if cfg.lr_schedule == "cosine":
            set_cosine_lr(run.optimizer, cfg, (state.epoch * steps + step - 1) / (cfg.epochs * steps))
        if 0 < cfg.captions_per_image < caps.size(1) and not cfg.scst:
            caps, lens = pick_captions(caps, lens, cfg.captions_per_image, cfg.seed + 1_000_003 * state.epoch + step)
        try:
            if cfg.scst:
                loss, out = scst_loss(run.train_model, run.model, x, [loaders.train_references[i] for i in index],
                                      loaders.cider, run.data.word_map, samples=cfg.scst_samples,
                                      baseline=cfg.scst_baseline, max_len=cfg.max_decode_len,
                                      dropout=cfg.scst_dropout, ce_weight=cfg.scst_ce_weight, captions=caps,
                                      lengths=lens, alpha_c=cfg.alpha_c, label_smoothing=cfg.label_smoothing,
                                      bleu_weight=cfg.scst_bleu_weight, entropy_weight=cfg.scst_entropy_weight,
                                      autocast=run.autocast)
                out["loss"] = optimize(loss, run.optimizer, grad_clip=cfg.grad_clip, scaler=run.scaler,
                                       any_bad=sync.any_bad if sync else None)
            else:
                out = train_step(run.train_model, x, caps, lens, run.optimizer, alpha_c=cfg.alpha_c,
                                 label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip, scaler=run.scaler,
                                 autocast=run.autocast, any_bad=sync.any_bad if sync else None)
        except NonFiniteLoss as err:
            last = run.run_dir / "last.pt"
            kept = f"; the last good checkpoint {last} is untouched" if last.exists() else ""
            raise UserError(f"{err} at epoch {state.epoch + 1} step {step}: training stopped{kept} (try a lower "
                            "learning rate, --grad-clip or --amp off)") from None
        if run.ema is not None:
            run.ema.update(run.model)
        b = x.size(0) * cfg.scst_samples if cfg.scst else lens.numel()  # captions in this step
        for k in keys:
            stats[k] += out[k] * b
        stats["n"] += b
        if step % cfg.log_every == 0 or step == steps:
            speed = (stats["n"] - n0) * run.world / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{stats['loss'] / stats['n']:.4f}", img_s=f"{speed:.0f}")
            if run.tb is not None:
                run.tb.train_step(state.epoch, step, stats, run.optimizer)
        if sync.stop if sync else stop.requested:
            stats["seconds"] += time.perf_counter() - t0
            bar.close()
            state.step = step
            raise interrupted(run, state, stats, steps, stop.signum)
    bar.close()
    seconds = time.perf_counter() - t0
    stats["seconds"] += seconds
    stats["images_per_s"] = (stats["n"] - n0) * run.world / max(seconds, 1e-9)
    stats["t_val"] = time.perf_counter()
    return stats


def _batches(loader: DataLoader, device: torch.device):
    """(x, captions, lengths, image indices or None) on the device; ImageDataset items carry the indices."""
    for x, caps, lens, *index in loader:
        yield (to_model_input(x, device), caps.to(device, non_blocking=True),
               lens.to(device, non_blocking=True), index[0].tolist() if index else None)


@torch.no_grad()
def validate(model: Captioner, loader: DataLoader, references: list[list[list[str]]], word_map: dict[str, int], *,
             alpha_c: float, max_decode_len: int, autocast: AbstractContextManager | None = None,
             stop: StopFlag | None = None, progress: bool = True) -> dict[str, float]:
    """Teacher-forced loss and top-5 accuracy on every caption, BLEU-4 and CIDEr-D of one greedy caption per image.

    `loader` yields ImageDataset batches (x (B, ...), captions (B, cpi, L), lengths (B, cpi), index (B,))
    in order, `references[i]` are the raw reference token lists of the loader's i-th image. BLEU-4 is
    nltk's corpus_bleu of the decoded words (no `<start>`, `<end>`, `<pad>`) against them, CIDEr-D their mean
    CIDEr-D with document frequencies from these references (as pycocoevalcap's on a split).
    """
    model.eval()
    device = next(model.parameters()).device
    rev = {i: w for w, i in word_map.items()}
    loss_sum = ce_sum = 0.0
    n_caps = correct = tokens = 0
    hypotheses: list[list[str]] = []
    for x, caps, lens, _ in tqdm(loader, desc="validate", leave=False, disable=None if progress else True,
                                 dynamic_ncols=True):
        if stop is not None and stop.requested:
            raise StopInValidation
        x = to_model_input(x, device)  # (B, 3, S, S) or (B, P, D) float32
        B, cpi, _ = caps.shape
        caps, lens = caps.to(device), lens.to(device)  # (B, cpi, L), (B, cpi)
        with autocast or nullcontext():
            a = model.annotations(x)  # (B, P, D)
            tf = model.decoder(a, caps, lens)  # B * cpi captions, M real tokens
        loss, ce, _ = tf.loss(alpha_c)
        loss_sum += loss.item() * B * cpi
        ce_sum += ce.item() * B * cpi
        n_caps += B * cpi
        correct, tokens = correct + top5_correct(tf.logits, tf.targets), tokens + len(tf.targets)
        with autocast or nullcontext():
            decoded = greedy_decode(model.decoder, a, word_map, max_decode_len)
        hypotheses += [decode_words(d.tokens, rev) for d in decoded]
    refs = references[: len(hypotheses)]
    bleu4 = nltk_bleu4(refs, hypotheses) if hypotheses else 0.0
    cider = float(CiderD(refs).scores(hypotheses, refs).mean()) if hypotheses else 0.0
    return {"val_loss": loss_sum / max(n_caps, 1), "val_ce": ce_sum / max(n_caps, 1),
            "val_top5": correct / max(tokens, 1), "val_bleu4": float(bleu4), "val_cider": cider,
            "val_images": len(hypotheses)}


def validate_epoch(run: Run, loaders: Loaders, stop: StopFlag, show: bool) -> dict:
    """validate() on rank 0, its result broadcast to the other ranks (the scheduler and the stop rule need it);
    {"interrupted": True} when Ctrl-C or SIGTERM came during validation."""
    result: dict = {}
    if run.master:
        try:
            result = validate(run.eval_model, loaders.val, loaders.references, run.data.word_map,
                              alpha_c=run.cfg.alpha_c, max_decode_len=run.cfg.max_decode_len, autocast=run.autocast,
                              stop=stop, progress=show)
        except StopInValidation:
            result = {"interrupted": True}
    if run.ddp:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


class StopInValidation(Exception):
    """Ctrl-C or SIGTERM arrived during validate(): train.py saves the epoch's end and stops."""


def end_epoch(run: Run, state: RunState, stats: dict, result: dict) -> bool:
    """Bookkeeping after validation: best score, plateau schedule, metrics line, checkpoints. True = stop early."""
    cfg = run.cfg
    keys = [k for k in stats if k not in ("n", "seconds", "images_per_s", "t_val")]  # a step's statistics
    *sums, n_seen = all_reduce_sum([stats[k] for k in keys] + [stats["n"]], run.device)
    score = result[SCORE[cfg.scst]]
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.since_best = score, state.epoch + 1, 0
    else:
        state.since_best += 1
    if cfg.lr_schedule == "plateau":
        run.scheduler.step(score)
    state.epoch, state.step, state.partial = state.epoch + 1, 0, None
    groups = run.optimizer.param_groups
    m = {"epoch": state.epoch, **{f"train_{k}": v / max(n_seen, 1) for k, v in zip(keys, sums)},
         **{k: v for k, v in result.items() if k != "val_images"},
         "lr_decoder": groups[0]["lr"], "lr_encoder": groups[1]["lr"] if len(groups) > 1 else 0.0,
         "images_per_s": stats["images_per_s"], "seconds": stats["seconds"] + time.perf_counter() - stats["t_val"],
         "best": improved}
    state.history.append(m)
    # best.pt first: a kill between the two saves then never leaves last.pt ahead of a best epoch whose
    # best.pt was not written.
    run.save(state, *(("best.pt", "last.pt") if improved else ("last.pt",)))
    if run.master:
        write_metrics(run.run_dir, state.history)
        plot_curves(state.history, run.run_dir / "curves.png")
        print(_epoch_line(m, cfg.epochs, cfg.scst), flush=True)
        if run.tb is not None:
            run.tb.end_epoch(m, run.eval_model)
    if state.since_best >= cfg.early_stop:
        if run.master:
            print(f"early stop: no new best {SCORE_NAME[cfg.scst]} for {state.since_best} epochs", flush=True)
        return True
    return False


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl, one line per epoch of `history`: rewritten whole and atomically each epoch, not appended, so
    that a full disk or a kill never leaves it truncated or empty (it is a few KB even after hundreds of epochs)."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _epoch_line(m: dict, epochs: int, scst: bool) -> str:
    train = (f"reward {m['train_reward']:.4f} (baseline {m['train_baseline']:.4f})" if scst
             else f"train {m['train_loss']:.4f} (ce {m['train_ce']:.4f})")
    return (f"epoch {m['epoch']}/{epochs}  {train}  val {m['val_loss']:.4f} (ce {m['val_ce']:.4f})  "
            f"top5 {100 * m['val_top5']:.1f}%  BLEU-4 {m['val_bleu4']:.4f}  CIDEr-D {m['val_cider']:.4f}"
            f"{' *best*' if m['best'] else ''}  lr {m['lr_decoder']:.2e}  {m['images_per_s']:.0f} img/s  "
            f"{m['seconds']:.0f} s")


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Loss and val BLEU-4 per epoch of a training run's history as a PNG, replaced atomically."""
    import matplotlib  # here: only a training run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss (teacher-forced)")
    if all("train_ce" in h for h in history):  # not under --scst, whose training loss is the policy's
        ax1.plot(epochs, [h["train_ce"] for h in history], "--", label="train cross-entropy")
    ax1.plot(epochs, [h["val_ce"] for h in history], "--", label="val cross-entropy")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_bleu4"] for h in history], "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val BLEU-4 (greedy)")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp, writing(path):
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


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


def interrupted(run: Run, state: RunState, stats: dict, steps_per_epoch: int, signum: int | None) -> Interrupted:
    """Save the state after the last completed step (state.step) and say how to go on. `signum`: the signal that
    stopped this process (None: another rank's, under torchrun)."""
    stats = {k: v for k, v in stats.items() if k not in ("images_per_s", "t_val")}
    run.save(dataclasses.replace(state, partial=stats), "last.pt")
    last = run.run_dir / "last.pt"
    prog = "torchrun --nproc_per_node=N train.py" if run.ddp else "python train.py"
    how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    return Interrupted(f"train.py: {how} in epoch {state.epoch + 1} after step {state.step}/{steps_per_epoch}; "
                       f"saved {last}; continue with: {prog} --resume {last}",
                       code=128 + (signum or signal.SIGINT))


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
# Mixed precision, torch.compile and torchrun


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


def compile_model(model: Captioner) -> None:
    """torch.compile the hot paths in place: the CNN and the recurrent part of the decoder's step.

    Not the whole model: the teacher-forced loop drops finished captions from the batch, so one graph
    of the unrolled loop would fit one pattern of caption lengths and recompile for nearly every batch.
    The compiled functions live in instance attributes, so state_dict() keeps its plain keys.
    """
    model.encoder.cnn.forward = torch.compile(model.encoder.cnn.forward)
    model.decoder.advance = torch.compile(model.decoder.advance, dynamic=True)  # the batch shrinks step by step


def distributed() -> bool:
    """True inside a process group (train.py under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK; without it this is a single process."""
    from datetime import timedelta

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


class RankSync:
    """Under torchrun all ranks must stop at the same step: once per step, before the backward pass, one
    all_reduce tells every rank whether any has a NaN/inf loss and whether any was asked to stop."""

    def __init__(self, stop: StopFlag, device: torch.device) -> None:
        self.flag, self.device, self.stop = stop, device, False

    def any_bad(self, bad: bool) -> bool:
        t = torch.tensor([float(bad), float(self.flag.requested)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.stop = bool(t[1])
        return bool(t[0])


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums of `values` over all ranks (the values themselves in a single process)."""
    if not distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# Does a device compute like the CPU? (train.py --check-device DEV, check_device.py DEV)


CHECK_STEPS = 3  # identical Adam steps on cpu and on the checked device
CHECK_RTOL = 1e-3  # largest difference allowed, relative to the largest |loss| or |gradient|


def check_device(cfg: Config, device_name: str, steps: int = CHECK_STEPS, rtol: float = CHECK_RTOL) -> bool:
    """Run `steps` identical Adam steps on cpu and on `device_name` from the same weights and batch
    and print the largest differences of loss and gradients per step.

    Returns True when every difference is within `rtol` of the largest |loss| / |gradient|.
    """
    device = pick_device(device_name)
    data = open_data(cfg.data)
    seed_everything(cfg.seed)
    model_cfg = dataclasses.replace(make_model_config(cfg, len(data.word_map)), dropout=0.0)
    try:
        cpu_model = Captioner(model_cfg, encoder_weights=cfg.encoder_weights)
    except ValueError as err:  # encoder weights that do not load (no download, no such file): one line
        raise UserError(str(err)) from None
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
            opt = make_optimizer(m, cfg.decoder_lr, cfg.encoder_lr)
            per_step = []
            x_dev, caps_dev, lens_dev = to_model_input(x, dev), caps.to(dev), lens.to(dev)
            for _ in range(steps):
                tf = m(x_dev, caps_dev, lens_dev)
                loss, _, _ = tf.loss(cfg.alpha_c)
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
