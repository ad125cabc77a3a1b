"""A training run's state and what holds it: `RunState` (where the run stands), `Run` (what one process trains
with, and its checkpoint() / restore() pair), `build_run` and `make_loaders`, the checks of a checkpoint that
--resume reads, the run folder (`claim_run_dir`) and the checkpoint a stop saves (`interrupted`). train.py
drives them; TrainConfig stays at the top of train.py, so the functions that need its class take it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import typing
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from all_models import (
    CHECKPOINT_FORMAT,
    Captioner,
    ModelConfig,
    checkpoint_config,
    load_checkpoint,
    save_checkpoint,
    with_packaged_encoder,
)
from feature_cache import build_split_caches
from metrics import CiderD
from pytorch_dataset_class import CaptionDataset, DataInfo, EpochSampler, ImageDataset
from utils import (
    EXIT_BAD_OPTION,
    UserError,
    cut,
    distributed,
    field_type_problem,
    ignore_stop_signals,
    make_autocast,
    rng_state,
    rng_state_problem,
    seed_everything,
    set_rng_state,
    short_repr,
)

if typing.TYPE_CHECKING:
    from train import TrainConfig



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


@dataclass
class Run:
    """What one process trains with. `model` is what gets saved; `train_model` is it, DDP-wrapped under torchrun."""

    cfg: TrainConfig  # train.py's
    model_cfg: ModelConfig
    data: DataInfo
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    model: Captioner
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    autocast: AbstractContextManager
    scaler: torch.amp.GradScaler
    train_model: nn.Module | None = None

    @property
    def ddp(self) -> bool:
        return distributed()

    @property
    def master(self) -> bool:
        return self.rank == 0

    def checkpoint(self, state: RunState) -> dict:
        """Everything --resume needs, as plain data; restore() is its inverse."""
        return {"format_version": CHECKPOINT_FORMAT, "model_config": asdict(self.model_cfg),
                "model_state": self.model.state_dict(), "word_map": dict(self.data.word_map),
                "word_map_sha1": self.data.word_map_sha1, "image_size": self.data.image_size,
                "dataset": self.data.dataset, "train_config": asdict(self.cfg),
                "optimizer_state": self.optimizer.state_dict(), "scheduler_state": self.scheduler.state_dict(),
                "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng_state": rng_state(), **state.state_dict()}

    def restore(self, ckpt: dict) -> RunState:
        """Load what checkpoint() saved. Learning rates and plateau settings given on this command line win."""
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


def load_resume(path: str | os.PathLike, config_class: type) -> dict:
    """A training checkpoint for --resume, every field of its training state checked (one line naming the file).
    `config_class` is train.py's TrainConfig, which the checkpoint's train config must fit."""
    ckpt = load_checkpoint(path, option="--resume")
    missing = [k for k in ("train_config", "optimizer_state", "epoch", "rng_state") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path}: not a training checkpoint (it has no {', '.join(missing)}); "
                        "resume from a run's last.pt")
    problem = resume_state_problem(ckpt, config_class)
    if problem:
        raise UserError(f"--resume {path}: {problem}; resume from a run's last.pt as train.py wrote it")
    return ckpt


HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_ce", "val_bleu4")  # what plot_curves reads
PARTIAL_KEYS = ("loss", "n", "seconds")  # the running sums of an epoch stopped part-way (and the step's statistics)


def resume_state_problem(ckpt: dict, config_class: type) -> str | None:
    """What in a checkpoint's training state is of the wrong type, empty or impossible, or None. The ranges of
    its train config are checked with the options given on the command line on top (TrainConfig.validate)."""
    return (_train_config_problem(ckpt, config_class) or _position_problem(ckpt)
            or _optimizer_problem(ckpt, config_class))


def _train_config_problem(ckpt: dict, config_class: type) -> str | None:
    raw = ckpt["train_config"]
    if not isinstance(raw, dict) or not raw:
        return f"its train_config is not a non-empty dict but {short_repr(raw)}"
    problem = field_type_problem(config_class, raw)
    return f"its train_config: {problem}" if problem else None


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


def _optimizer_problem(ckpt: dict, config_class: type) -> str | None:
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
    known = {f.name for f in dataclasses.fields(config_class)}
    optimizer = make_optimizer(model, config_class(**{k: v for k, v in ckpt["train_config"].items() if k in known}))
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


def make_optimizer(model: Captioner, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with one parameter group for the decoder and, when it is fine-tuned, one for the encoder."""
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": cfg.decoder_lr,
               "name": "decoder"}]
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    if enc:
        groups.append({"params": enc, "lr": cfg.encoder_lr, "name": "encoder"})
    return torch.optim.Adam(groups)


# ----------------------------------------------------------------------------------------------
# Building a run and its loaders, its folder, and stopping it


MODEL_FIELDS = ("encoder", "encoded_size", "fine_tune_encoder", "embed_dim", "attention_dim", "decoder_dim",
                "dropout", "deep_output", "position")


def make_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS})


def build_run(cfg: TrainConfig, data: DataInfo, run_dir: Path, rank: int, world: int, device: torch.device,
              resuming: bool, init: dict | None = None) -> Run:
    """Model, optimizer and schedulers from the seed. The same seed on every rank gives the same weights.
    `init`: the --init-from checkpoint (checked by _train), whose weights the model starts from."""
    model_cfg = make_model_config(cfg, len(data.word_map))
    seed_everything(cfg.seed)
    # Resumed or initialised weights come from a checkpoint: never load pretrained ones for that.
    model = Captioner(model_cfg, encoder_weights="none" if resuming or init is not None else cfg.encoder_weights)
    model = model.to(device)
    if init is not None:  # only fine_tune_encoder may differ: the usual second stage
        src_cfg = dataclasses.replace(model_cfg, fine_tune_encoder=bool(init["model_config"].get("fine_tune_encoder")))
        model.load_state_dict(with_packaged_encoder(src_cfg, init["model_state"]))
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay,
                                                           patience=cfg.lr_patience)
    autocast, scaler = make_autocast(device, cfg.amp)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(cfg, model_cfg, data, run_dir, device, rank, world, model, optimizer, scheduler, autocast, scaler)


@dataclass
class Loaders:
    train: DataLoader
    sampler: EpochSampler
    steps_per_epoch: int
    val: DataLoader | None  # rank 0 validates
    references: list[list[list[str]]]
    train_references: list[list[list[str]]] = field(default_factory=list)  # --scst: each training image's
    cider: CiderD | None = None  # --scst: the reward, with the training references' document frequencies


def make_loaders(run: Run, show: bool) -> Loaders:
    """Cached annotations when asked for (built here by rank 0), else images through the CNN."""
    cfg, folder = run.cfg, run.data.folder
    train_feats = val_feats = None
    if cfg.cache_features:
        train_feats, val_feats = build_split_caches(
            run.model.encoder, folder, run.model_cfg, cfg.encoder_weights, batch_size=cfg.batch_size,
            workers=cfg.workers, autocast=run.autocast, build=run.master, progress=show)
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
        n_val = len(val_ds) if cfg.val_max_images is None else min(cfg.val_max_images, len(val_ds))
        val_loader = DataLoader(Subset(val_ds, range(n_val)), batch_size=cfg.batch_size, shuffle=False,
                                num_workers=cfg.workers, pin_memory=pin,
                                generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=ignore_stop_signals)
        references = val_ds.references()[:n_val]
    loaders = Loaders(loader, sampler, math.ceil(sampler.num_samples / cfg.batch_size), val_loader, references)
    if cfg.scst:
        loaders.train_references = train_ds.references()
        loaders.cider = CiderD(loaders.train_references)
    return loaders


RUN_FILES = ("best.pt", "last.pt", "config.json", "metrics.jsonl")  # a folder holding one of these holds a run
PICTURES = ("curves.png",)  # a run's other output, replaced with its files


def claim_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to write a new run into a folder that holds another run's files, unless --overwrite; then they
    are removed, so that none of them passes for the new run's. --resume continues the run in its own folder."""
    if cfg.resume and Path(cfg.resume).resolve().parent == run_dir.resolve():
        return
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if not cfg.overwrite:
        last = run_dir / "last.pt"
        go_on = f"continue it with --resume {last}, " if "last.pt" in found and not cfg.resume else ""
        raise UserError(f"{run_dir} already holds a run ({', '.join(found)}); {go_on}replace it with --overwrite, "
                        "or start a new one with --run NAME", EXIT_BAD_OPTION)
    for name in RUN_FILES + PICTURES:
        (run_dir / name).unlink(missing_ok=True)
    print(f"--overwrite: removed the files of the run that was in {run_dir} ({', '.join(found)})", flush=True)


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
