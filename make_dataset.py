"""Captions + an image folder -> data/processed/<dataset>/ HDF5 files + word map.

    python make_dataset.py                       # the built-in synthetic shapes dataset
    python make_dataset.py --dataset flickr8k    # Karpathy's JSON and the images where data/README.md says
    python make_dataset.py --dataset mine --captions captions.csv --image-dir photos/   # your own (docs/your_data.md)

The captions: Karpathy's split JSON (`--karpathy-json`), or with `--captions FILE...` any format of
caption_formats.py: Karpathy's JSON, Flickr's token file, a CSV/TSV, COCO's caption annotations or
JSON lines, detected from the file or forced with `--format`. Raw captions are tokenised as
Karpathy's were; without a split of their own they are split by `--split-lists` (Flickr8k's lists
beside its token file are found by themselves), else by a seeded draw of whole images
(`--val-size`, `--test-size`, `--split-seed`). An image in two splits is refused.

Writes `word_map.json` and `train.h5`, `val.h5`, `test.h5` (layout in data/README.md). Every file
is written under a temporary name and renamed only when all of them are complete, so a rerun
overwrites cleanly and a failed or interrupted run leaves the previous files untouched. A file there that
make_dataset.py did not write (a word_map.json of your own) is replaced only with `--overwrite`. A run killed
outright (kill -9) leaves its hidden `.<name>.<pid>.*.tmp` files behind; the next run deletes them.

Unusable images (missing, empty, truncated, not an image, over 200 megapixels) are skipped and named
in the summary; more than 5% of a split unusable is an error. Repeated captions or images are kept
once, with one warning line on stderr. User mistakes end with one line on stderr: exit 2 for a bad
option, 1 for bad input (naming the file and the line).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import random
import re
import sys
import time
from multiprocessing import Pool
from multiprocessing.sharedctypes import RawArray
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from caption_formats import FLICKR_SPLIT_LISTS, FORMATS, HELD_OUT, SPLITS, CaptionInput, Entry, read_captions
from cli import EXIT_BAD_OPTION, MAX_WORKERS, Parser, UserError, fraction_type, int_in, printable, run_cli, workers_int
from files import atomic_file, check_output_kinds, remove_stale_temps
from pytorch_dataset_class import (
    CHECKSUMS,
    DEFAULT_MAX_LEN,
    HDF5_FORMAT,
    MAX_IMAGE_SIZE,
    Vocab,
    attrs_to_write,
    preprocess_image,
    read_attrs,
)
from shapes import JSON_NAME as SHAPES_JSON
from shapes import generate_shapes

ROOT = Path(__file__).resolve().parent
DATASETS = ("flickr8k", "flickr30k", "coco", "shapes")  # built in: raw files at default paths (data/README.md)
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # any other name: a safe folder name
DATASET_NAME_RULE = "use letters, digits, '-', '_' and '.' (at most 64, starting with a letter or digit)"
MAX_UNUSABLE = 0.05  # more unusable images than this in a split means the paths are wrong, not bad luck
WRITE_BATCH = 256  # images buffered between HDF5 writes: memory stays flat even for COCO
WRITE_BLOCK_BYTES = 256 * 2**20  # and at most this many bytes of them (a MAX_IMAGE_SIZE image is 48 MiB)
SHAPES_SIZES = (4000, 250, 500)
OUTPUT_FILES = ("word_map.json", "train.h5", "val.h5", "test.h5")
# Bounds of the options: far beyond any real use, and well short of sizes that run a machine out of memory.
IMAGE_SIZE_RANGE = (16, MAX_IMAGE_SIZE)
MAX_LEN_LIMIT = 256  # tokens; Karpathy's captions have at most about 50
MAX_SHAPES = 1_000_000


def select_fraction(entries: list[Entry], fraction: float, rng: random.Random) -> list[Entry]:
    """A seeded random subset of round(fraction * n) entries (at least 1), kept in JSON order."""
    if fraction >= 1.0 or not entries:
        return entries
    k = max(1, round(fraction * len(entries)))
    return [entries[i] for i in sorted(rng.sample(range(len(entries)), k))]


def sample_captions(captions: list[list[str]], cpi: int, rng: random.Random) -> list[list[str]]:
    """Exactly cpi captions: all of them plus seeded draws with replacement when there are fewer,
    a seeded sample without replacement when there are more."""
    if len(captions) < cpi:
        return captions + rng.choices(captions, k=cpi - len(captions))
    return rng.sample(captions, cpi)


# Worker side of the shared image buffer. Sending each decoded image back through a pipe cost
# about as much CPU as decoding it; workers write straight into shared memory instead.
_WORKER: dict[str, np.ndarray] = {}


def _init_worker(shared, shape: tuple[int, ...]) -> None:
    _WORKER["block"] = np.frombuffer(shared, dtype=np.uint8).reshape(shape)  # (batch, 3, S, S)


def _load_image(job: tuple[int, str, int]) -> str | None:
    """Worker: decode image `path` into slot `slot` of the shared block; None, or why it is unusable."""
    slot, path, size = job
    try:
        _WORKER["block"][slot] = preprocess_image(path, size)
        return None
    except UserError as err:
        return str(err)


def _write_images(f: h5py.File, split: str, entries: list[Entry], image_dir: Path, size: int,
                  workers: int, progress: bool, check_written=lambda: None) -> tuple[list[Entry], list[str]]:
    """Decode and resize the split's images in worker processes, streaming them into `images`;
    check_written() after each block stops at a full disk.

    Images go through a shared block of WRITE_BATCH slots, one block at a time, so memory stays
    flat whatever the split size. Returns the entries whose image was usable, and one message per
    unusable image.
    """
    n = len(entries)
    # Missing files are counted up front (a stat each): the decoding below stops at the first 5% unusable, so a
    # wrong --image-dir (or names in a subfolder it lacks) would otherwise be counted only that far.
    missing = [e.filename for e in entries if not (image_dir / e.filename).is_file()]
    if len(missing) > MAX_UNUSABLE * n:
        raise UserError(f"{split}: {len(missing)} of {n} images are unusable: not in --image-dir {image_dir} (over "
                        f"{MAX_UNUSABLE:.0%}; is it the right folder?), e.g. "
                        f"{printable(str(image_dir / missing[0]))}: image not found")
    images = f.create_dataset("images", shape=(n, 3, size, size), maxshape=(None, 3, size, size),
                              dtype="uint8", chunks=(1, 3, size, size), **CHECKSUMS)  # one chunk = one image
    # Allocating (and zeroing) shared memory is not free: no more slots than images, nor than WRITE_BLOCK_BYTES.
    batch = max(1, min(WRITE_BATCH, n, WRITE_BLOCK_BYTES // (3 * size * size)))
    shape = (batch, 3, size, size)
    shared = RawArray(ctypes.c_uint8, int(np.prod(shape)))
    block = np.frombuffer(shared, dtype=np.uint8).reshape(shape)  # (batch, 3, S, S)
    kept: list[Entry] = []
    bad: list[str] = []
    with contextlib.ExitStack() as stack:
        if workers > 1 and n > 16:  # below that, starting the pool costs more than it saves
            pool = stack.enter_context(Pool(workers, initializer=_init_worker, initargs=(shared, shape)))
            imap = functools.partial(pool.imap, chunksize=8)  # ordered: results follow the entries
        else:
            _init_worker(shared, shape)
            imap = map
        bar = stack.enter_context(tqdm(total=n, desc=f"{split} images", unit="img", disable=not progress))
        for start in range(0, n, batch):
            chunk = entries[start:start + batch]
            jobs = [(slot, str(image_dir / e.filename), size) for slot, e in enumerate(chunk)]
            ok = []
            for slot, error in enumerate(imap(_load_image, jobs)):
                bar.update()
                if error is None:
                    ok.append(slot)
                    continue
                bad.append(error)
                if len(bad) > MAX_UNUSABLE * n:
                    read = start + slot + 1  # decoding stops here: the rest is not known
                    least, of_read = ("", "") if read == n else ("at least ", f" of the first {read} read")
                    raise UserError(f"{split}: {least}{len(bad)} of {n} images are unusable (over "
                                    f"{MAX_UNUSABLE:.0%}{of_read}; is --image-dir {image_dir} the right folder?), "
                                    f"e.g. {bad[0]}")
            # Every job of the block has finished here, so no worker is still writing into it.
            if ok:
                done = block[:len(ok)] if len(ok) == len(chunk) else block[ok]  # (len(ok), 3, S, S)
                images[len(kept):len(kept) + len(ok)] = done
                check_written()
            kept += [chunk[slot] for slot in ok]
    images.resize(len(kept), axis=0)
    return kept, bad


def _write_captions(f: h5py.File, entries: list[Entry], vocab: Vocab, cpi: int, max_len: int,
                    rng: random.Random) -> None:
    """captions (N*cpi, max_len+2) int32, caption_lengths (N*cpi,), and the per-image strings."""
    rows, lengths = [], []
    for e in entries:
        for tokens in sample_captions(e.captions, cpi, rng):
            ids, length = vocab.encode(tokens, max_len)
            rows.append(ids)
            lengths.append(length)
    captions = np.array(rows, dtype=np.int32).reshape(len(entries) * cpi, max_len + 2)  # (N*cpi, L)
    f.create_dataset("captions", data=captions, **CHECKSUMS)
    f.create_dataset("caption_lengths", data=np.array(lengths, dtype=np.int32), **CHECKSUMS)  # (N*cpi,)
    for name, texts in (("filenames", [e.filename for e in entries]),
                        ("references", [json.dumps(e.references) for e in entries]),
                        ("meta", [json.dumps(e.meta) for e in entries])):
        # Fixed-length, not variable-length strings: those live in HDF5's global heap, which no checksum covers.
        # gzip takes back the padding to the longest string.
        data = [t.encode("utf-8") for t in texts]
        f.create_dataset(name, data=np.array(data, dtype=h5py.string_dtype("utf-8", max(1, *map(len, data)))),
                         compression="gzip", **CHECKSUMS)


def _check_split(f: h5py.File, n: int, cpi: int, size: int, max_len: int) -> None:
    """The layout every reader relies on (data/README.md); checked before the file gets its name."""
    assert f["images"].shape == (n, 3, size, size) and f["images"].dtype == np.uint8
    assert f["captions"].shape == (n * cpi, max_len + 2) and f["captions"].dtype == np.int32
    assert f["caption_lengths"].shape == (n * cpi,)
    assert all(f[k].shape == (n,) for k in ("filenames", "references", "meta"))
    assert all(f[k].fletcher32 for k in f)
    if n:
        lengths = f["caption_lengths"][()]
        assert lengths.min() >= 2 and lengths.max() <= max_len + 2


def build_dataset(dataset: str = "shapes", karpathy_json: str | os.PathLike | None = None,
                  image_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None, *,
                  fraction: float = 1.0, captions_per_image: int = 5, min_word_freq: int = 5,
                  max_len: int = DEFAULT_MAX_LEN, image_size: int | None = None, workers: int | None = None,
                  seed: int = 0, shapes_sizes: tuple[int, int, int] = SHAPES_SIZES,
                  raw_dir: str | os.PathLike | None = None, captions: CaptionInput | None = None,
                  progress: bool = True, overwrite: bool = False) -> dict:
    """Process one dataset into `output_dir` (default data/processed/<dataset>); return a summary. Files there that
    make_dataset.py did not write are replaced only with `overwrite`; its own earlier output is replaced.

    The captions come from `karpathy_json` or from `captions` (any format of caption_formats.py); for
    the built-in names without either, from Karpathy's JSON at its default path. For "shapes" the raw
    data is first generated into `raw_dir` (default data/raw/shapes). Splits are processed train
    first: the vocabulary comes from the usable captions of the train images that were actually
    written, never from val or test.
    """
    if not DATASET_NAME.fullmatch(dataset):
        raise UserError(f"--dataset {ascii(dataset)}: {DATASET_NAME_RULE}", EXIT_BAD_OPTION)
    if karpathy_json is not None and captions is not None:
        raise UserError("--karpathy-json and --captions: give one of them", EXIT_BAD_OPTION)
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--fraction {fraction}: must be in (0, 1]", EXIT_BAD_OPTION)
    raw_dir = Path(raw_dir) if raw_dir is not None else ROOT / "data" / "raw" / dataset
    output_dir = Path(output_dir) if output_dir is not None else ROOT / "data" / "processed" / dataset
    size = image_size or (64 if dataset == "shapes" else 256)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers  # 0 or 1: no worker processes
    _check_writable("--output-dir", output_dir)
    check_output_kinds([output_dir / name for name in OUTPUT_FILES],
                       hint="; make_dataset.py writes its output there: move it away, or choose another --output-dir")
    if dataset == "shapes":
        _check_writable("--raw-dir", raw_dir)
        check_output_kinds([raw_dir / SHAPES_JSON], [raw_dir / "images"],
                           hint="; the shapes generator writes there: move it away, or choose another --raw-dir")
    summary: dict = {"dataset": dataset, "output_dir": str(output_dir), "image_size": size,
                     "captions_per_image": captions_per_image, "workers": workers, "images": {}, "skipped": {},
                     "dropped_long": {}, "shapes_seconds": None, "stale_removed": []}
    if dataset == "shapes":
        if karpathy_json is not None or captions is not None or image_dir is not None:
            raise UserError("--dataset shapes generates its own data: leave out --karpathy-json, --captions and "
                            "--image-dir", EXIT_BAD_OPTION)
        karpathy_json = _make_shapes(raw_dir, shapes_sizes, size, seed, workers, progress, summary)
        image_dir = raw_dir / "images"
    captions = _caption_input(dataset, karpathy_json, captions, raw_dir)
    image_dir = Path(image_dir or raw_dir / "images")
    _check_input("--image-dir", image_dir, "image folder", " (see data/README.md)", folder=True)
    splits = _read_splits(captions, max_len, image_dir, fraction, seed, summary)
    _check_not_input(output_dir, [*captions.paths, *(captions.split_lists or {}).values()], image_dir, splits)
    if not overwrite:
        _check_replaces_own(output_dir)

    start = time.perf_counter()
    summary["stale_removed"] += map(str, remove_stale_temps(output_dir))
    try:
        vocab, n_decoded = _write_all(output_dir, splits, image_dir, size, workers, captions_per_image, max_len,
                                      min_word_freq, seed, progress, summary)
    except OSError as err:
        raise UserError(f"--output-dir {output_dir}: cannot write the processed files "
                        f"({type(err).__name__}: {err})") from None
    assert Vocab.hash(output_dir / "word_map.json") == vocab.sha1
    seconds = time.perf_counter() - start
    summary.update(vocab_size=len(vocab), seconds=seconds, images_per_s=n_decoded / max(seconds, 1e-9))
    return summary


def _make_shapes(raw_dir: Path, sizes: tuple[int, int, int], size: int, seed: int, workers: int, progress: bool,
                 summary: dict) -> Path:
    """Generate the shapes dataset's images and Karpathy JSON into `raw_dir`; -> the JSON's path."""
    start = time.perf_counter()
    summary["stale_removed"] += map(str, remove_stale_temps(raw_dir))
    try:
        karpathy_json = generate_shapes(raw_dir, *sizes, image_size=size, seed=seed, workers=workers,
                                        progress=progress)
    except OSError as err:
        raise UserError(f"{raw_dir}: cannot write the shapes data ({type(err).__name__}: {err})") from None
    summary["shapes_seconds"] = time.perf_counter() - start
    return karpathy_json


def _caption_input(dataset: str, karpathy_json: str | os.PathLike | None, captions: CaptionInput | None,
                   raw_dir: Path) -> CaptionInput:
    """Where the captions come from, its files checked to be there: `captions`, else Karpathy's JSON (given, or at
    a built-in dataset's default path)."""
    if captions is None:
        if karpathy_json is None and dataset not in DATASETS:
            raise UserError(f"--dataset {dataset}: give its captions with --captions FILE (or --karpathy-json FILE); "
                            "docs/your_data.md shows how", EXIT_BAD_OPTION)
        karpathy_json = Path(karpathy_json or raw_dir / f"dataset_{dataset}.json")
        _check_input("--karpathy-json", karpathy_json, "Karpathy split JSON",
                     " (see data/README.md for where raw files go)")
        captions = CaptionInput((karpathy_json,), "karpathy")
    for option, what, paths in (("--captions", "caption file", captions.paths),
                                ("--split-lists", "split list", (captions.split_lists or {}).values())):
        for path in paths:
            _check_input(option, path, what)
    return captions


def _check_input(option: str, path: Path, what: str, hint: str = "", folder: bool = False) -> None:
    """Refuse an input that is missing or of the wrong kind (a folder where a file goes, or the reverse), naming it."""
    if path.is_dir() if folder else path.is_file():
        return
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder, not a file; name the {what} in it")
    if path.exists():
        raise UserError(f"{option} {path}: is a file, not a folder" if folder else f"{option} {path}: not a file")
    raise UserError(f"{option} {path}: {what} not found{hint}")


def _read_splits(captions: CaptionInput, max_len: int, image_dir: Path, fraction: float, seed: int,
                 summary: dict) -> dict[str, list[Entry]]:
    """The entries of each split, `fraction` of them (seeded); warnings printed now, not in the summary: a long run
    may follow."""
    found = read_captions(captions, max_len, image_dir)
    splits = found.splits
    for warning in found.warnings:
        print(printable(f"make_dataset.py: warning: {warning}"), file=sys.stderr)
    for split in SPLITS:
        if not splits[split]:
            raise UserError(f"{captions.paths[0]}: no usable {split} images (every split needs at least one)")
        splits[split] = select_fraction(splits[split], fraction, random.Random(f"{seed}:{split}:subset"))
    summary.update(dropped_long={s: found.dropped[s] for s in SPLITS}, split_from=found.split_from,
                   left_out=found.left_out)
    return splits


def _check_writable(option: str, folder: Path) -> None:
    """Refuse, before any work, a folder to write in that is a file or lies inside one."""
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
    except OSError as err:  # e.g. a folder above it that this user may not read
        raise UserError(f"{option} {folder}: cannot write there ({type(err).__name__}: {err})") from None
    if not existing.is_dir():
        raise UserError(f"{option} {folder}: cannot write there ({existing} is a file, not a folder)")


def _check_not_input(output_dir: Path, files: list[Path], image_dir: Path, splits: dict[str, list[Entry]]) -> None:
    """No output may replace an input: a caption file or split list, or an image named like one of OUTPUT_FILES."""
    outputs = {(output_dir / name).resolve() for name in OUTPUT_FILES}
    inputs = files + [image_dir / e.filename for entries in splits.values() for e in entries
                      if Path(e.filename).name in OUTPUT_FILES]
    for path in inputs:
        if path.resolve() in outputs:
            raise UserError(f"--output-dir {output_dir}: writing there would replace the input {path}; "
                            "choose another folder", EXIT_BAD_OPTION)


def foreign_outputs(output_dir: Path) -> list[str]:
    """Those of OUTPUT_FILES in `output_dir` that make_dataset.py did not write: a split file is its own when its
    attributes say so, word_map.json when its hash is the one a split file of the folder was built with."""
    foreign, built_with = [], set()
    for name in OUTPUT_FILES[1:]:  # the split files
        path = output_dir / name
        if not path.exists():
            continue
        try:
            with h5py.File(path, "r") as f:
                attrs = read_attrs(f)
        except (OSError, ValueError):
            attrs = {}
        if isinstance(attrs.get("word_map_sha1"), str) and "captions_per_image" in attrs:
            built_with.add(attrs["word_map_sha1"])
        else:
            foreign.append(name)
    word_map = output_dir / "word_map.json"
    try:
        if word_map.exists() and Vocab.hash(word_map) not in built_with:
            foreign.insert(0, word_map.name)
    except OSError:
        foreign.insert(0, word_map.name)
    return foreign


def _check_replaces_own(output_dir: Path) -> None:
    """Refuse (exit 2) to replace a file of OUTPUT_FILES that make_dataset.py did not write, as train.py refuses to
    replace another run's files: a word_map.json or train.h5 of the user's own is never replaced without a word."""
    foreign = foreign_outputs(output_dir)
    if foreign:
        them = "it" if len(foreign) == 1 else "them"
        raise UserError(f"--output-dir {output_dir}: {', '.join(foreign)} {'is' if them == 'it' else 'are'} not "
                        f"make_dataset.py's output; not replacing {them} (choose another --output-dir, or --overwrite "
                        f"to replace {them})", EXIT_BAD_OPTION)


def _write_all(output_dir: Path, splits: dict[str, list[Entry]], image_dir: Path, size: int, workers: int, cpi: int,
               max_len: int, min_word_freq: int, seed: int, progress: bool, summary: dict) -> tuple[Vocab, int]:
    """Write the word map and the three split files; -> (the vocabulary, images decoded)."""
    n_decoded = 0
    vocab = Vocab({})
    # All four files get their final names together at the end, or not at all. atomic_file: a full disk is one
    # line, where HDF5 alone would crash the process (files.GuardedFile).
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_file(output_dir / name)) for name in OUTPUT_FILES}
        for split in SPLITS:
            with h5py.File(tmp[f"{split}.h5"], "w", libver=HDF5_FORMAT) as f:
                kept, bad = _write_images(f, split, splits[split], image_dir, size, workers, progress,
                                          tmp[f"{split}.h5"].check)
                n_decoded += len(splits[split])
                if not kept:
                    raise UserError(f"{split}: no usable images")
                if split == "train":
                    vocab = Vocab.build([c for e in kept for c in e.captions], min_word_freq)
                    tmp["word_map.json"].write(vocab.to_json())
                _write_captions(f, kept, vocab, cpi, max_len, random.Random(f"{seed}:{split}:captions"))
                f.attrs.update(attrs_to_write(dict(
                    captions_per_image=cpi, image_size=size, max_len=max_len, dataset=summary["dataset"], split=split,
                    vocab_size=len(vocab), word_map_sha1=vocab.sha1)))
                _check_split(f, len(kept), cpi, size, max_len)
            # A full disk is named here, by the file that filled it, not later by a small file that found no room
            # after it (word_map.json).
            tmp[f"{split}.h5"].check()
            summary["images"][split] = len(kept)
            summary["skipped"][split] = bad
    return vocab, n_decoded


def format_summary(s: dict) -> str:
    """A few lines for the end of a run: images per split, vocabulary, skipped images, speed."""
    lines = [f"{s['dataset']} -> {s['output_dir']}",
             "  images: " + ", ".join(f"{k} {v}" for k, v in s["images"].items())
             + f" ({s['captions_per_image']} captions each, {s['image_size']} px)",
             f"  vocabulary: {s['vocab_size']} words (train captions only, with {' '.join(Vocab.SPECIAL)})"]
    skipped = [msg for msgs in s["skipped"].values() for msg in msgs]
    lines.append(f"  skipped {len(skipped)} unusable images" + (":" if skipped else ""))
    lines += [f"    {msg}" for msg in skipped]
    if s.get("split_from"):
        lines.insert(1, f"  splits: {s['split_from']}")
    if s.get("left_out"):
        lines.append(f"  left out {s['left_out']} captioned images that no split list names")
    n_long = sum(s["dropped_long"].values())
    if n_long:
        lines.append(f"  dropped {n_long} images with no caption of 1..max_len tokens")
    if s.get("stale_removed"):
        lines.append(f"  removed {len(s['stale_removed'])} temporary files a killed run had left")
    if s["shapes_seconds"] is not None:
        lines.append(f"  generated shapes in {s['shapes_seconds']:.1f} s")
    lines.append(f"  processed in {s['seconds']:.1f} s: {s['images_per_s']:.0f} images/s "
                 f"with {s['workers']} workers")
    return "\n".join(lines)


def dataset_name(text: str) -> str:
    """An argparse type: a --dataset name that is safe as a folder name under data/raw and data/processed."""
    if not DATASET_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{ascii(text)}: {DATASET_NAME_RULE}")
    return text


def split_size(text: str) -> float:
    """An argparse type: a count of images (an integer >= 1) or a fraction of them (0 < x < 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value) and "." not in text:
        return int(value)
    raise argparse.ArgumentTypeError(f"must be a count of images (an integer >= 1) or a fraction in (0, 1), got {text}")


def split_list(text: str) -> tuple[str, Path]:
    """An argparse type: SPLIT=FILE, a split list naming one image a line."""
    split, sep, path = text.partition("=")
    if not sep or split not in SPLITS or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SPLIT=FILE with SPLIT one of {', '.join(SPLITS)}")
    return split, Path(path)


def parse_args(argv: list[str] | None = None):
    p = Parser(description="Captions (Karpathy's JSON, Flickr's token file, CSV, COCO or JSON lines) + images -> "
                           "data/processed/<dataset>/ (HDF5 + word map).")
    p.add_argument("--dataset", type=dataset_name, default="shapes",
                   help=f"dataset name: {', '.join(DATASETS)} (raw files at their default paths), or a name of "
                        "your own (give --captions)")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--karpathy-json", type=Path, default=None,
                        help="Karpathy split JSON; if not given, data/raw/<dataset>/dataset_<dataset>.json for "
                             "flickr8k, flickr30k and coco")
    inputs.add_argument("--captions", type=Path, nargs="+", default=None, metavar="FILE",
                        help="caption file(s) in one format, several read as one (COCO's train2014 + val2014); "
                             "formats in docs/your_data.md")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="format of the --captions files; if not given, detected from the file name (.json, "
                        ".jsonl, .csv, .tsv), else from the first line")
    p.add_argument("--split-lists", type=split_list, nargs="+", default=None, metavar="SPLIT=FILE",
                   help="files naming one image a line, e.g. val=Flickr_8k.devImages.txt test=Flickr_8k.testImages.txt "
                        "(train=FILE too, else every other image is train); if not given, a token file's "
                        f"{', '.join(FLICKR_SPLIT_LISTS.values())} beside it, else a seeded split")
    p.add_argument("--val-size", type=split_size, default=None,
                   help=f"seeded split: val images, a count or a fraction; if not given, {HELD_OUT}")
    p.add_argument("--test-size", type=split_size, default=None,
                   help=f"seeded split: test images, a count or a fraction; if not given, {HELD_OUT}")
    p.add_argument("--split-seed", type=int_in(0, 2**32 - 1), default=0,
                   help="seed of the seeded split (its own, so that --seed leaves the test images alone)")
    p.add_argument("--image-column", default="image", help="CSV: the column of image file names")
    p.add_argument("--caption-column", default="caption", help="CSV: the column of captions")
    p.add_argument("--image-dir", type=Path, default=None,
                   help="image folder; if not given, data/raw/<dataset>/images")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="output folder; if not given, data/processed/<dataset>")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --output-dir that make_dataset.py did not write (its own are replaced "
                        "anyway)")
    p.add_argument("--raw-dir", type=Path, default=None,
                   help="raw data folder (shapes: where it is generated); if not given, data/raw/<dataset>")
    p.add_argument("--fraction", type=fraction_type, default=1.0,
                   help="seeded random fraction of every split to keep, in (0, 1]")
    p.add_argument("--captions-per-image", type=int_in(1, 100), default=5,
                   help="captions stored per image (fewer: drawn with replacement; more: sampled), 1..100")
    p.add_argument("--min-word-freq", type=int_in(1, 10**9), default=5,
                   help="keep a train word when its count >= this; rarer words become <unk>")
    p.add_argument("--max-len", type=int_in(1, MAX_LEN_LIMIT), default=DEFAULT_MAX_LEN,
                   help=f"drop captions longer than this (tokens), 1..{MAX_LEN_LIMIT}")
    p.add_argument("--image-size", type=int_in(*IMAGE_SIZE_RANGE), default=None,
                   help="stored image side in pixels, {}..{}; if not given, 64 for shapes, 256 otherwise"
                   .format(*IMAGE_SIZE_RANGE))
    p.add_argument("--workers", type=workers_int, default=min(4, os.cpu_count() or 1),
                   help=f"image decoding processes, 0..{MAX_WORKERS} (0 or 1: decode in this process)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0,
                   help="seed for subsets, caption sampling and shapes, 0..2**32-1")
    for split, n in zip(SPLITS, SHAPES_SIZES):
        p.add_argument(f"--shapes-{split}", type=int_in(1, MAX_SHAPES), default=n,
                       help=f"shapes: {split} images, 1..{MAX_SHAPES:,}")
    return p.parse_args(argv)


def caption_input(a: argparse.Namespace) -> CaptionInput | None:
    """The --captions options as a CaptionInput; None without --captions (--karpathy-json or the default)."""
    raw_options = [o for o, v in (("--format", a.format), ("--split-lists", a.split_lists), ("--val-size", a.val_size),
                                  ("--test-size", a.test_size)) if v is not None]
    if a.captions is None:
        if raw_options:
            raise UserError(f"{raw_options[0]}: only with --captions", EXIT_BAD_OPTION)
        return None
    lists = None
    if a.split_lists is not None:
        lists = dict(a.split_lists)
        if len(lists) < len(a.split_lists):
            raise UserError("--split-lists: one file per split", EXIT_BAD_OPTION)
    return CaptionInput(tuple(a.captions), a.format, lists, a.image_column, a.caption_column, a.val_size,
                        a.test_size, a.split_seed)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    summary = build_dataset(
        a.dataset, a.karpathy_json, a.image_dir, a.output_dir, fraction=a.fraction,
        captions_per_image=a.captions_per_image, min_word_freq=a.min_word_freq, max_len=a.max_len,
        image_size=a.image_size, workers=a.workers, seed=a.seed,
        shapes_sizes=(a.shapes_train, a.shapes_val, a.shapes_test), raw_dir=a.raw_dir, captions=caption_input(a),
        progress=sys.stderr.isatty(),  # progress bars in a log file are noise around the one error line
        overwrite=a.overwrite)
    # a file name with a newline, or not valid UTF-8 (a strict terminal), stays on its line
    print("\n".join(printable(line) for line in format_summary(summary).splitlines()))


if __name__ == "__main__":
    run_cli(main)
