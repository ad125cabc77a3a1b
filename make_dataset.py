"""Raw data (Karpathy split JSON + image folder) -> data/processed/<dataset>/ HDF5 files + word map.

    python make_dataset.py                       # the built-in synthetic shapes dataset
    python make_dataset.py --dataset flickr8k    # raw files where data/README.md says

Writes `word_map.json` and `train.h5`, `val.h5`, `test.h5` (layout in data/README.md). Every file
is written under a temporary name and renamed only when all of them are complete, so a rerun
overwrites cleanly and a failed or interrupted run leaves the previous files untouched. A run killed
outright (kill -9) leaves its hidden `.<name>.<pid>.*.tmp` files behind; the next run deletes them.

Unusable images (missing, empty, truncated, not an image, over 200 megapixels) are skipped and named
in the summary; more than 5% of a split unusable is an error. User mistakes end with one line on
stderr: exit 2 for a bad option, 1 for bad input.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool
from multiprocessing.sharedctypes import RawArray
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from cli import EXIT_BAD_OPTION, MAX_WORKERS, Parser, UserError, fraction_type, int_in, run_cli, workers_int
from files import atomic_file, remove_stale_temps
from pytorch_dataset_class import (
    CHECKSUMS,
    HDF5_FORMAT,
    attrs_to_write,
    build_word_map,
    preprocess_image,
    printable,
    word_map_sha1,
)
from shapes import generate_shapes

ROOT = Path(__file__).resolve().parent
DATASETS = ("flickr8k", "flickr30k", "coco", "shapes")
SPLITS = ("train", "val", "test")
MAX_UNUSABLE = 0.05  # more unusable images than this in a split means the paths are wrong, not bad luck
WRITE_BATCH = 256  # images buffered between HDF5 writes: memory stays flat even for COCO
WRITE_BLOCK_BYTES = 256 * 2**20  # and at most this many bytes of them (a 4096 px image is 48 MiB)
SHAPES_SIZES = (4000, 250, 500)
OUTPUT_FILES = ("word_map.json", "train.h5", "val.h5", "test.h5")
# Bounds of the options: far beyond any real use, and well short of sizes that run a machine out of memory.
IMAGE_SIZE_RANGE = (16, 4096)
MAX_LEN_LIMIT = 256  # tokens; Karpathy's captions have at most about 50
MAX_SHAPES = 1_000_000


@dataclass
class Entry:
    """One image of the Karpathy JSON."""

    filename: str  # relative to the image folder (COCO: "train2014/COCO_...jpg")
    captions: list[list[str]]  # usable captions: 1..max_len tokens
    references: list[list[str]]  # all raw reference captions, for scoring
    meta: dict = field(default_factory=dict)  # extra ground truth (shapes); {} for real data


def load_karpathy(json_path: Path, max_len: int) -> tuple[dict[str, list[Entry]], Counter]:
    """Read a Karpathy split JSON -> entries per split, and per split the images dropped because
    none of their captions has 1..max_len tokens. COCO's `restval` counts as train. Every field is
    type-checked: a wrong one is a UserError naming the file and the image."""
    try:
        images = json.loads(json_path.read_text(encoding="utf-8"))["images"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as err:
        raise UserError(f"{json_path}: not a Karpathy split JSON ({type(err).__name__}: {err})") from None
    if not isinstance(images, list):
        raise UserError(f"{json_path}: \"images\" is {type(images).__name__}, not a list (expected Karpathy's format)")
    splits: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    dropped: Counter = Counter()
    for i, img in enumerate(images):
        split, filename, references = _karpathy_fields(img, i, json_path)
        split = "train" if split == "restval" else split
        if split not in splits:
            raise UserError(f"{json_path}: {ascii(filename)} has split {ascii(split)}; "
                            "expected train, restval, val or test")
        captions = [c for c in references if 0 < len(c) <= max_len]
        if not captions:
            dropped[split] += 1
            continue
        splits[split].append(Entry(filename, captions, references, img.get("shapes", {})))
    return splits, dropped


def _not_text(value: object) -> str | None:
    """Why `value` is not a string of valid Unicode, or None. json.loads turns "\\udcff" into a lone surrogate,
    which UTF-8 (the HDF5 files, a strict terminal) cannot encode: a file name that is not valid UTF-8 on disk."""
    if not isinstance(value, str):
        return f"{type(value).__name__}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{ascii(value)}, not valid UTF-8"
    return None


def _karpathy_fields(img: object, i: int, json_path: Path) -> tuple[str, str, list[list[str]]]:
    """(split, filename, reference token lists) of image i of a Karpathy JSON, each field type-checked."""
    def bad(what: str) -> UserError:
        name = img.get("filename") if isinstance(img, dict) else None
        which = f"image {i}" + (f" ({ascii(name)})" if isinstance(name, str) else "")
        return UserError(f"{json_path}: {which}: {what} (expected Karpathy's format)")

    if not isinstance(img, dict):
        raise bad(f"is {type(img).__name__}, not an object")
    for key in ("split", "filename", "sentences"):
        if key not in img:
            raise bad(f"no {key!r}")
    for key in ("split", "filename", "filepath"):
        if key in img and (why := _not_text(img[key])):
            raise bad(f"{key} is {why}")
    if not img["filename"]:
        raise bad("empty filename")
    sentences = img["sentences"]
    if not isinstance(sentences, list):
        raise bad(f"sentences is {type(sentences).__name__}, not a list")
    references = []
    for j, sentence in enumerate(sentences):
        tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
        if not isinstance(tokens, list):
            raise bad(f"sentence {j} has no list of tokens")
        for k, token in enumerate(tokens):
            if why := _not_text(token):
                raise bad(f"sentence {j}: token {k} is {why}")
        references.append(list(tokens))
    return img["split"], os.path.join(img.get("filepath", ""), img["filename"]), references


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


def encode_caption(tokens: list[str], word_map: dict[str, int], max_len: int) -> tuple[list[int], int]:
    """`<start> w1..wn <end> <pad>...` as max_len + 2 indices, and its length n + 2."""
    unk = word_map["<unk>"]
    ids = [word_map["<start>"]] + [word_map.get(w, unk) for w in tokens] + [word_map["<end>"]]
    return ids + [word_map["<pad>"]] * (max_len + 2 - len(ids)), len(ids)


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
                    raise UserError(f"{split}: {len(bad)} of {n} images are unusable (over {MAX_UNUSABLE:.0%}; "
                                    f"is --image-dir {image_dir} the right folder?), e.g. {bad[0]}")
            # Every job of the block has finished here, so no worker is still writing into it.
            if ok:
                done = block[:len(ok)] if len(ok) == len(chunk) else block[ok]  # (len(ok), 3, S, S)
                images[len(kept):len(kept) + len(ok)] = done
                check_written()
            kept += [chunk[slot] for slot in ok]
    images.resize(len(kept), axis=0)
    return kept, bad


def _write_captions(f: h5py.File, entries: list[Entry], word_map: dict[str, int], cpi: int, max_len: int,
                    rng: random.Random) -> None:
    """captions (N*cpi, max_len+2) int32, caption_lengths (N*cpi,), and the per-image strings."""
    rows, lengths = [], []
    for e in entries:
        for tokens in sample_captions(e.captions, cpi, rng):
            ids, length = encode_caption(tokens, word_map, max_len)
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
                  max_len: int = 50, image_size: int | None = None, workers: int | None = None,
                  seed: int = 0, shapes_sizes: tuple[int, int, int] = SHAPES_SIZES,
                  raw_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Process one dataset into `output_dir` (default data/processed/<dataset>); return a summary.

    For "shapes" the raw data is first generated into `raw_dir` (default data/raw/shapes).
    Splits are processed train first: the vocabulary comes from the usable captions of the train
    images that were actually written, never from val or test.
    """
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset}: expected one of {', '.join(DATASETS)}", EXIT_BAD_OPTION)
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--fraction {fraction}: must be in (0, 1]", EXIT_BAD_OPTION)
    raw_dir = Path(raw_dir) if raw_dir is not None else ROOT / "data" / "raw" / dataset
    output_dir = Path(output_dir) if output_dir is not None else ROOT / "data" / "processed" / dataset
    size = image_size or (64 if dataset == "shapes" else 256)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers  # 0 or 1: no worker processes
    _check_writable("--output-dir", output_dir)
    if dataset == "shapes":
        _check_writable("--raw-dir", raw_dir)
    cpi = captions_per_image
    summary: dict = {"dataset": dataset, "output_dir": str(output_dir), "image_size": size,
                     "captions_per_image": cpi, "workers": workers, "images": {}, "skipped": {},
                     "dropped_long": {}, "shapes_seconds": None, "stale_removed": []}

    if dataset == "shapes":
        if karpathy_json is not None or image_dir is not None:
            raise UserError("--dataset shapes generates its own data: leave out --karpathy-json and "
                            "--image-dir", EXIT_BAD_OPTION)
        start = time.perf_counter()
        summary["stale_removed"] += map(str, remove_stale_temps(raw_dir))
        try:
            karpathy_json = generate_shapes(raw_dir, *shapes_sizes, image_size=size, seed=seed,
                                            workers=workers, progress=progress)
        except OSError as err:
            raise UserError(f"{raw_dir}: cannot write the shapes data ({type(err).__name__}: {err})") from None
        summary["shapes_seconds"] = time.perf_counter() - start
        image_dir = raw_dir / "images"
    karpathy_json = Path(karpathy_json or raw_dir / f"dataset_{dataset}.json")
    image_dir = Path(image_dir or raw_dir / "images")
    if not karpathy_json.is_file():
        raise UserError(f"--karpathy-json {karpathy_json}: Karpathy split JSON not found "
                        "(see data/README.md for where raw files go)")
    if not image_dir.is_dir():
        raise UserError(f"--image-dir {image_dir}: image folder not found (see data/README.md)")

    splits, dropped = load_karpathy(karpathy_json, max_len)
    for split in SPLITS:
        if not splits[split]:
            raise UserError(f"{karpathy_json}: no usable {split} images (every split needs at least one)")
        splits[split] = select_fraction(splits[split], fraction, random.Random(f"{seed}:{split}:subset"))
    summary["dropped_long"] = {s: dropped[s] for s in SPLITS}
    _check_not_input(output_dir, karpathy_json, image_dir, splits)

    start = time.perf_counter()
    summary["stale_removed"] += map(str, remove_stale_temps(output_dir))
    try:
        word_map, sha1, n_decoded = _write_all(output_dir, splits, image_dir, size, workers, cpi, max_len,
                                               min_word_freq, seed, progress, summary)
    except OSError as err:
        raise UserError(f"--output-dir {output_dir}: cannot write the processed files "
                        f"({type(err).__name__}: {err})") from None
    assert word_map_sha1(output_dir / "word_map.json") == sha1
    seconds = time.perf_counter() - start
    summary.update(vocab_size=len(word_map), seconds=seconds, images_per_s=n_decoded / max(seconds, 1e-9))
    return summary


def _check_writable(option: str, folder: Path) -> None:
    """Refuse, before any work, a folder to write in that is a file or lies inside one."""
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
    except OSError as err:  # e.g. a folder above it that this user may not read
        raise UserError(f"{option} {folder}: cannot write there ({type(err).__name__}: {err})") from None
    if not existing.is_dir():
        raise UserError(f"{option} {folder}: cannot write there ({existing} is a file, not a folder)")


def _check_not_input(output_dir: Path, karpathy_json: Path, image_dir: Path, splits: dict[str, list[Entry]]) -> None:
    """No output may replace an input: the split JSON, or an image named like one of OUTPUT_FILES."""
    outputs = {(output_dir / name).resolve() for name in OUTPUT_FILES}
    inputs = [karpathy_json] + [image_dir / e.filename for entries in splits.values() for e in entries
                                if Path(e.filename).name in OUTPUT_FILES]
    for path in inputs:
        if path.resolve() in outputs:
            raise UserError(f"--output-dir {output_dir}: writing there would replace the input {path}; "
                            "choose another folder", EXIT_BAD_OPTION)


def _write_all(output_dir: Path, splits: dict[str, list[Entry]], image_dir: Path, size: int, workers: int, cpi: int,
               max_len: int, min_word_freq: int, seed: int, progress: bool,
               summary: dict) -> tuple[dict[str, int], str, int]:
    """Write the word map and the three split files; -> (word map, its sha1, images decoded)."""
    n_decoded = 0
    word_map: dict[str, int] = {}
    sha1 = ""
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
                    word_map = build_word_map([c for e in kept for c in e.captions], min_word_freq)
                    data = json.dumps(word_map, indent=1).encode()  # ASCII: json escapes the rest
                    tmp["word_map.json"].write(data)
                    sha1 = word_map_sha1(data)
                _write_captions(f, kept, word_map, cpi, max_len, random.Random(f"{seed}:{split}:captions"))
                f.attrs.update(attrs_to_write(dict(
                    captions_per_image=cpi, image_size=size, max_len=max_len, dataset=summary["dataset"], split=split,
                    vocab_size=len(word_map), word_map_sha1=sha1)))
                _check_split(f, len(kept), cpi, size, max_len)
            summary["images"][split] = len(kept)
            summary["skipped"][split] = bad
    return word_map, sha1, n_decoded


def format_summary(s: dict) -> str:
    """A few lines for the end of a run: images per split, vocabulary, skipped images, speed."""
    lines = [f"{s['dataset']} -> {s['output_dir']}",
             "  images: " + ", ".join(f"{k} {v}" for k, v in s["images"].items())
             + f" ({s['captions_per_image']} captions each, {s['image_size']} px)",
             f"  vocabulary: {s['vocab_size']} words (train captions only, with <pad> <start> <end> <unk>)"]
    skipped = [msg for msgs in s["skipped"].values() for msg in msgs]
    lines.append(f"  skipped {len(skipped)} unusable images" + (":" if skipped else ""))
    lines += [f"    {msg}" for msg in skipped]
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


def parse_args(argv: list[str] | None = None):
    p = Parser(description="Karpathy split JSON + images -> data/processed/<dataset>/ (HDF5 + word map).")
    p.add_argument("--dataset", choices=DATASETS, default="shapes", help="which dataset to process")
    p.add_argument("--karpathy-json", type=Path, default=None,
                   help="Karpathy split JSON; if not given, data/raw/<dataset>/dataset_<dataset>.json")
    p.add_argument("--image-dir", type=Path, default=None,
                   help="image folder; if not given, data/raw/<dataset>/images")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="output folder; if not given, data/processed/<dataset>")
    p.add_argument("--raw-dir", type=Path, default=None,
                   help="raw data folder (shapes: where it is generated); if not given, data/raw/<dataset>")
    p.add_argument("--fraction", type=fraction_type, default=1.0,
                   help="seeded random fraction of every split to keep, in (0, 1]")
    p.add_argument("--captions-per-image", type=int_in(1, 100), default=5,
                   help="captions stored per image (fewer: drawn with replacement; more: sampled), 1..100")
    p.add_argument("--min-word-freq", type=int_in(1, 10**9), default=5,
                   help="keep a train word when its count >= this; rarer words become <unk>")
    p.add_argument("--max-len", type=int_in(1, MAX_LEN_LIMIT), default=50,
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


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    summary = build_dataset(
        a.dataset, a.karpathy_json, a.image_dir, a.output_dir, fraction=a.fraction,
        captions_per_image=a.captions_per_image, min_word_freq=a.min_word_freq, max_len=a.max_len,
        image_size=a.image_size, workers=a.workers, seed=a.seed,
        shapes_sizes=(a.shapes_train, a.shapes_val, a.shapes_test), raw_dir=a.raw_dir,
        progress=sys.stderr.isatty())  # progress bars in a log file are noise around the one error line
    # a file name with a newline, or not valid UTF-8 (a strict terminal), stays on its line
    print("\n".join(printable(line) for line in format_summary(summary).splitlines()))


if __name__ == "__main__":
    run_cli(main)
