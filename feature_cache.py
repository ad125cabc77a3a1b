"""The feature cache (`train.py --cache-features`): a frozen encoder's annotations, computed once per image.

With a frozen CNN every epoch would compute the same annotations again, and the CNN is most of a
step's time. The cache runs it once over each split and stores the annotations in float16 beside
the data, `features_<encoder>_<weights>-<sha1 of the CNN weights>_<encoded_size>_<split>.h5`; the
datasets of pytorch_dataset_class.py read them instead of the images. A cache is reused only when
it was built by the same weights from the same split file, and it is written under a temporary name, with
checksums (pytorch_dataset_class.CHECKSUMS) that the datasets check when they read it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import h5py
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from all_models import Encoder, ModelConfig
from cli import EXIT_BAD_OPTION, UserError
from files import atomic_file, check_output_kinds
from pytorch_dataset_class import (
    CHECKSUMS,
    FEATURES_FIX,
    HDF5_FORMAT,
    ImageDataset,
    attrs_to_write,
    check_stored_here,
    ignore_stop_signals,
    read_attrs,
    to_model_input,
)

FLOAT16_MAX = 65504.0
# On a CPU, batches of a few hundred MB of activations cost more in page faults than in arithmetic:
# EfficientNet-Lite0 ran 33 images/s at 16 images a call and 20 at 64 (2 cores, 224 px).
CPU_CACHE_BATCH = 16


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
                check_stored_here(f, out_path, FEATURES_FIX)  # before its features are read, or links followed
                a = read_attrs(f)
                # A cache written without checksums (an older version) is rebuilt, so that damage is caught.
                if (a.get("encoder_sha1") == fingerprint and int(a.get("source_size", -1)) == size
                        and int(a.get("source_mtime_ns", -1)) == mtime and f["features"].fletcher32):
                    return out_path
        except (OSError, KeyError, TypeError, ValueError):
            pass  # unreadable, or attributes of the wrong kind: rebuild it
    device = next(encoder.parameters()).device
    ds = ImageDataset(h5_path)
    n = len(ds)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    P = encoder.pool.output_size if isinstance(encoder.pool.output_size, int) else encoder.pool.output_size[0]
    P, D = P * P, encoder.dim
    need = n * P * D * 2
    free = shutil.disk_usage(out_path.parent).free
    if need > free:
        raise UserError(f"--cache-features: the {h5_path.stem} cache needs {need / 2**30:.1f} GiB, "
                        f"{out_path.parent} has {free / 2**30:.1f} GiB free")
    was_training = encoder.training
    encoder.eval()
    # atomic_file: a full disk is one line, where HDF5 alone would crash the process (files.GuardedFile)
    with atomic_file(out_path) as fh, h5py.File(fh, "w", libver=HDF5_FORMAT) as f, torch.no_grad():
        feats = f.create_dataset("features", (n, P, D), dtype="float16", chunks=(1, P, D), **CHECKSUMS)  # (N, P, D)
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
            fh.check()  # stop at a full disk, not after the whole split
        f.attrs.update(attrs_to_write({"encoder_sha1": fingerprint, "source": str(h5_path.resolve()),
                                       "source_size": size, "source_mtime_ns": mtime}))
    encoder.train(was_training)
    return out_path


def build_split_caches(encoder: Encoder, data: str | os.PathLike, cfg: ModelConfig, weights: str, *,
                       batch_size: int, workers: int, autocast: AbstractContextManager | None = None,
                       build: bool = True, progress: bool = True) -> tuple[Path, Path]:
    """The train and val caches of a data folder for this encoder: (train path, val path), built or
    reused when `build` (under torchrun only rank 0 builds; the others just need the paths)."""
    fingerprint = encoder_fingerprint(encoder)
    paths = tuple(feature_cache_path(data, cfg, weights, fingerprint, split) for split in ("train", "val"))
    if build:
        check_output_kinds(paths, hint="; train.py --cache-features writes its feature cache there: move it away")
        device = next(encoder.parameters()).device
        if device.type != "cuda":
            batch_size = min(batch_size, CPU_CACHE_BATCH)
        for split, out in zip(("train", "val"), paths):
            build_feature_cache(encoder, Path(data) / f"{split}.h5", out, batch_size=batch_size, workers=workers,
                                autocast=autocast, progress=progress)
    return paths  # type: ignore[return-value]
