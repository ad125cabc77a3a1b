"""One training run: where it stands (`RunState`), what one process trains with (`Run`, with its checkpoint() /
restore() pair), an epoch's running sums, validation, and the end of an epoch (best score, schedule, metrics line,
checkpoints). run_start.py checks what a run starts from and builds it; train.py holds the options and the loop.

A module never imports a script: the run reads train.py's TrainConfig as `TrainOptions`, a Protocol that names the
fields it reads, with their types.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from all_models import Captioner, ModelConfig, top5_correct
from checkpoints import CHECKPOINT_FORMAT, save_checkpoint
from cli import UserError
from decoding import greedy_decode
from metrics import CiderD, nltk_bleu4
from optim import NonFiniteLoss, Rates, Schedule, WeightAverage, optimize, take_new_rates
from pytorch_dataset_class import DataInfo, EpochSampler, Vocab, to_model_input
from run_folder import plot_curves, write_metrics
from runtime import Interrupted, RankSync, StopFlag, all_reduce_sum, broadcast, distributed, rng_state, set_rng_state
from scst import Batch, Objective
from tensorboard_log import TensorBoardLog


class TrainOptions(Protocol):
    """The fields of train.py's TrainConfig that a run reads (their help is there)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # a dataclass: checkpoints save it whole with asdict()
    data: str
    resume: str
    init_from: str
    encoder: str
    encoder_weights: str
    encoded_size: int
    embed_dim: int
    attention_dim: int
    decoder_dim: int
    dropout: float
    deep_output: bool
    position: str
    attention: str
    fine_tune_encoder: bool
    epochs: int
    batch_size: int
    group_captions: bool
    captions_per_image: int
    workers: int
    encoder_lr: float
    decoder_lr: float
    grad_clip: float
    alpha_c: float
    hard_expected_p: float
    hard_entropy_weight: float
    label_smoothing: float
    ema_decay: float
    lr_schedule: str
    lr_decay: float
    lr_patience: int
    early_stop: int
    max_decode_len: int
    val_max_images: int | None
    seed: int
    amp: str
    compile: bool
    cache_features: bool
    scst: bool
    scst_samples: int
    scst_baseline: str
    scst_dropout: bool
    scst_ce_weight: float
    tensorboard: bool


SCORE = {False: "val_bleu4", True: "val_cider"}  # the val score that selects best.pt, by --scst
SCORE_NAME = {False: "val BLEU-4", True: "val CIDEr-D"}


def dsr_weight(cfg: TrainOptions) -> float:
    """The doubly stochastic term's weight: --alpha-c with soft attention; none with hard attention, as in the paper
    (section 4.2.1 regularizes soft attention) and in the authors' code (its REINFORCE gradient of alpha replaces
    the term's)."""
    return cfg.alpha_c if cfg.attention == "soft" else 0.0


# ----------------------------------------------------------------------------------------------
# Where a run stands, and an epoch's running sums


@dataclass
class RunState:
    """Where a run stands. `state_dict` and `from_checkpoint` are the one save/restore pair (the keys are
    those of every checkpoint train.py has written)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch (> 0 only when stopped mid-epoch)
    partial: dict | None = None  # the current epoch's running sums when stopped mid-epoch (EpochSums.partial)
    best_score: float = float("-inf")  # the best val score so far (BLEU-4; CIDEr-D with --scst)
    best_epoch: int = 0  # the epoch that reached it
    since_best: int = 0  # epochs since then (early stopping counts these)
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch, as in metrics.jsonl

    KEYS: ClassVar[dict[str, str]] = {
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


class EpochSums:
    """An epoch's running sums: `totals` holds each step statistic (the objective's keys) times its step's
    captions, "n" the captions and "seconds" the time spent training. A checkpoint of an epoch stopped part-way
    saves them, and the resumed epoch goes on from them."""

    def __init__(self, keys: tuple[str, ...], partial: dict | None, world: int) -> None:
        partial = partial or {}
        self.keys, self.world = keys, world
        self.totals = {**{k: partial.get(k, 0.0) for k in keys}, "n": partial.get("n", 0),
                       "seconds": partial.get("seconds", 0.0)}
        self.t0, self.n0 = time.perf_counter(), self.totals["n"]
        self.ended: float | None = None  # perf_counter() when the epoch's training ended
        self.images_per_s = 0.0  # captions per second of this process's part of the epoch, over all ranks

    def add(self, stats: dict[str, float], captions: int) -> None:
        for k in self.keys:
            self.totals[k] += stats[k] * captions
        self.totals["n"] += captions

    def progress(self) -> dict[str, str]:
        """The progress bar's postfix: the epoch's mean loss and the speed since this process started it."""
        speed = (self.totals["n"] - self.n0) * self.world / max(time.perf_counter() - self.t0, 1e-9)
        return {"loss": f"{self.totals['loss'] / self.totals['n']:.4f}", "img_s": f"{speed:.0f}"}

    def end(self) -> None:
        """The epoch's training is done (validation is timed apart): its seconds and speed are fixed."""
        self.ended = time.perf_counter()
        seconds = self.ended - self.t0
        self.totals["seconds"] += seconds
        self.images_per_s = (self.totals["n"] - self.n0) * self.world / max(seconds, 1e-9)

    def partial(self) -> dict:
        """What a checkpoint of the epoch stopped now saves: the sums, with the seconds trained so far."""
        running = time.perf_counter() - self.t0 if self.ended is None else 0.0
        return {**self.totals, "seconds": self.totals["seconds"] + running}


# ----------------------------------------------------------------------------------------------
# The run: what one process trains with


@dataclass
class Loaders:
    train: DataLoader
    sampler: EpochSampler
    steps_per_epoch: int
    val: DataLoader | None  # rank 0 validates
    references: list[list[list[str]]]  # the val images' reference token lists


@dataclass
class Run:
    """What one process trains with. `model` is what gets saved; `train_model` is it, DDP-wrapped under torchrun."""

    cfg: TrainOptions
    model_cfg: ModelConfig
    data: DataInfo
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    model: Captioner
    optimizer: torch.optim.Adam
    schedule: Schedule
    autocast: AbstractContextManager  # the training step's and validation's
    scaler: torch.amp.GradScaler
    cache_autocast: AbstractContextManager  # the feature cache's CNN
    ema: WeightAverage | None = None  # with --ema-decay
    loaders: Loaders | None = None  # made once the weights are restored (a feature cache depends on them)
    objective: Objective | None = None
    train_model: nn.Module | None = None
    tb: TensorBoardLog | None = None  # rank 0 with --tensorboard
    sync: RankSync | None = None  # the current epoch's stop and NaN checks
    bar: tqdm | None = None  # the current epoch's progress bar

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

    @property
    def steps(self) -> int:
        return self.loaders.steps_per_epoch

    def checkpoint(self, state: RunState) -> dict:
        """Everything --resume needs, as plain data; restore() is its inverse (and the objective's load_state_dict,
        once start_run has made it)."""
        averaged = {"trained_state": self.model.state_dict(), "ema_updates": self.ema.updates} if self.ema else {}
        return {"format_version": CHECKPOINT_FORMAT, "model_config": asdict(self.model_cfg),
                "model_state": self.eval_model.state_dict(), **averaged, "word_map": dict(self.data.vocab.word_map),
                "word_map_sha1": self.data.vocab.sha1, "image_size": self.data.image_size,
                "dataset": self.data.dataset, "train_config": asdict(self.cfg),
                "optimizer_state": self.optimizer.state_dict(), "scheduler_state": self.schedule.state_dict(),
                "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng_state": rng_state(), "objective_state": self.objective.state_dict(), **state.state_dict()}

    def restore(self, ckpt: dict) -> RunState:
        """Load what checkpoint() saved. Learning rates and plateau settings given on this command line win. Only
        the plateau schedule has a state (older checkpoints carry one for every schedule; the others ignore it)."""
        if self.ema is not None:
            self.model.load_state_dict(ckpt["trained_state"])
            self.ema.model.load_state_dict(ckpt["model_state"])
            self.ema.updates = ckpt["ema_updates"]
        else:
            self.model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        saved = ckpt["train_config"]
        take_new_rates(self.optimizer, Rates(saved.get("decoder_lr"), saved.get("encoder_lr")),
                       Rates(self.cfg.decoder_lr, self.cfg.encoder_lr))
        self.schedule.load_state_dict(ckpt.get("scheduler_state"))
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

    # -- the epoch, as train.py's loop calls it

    def start_epoch(self, state: RunState, stop: StopFlag) -> EpochSums:
        """Before the epoch's first step (or the step it resumes at): the sampler's order, the model's mode, and the
        running sums (a stopped epoch's, when resumed mid-epoch)."""
        self.sync = RankSync(stop, self.device)  # under torchrun, every rank stops at the same step
        self.loaders.sampler.set_epoch(state.epoch)
        self.loaders.sampler.skip = state.step * self.cfg.batch_size
        sums = EpochSums(self.objective.keys, state.partial, self.world)
        self.train_model.train(self.objective.train_mode)
        if self.tb is not None:
            self.tb.start_window(sums.totals)
        return sums

    def batches(self, state: RunState, show: bool) -> Iterator[tuple[int, Batch]]:
        """(step, batch) of the epoch from step state.step + 1 on, the batches on the device, behind a progress bar
        (drawn on a terminal only, so that a log file holds the epoch lines alone). With --captions-per-image k,
        k of each image's captions, drawn by the step's position (not under --scst, whose cross-entropy term reads
        them all)."""
        k = 0 if self.cfg.scst else self.cfg.captions_per_image
        with tqdm(self.loaders.train, total=self.steps, initial=state.step, disable=None if show else True,
                  desc=f"epoch {state.epoch + 1}/{self.cfg.epochs}", dynamic_ncols=True, leave=False) as self.bar:
            for step, (x, caps, lens, *index) in enumerate(self.bar, start=state.step + 1):
                x = to_model_input(x, self.device)
                caps, lens = caps.to(self.device, non_blocking=True), lens.to(self.device, non_blocking=True)
                if 0 < k < caps.size(1):
                    caps, lens = pick_captions(caps, lens, k, self.cfg.seed + 1_000_003 * state.epoch + step)
                yield step, Batch(x, caps, lens, index[0].tolist() if index else None)

    def optimize(self, loss: torch.Tensor, state: RunState, step: int) -> float:
        """optim.optimize with the run's clipping and scaler; a NaN or infinite loss is one line that names where."""
        try:
            return optimize(loss, self.optimizer, grad_clip=self.cfg.grad_clip, scaler=self.scaler,
                            any_bad=self.sync.any_bad)
        except NonFiniteLoss as err:
            last = self.run_dir / "last.pt"
            kept = f"; the last good checkpoint {last} is untouched" if last.exists() else ""
            raise UserError(f"{err} at epoch {state.epoch + 1} step {step}: training stopped{kept} (try a lower "
                            "learning rate, --grad-clip or --amp off)") from None

    def log_step(self, state: RunState, step: int, sums: EpochSums) -> None:
        """The progress bar's loss and speed and, with --tensorboard, the step statistics since the last log."""
        self.bar.set_postfix(sums.progress())
        if self.tb is not None:
            self.tb.train_step(state.epoch, step, sums.totals, self.optimizer)

    @property
    def stopping(self) -> bool:
        """Ctrl-C or SIGTERM came (to any rank): stop after this step."""
        return self.sync.stop

    def interrupted(self, state: RunState, step: int, sums: EpochSums) -> Interrupted:
        """Save the state after `step`, the last completed step of the epoch, and say how to go on."""
        if self.bar is not None:
            self.bar.close()
        state.step = step
        self.save(dataclasses.replace(state, partial=sums.partial()), "last.pt")
        signum = self.sync.flag.signum  # None: another rank's signal, under torchrun
        last = self.run_dir / "last.pt"
        prog = "torchrun --nproc_per_node=N train.py" if self.ddp else "python train.py"
        how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        return Interrupted(f"train.py: {how} in epoch {state.epoch + 1} after step {state.step}/{self.steps}; "
                           f"saved {last}; continue with: {prog} --resume {last}", code=128 + (signum or signal.SIGINT))

    def validate(self, show: bool) -> dict | None:
        """validate() of the eval model on rank 0, its result on every rank (the schedule and the stop rule need
        it); None when Ctrl-C or SIGTERM came during validation."""
        result = None
        if self.master:
            try:
                result = validate(self.eval_model, self.loaders.val, self.loaders.references, self.data.vocab,
                                  alpha_c=dsr_weight(self.cfg), max_decode_len=self.cfg.max_decode_len,
                                  autocast=self.autocast, stop=self.sync.flag, progress=show)
            except StopInValidation:
                result = None
        return broadcast(result)

    def end_epoch(self, state: RunState, sums: EpochSums, result: dict) -> bool:
        """After validation: best score, schedule, metrics line, checkpoints. True = stop early."""
        cfg = self.cfg
        *means, n_seen = all_reduce_sum([sums.totals[k] for k in sums.keys] + [sums.totals["n"]], self.device)
        score = result[SCORE[cfg.scst]]
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch, state.since_best = score, state.epoch + 1, 0
        else:
            state.since_best += 1
        self.schedule.end_epoch(score)
        state.epoch, state.step, state.partial = state.epoch + 1, 0, None
        rates = Rates.now(self.optimizer)
        m = {"epoch": state.epoch, **{f"train_{k}": v / max(n_seen, 1) for k, v in zip(sums.keys, means)},
             **{k: v for k, v in result.items() if k != "val_images"},
             "lr_decoder": rates.decoder, "lr_encoder": rates.encoder, "images_per_s": sums.images_per_s,
             "seconds": sums.totals["seconds"] + time.perf_counter() - sums.ended, "best": improved}
        state.history.append(m)
        # best.pt first: a kill between the two saves then never leaves last.pt ahead of a best epoch whose
        # best.pt was not written.
        self.save(state, *(("best.pt", "last.pt") if improved else ("last.pt",)))
        if self.master:
            write_metrics(self.run_dir, state.history)
            plot_curves(state.history, self.run_dir / "curves.png")
            print(epoch_line(m, cfg.epochs, cfg.scst), flush=True)
            if self.tb is not None:
                self.tb.end_epoch(m, self.eval_model)
        if state.since_best >= cfg.early_stop:
            if self.master:
                print(f"early stop: no new best {SCORE_NAME[cfg.scst]} for {state.since_best} epochs", flush=True)
            return True
        return False


def epoch_line(m: dict, epochs: int, scst: bool) -> str:
    """The line printed at the end of an epoch, from its metrics."""
    train = (f"reward {m['train_reward']:.4f} (baseline {m['train_baseline']:.4f})" if scst
             else f"train {m['train_loss']:.4f} (ce {m['train_ce']:.4f})")
    return (f"epoch {m['epoch']}/{epochs}  {train}  val {m['val_loss']:.4f} (ce {m['val_ce']:.4f})  "
            f"top5 {100 * m['val_top5']:.1f}%  BLEU-4 {m['val_bleu4']:.4f}  CIDEr-D {m['val_cider']:.4f}"
            f"{' *best*' if m['best'] else ''}  lr {m['lr_decoder']:.2e}  {m['images_per_s']:.0f} img/s  "
            f"{m['seconds']:.0f} s")


def pick_captions(caps: torch.Tensor, lengths: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k of each image's C captions, at random: caps (B, C, L), lengths (B, C) -> (B, k, L), (B, k). The draw has
    its own generator, seeded by the step's position, so the global RNG (dropout's) is untouched and a resumed run
    draws the same captions."""
    B, C, L = caps.shape
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(B, C, generator=g).argsort(dim=1)[:, :k].to(caps.device)  # (B, k)
    return caps.gather(1, pick.unsqueeze(2).expand(B, k, L)), lengths.gather(1, pick)


# ----------------------------------------------------------------------------------------------
# Validation


class StopInValidation(Exception):
    """Ctrl-C or SIGTERM arrived during validate(): train.py saves the epoch's end and stops."""


@torch.no_grad()
def validate(model: Captioner, loader: DataLoader, references: list[list[list[str]]], vocab: Vocab | dict[str, int], *,
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
    vocab = Vocab.of(vocab)  # a checkpoint's word map too
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
            decoded = greedy_decode(model.decoder, a, vocab, max_decode_len)
        hypotheses += [vocab.decode(d.tokens) for d in decoded]
    refs = references[: len(hypotheses)]
    bleu4 = nltk_bleu4(refs, hypotheses) if hypotheses else 0.0
    cider = float(CiderD(refs).scores(hypotheses, refs).mean()) if hypotheses else 0.0
    return {"val_loss": loss_sum / max(n_caps, 1), "val_ce": ce_sum / max(n_caps, 1),
            "val_top5": correct / max(tokens, 1), "val_bleu4": float(bleu4), "val_cider": cider,
            "val_images": len(hypotheses)}
