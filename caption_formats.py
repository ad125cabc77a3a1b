"""Caption files in the formats people have -> the images and captions of each split, for make_dataset.py.

Formats (names for `--format`; docs/your_data.md has an example of each):
- `karpathy`: Karpathy's split JSON, `{"images": [{"filename", "split", "sentences": [{"tokens"}]}]}`.
- `flickr-token`: Flickr8k's / Flickr30k's `Flickr8k.token.txt`, one `<image>#<n><TAB><caption>` a line.
- `csv`: a header row naming an image column and a caption column, one caption a row (Kaggle's
  `captions.txt`: `image,caption`). The delimiter is whichever of `, TAB | ;` the header holds most of.
- `coco`: COCO's caption annotations, `images[].id/file_name` and `annotations[].image_id/caption`.
- `jsonl`: JSON lines, `{"image": ..., "caption": "..."}` or `{"image": ..., "captions": [...]}`.

Only Karpathy's JSON carries a split and its own tokens. Raw captions are tokenised as Karpathy's were
(lower case, punctuation removed) and split by split lists (one image name a line) when given, else
by a seeded draw that keeps each image's captions together. Every mistake in a file is a UserError
naming the file and the line (row, image or annotation index); repeated rows are kept once, with one
warning.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cli import EXIT_BAD_OPTION, UserError

FORMATS = ("karpathy", "flickr-token", "csv", "coco", "jsonl")
SPLITS = ("train", "val", "test")
HELD_OUT = 0.1  # default --val-size and --test-size of a seeded split: 10% of the images each
# Flickr8k's own split lists; found beside the token file when no --split-lists are given (dev = val).
FLICKR_SPLIT_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                      "test": "Flickr_8k.testImages.txt"}
CSV_DELIMITERS = (",", "\t", "|", ";")  # ties go to the first: a comma
_WORD = re.compile(r"[^\W_]+")  # a run of letters and digits (any script)
_FLICKR_LINE = re.compile(r"(?P<image>[^\t#]+)#\d+\t(?P<caption>.*)")
_COCO_NAME = re.compile(r"captions_(?P<folder>\w+)\.json")  # COCO's captions_train2014.json: images in train2014/


@dataclass
class Entry:
    """One image and its captions."""

    filename: str  # relative to the image folder (COCO: "train2014/COCO_...jpg")
    captions: list[list[str]]  # usable captions: 1..max_len tokens
    references: list[list[str]]  # all raw reference captions, for scoring
    meta: dict = field(default_factory=dict)  # extra ground truth (shapes); {} for real data


@dataclass(frozen=True)
class CaptionInput:
    """Where the captions come from and how to split them: make_dataset's options."""

    paths: tuple[Path, ...]  # one format; several files are read as one (COCO's train2014 + val2014)
    format: str | None = None  # one of FORMATS; None: detected from the first file
    split_lists: dict[str, Path] | None = None  # {split: file of image names}; without "train", the rest
    image_column: str = "image"  # csv
    caption_column: str = "caption"  # csv
    val_size: float | None = None  # seeded split: a count (>= 1) or a fraction (< 1) of the images; None: HELD_OUT
    test_size: float | None = None
    split_seed: int = 0


@dataclass
class Captions:
    """What make_dataset consumes: the usable entries of each split, and what was left out."""

    splits: dict[str, list[Entry]]
    dropped: Counter  # per split: images with no caption of 1..max_len tokens
    split_from: str  # where the split came from, for the summary
    left_out: int = 0  # captioned images that no split list names
    warnings: list[str] = field(default_factory=list)  # one line each: repeats, kept once


def tokenize(caption: str) -> list[str]:
    """Karpathy's tokens of a raw caption: lower case, split at anything but letters and digits, so punctuation
    goes ("t-shirt" -> t, shirt; "person 's" -> person, s). Reproduces the `tokens` of Flickr8k's captions."""
    return _WORD.findall(caption.lower())


# ---------------------------------------------------------------- reading any format

def read_captions(source: CaptionInput, max_len: int, image_dir: Path | None = None) -> Captions:
    """Read `source.paths` (in `source.format`, or the one detected) -> entries per split, every image name a path
    inside the image folder (check_inside).

    `image_dir` places COCO's images: a `captions_<folder>.json` file's images are looked up in
    `<image_dir>/<folder>/` when that folder exists."""
    found = _read_any(source, max_len, image_dir)
    check_inside(found.splits, source.paths, image_dir)
    return found


def outside(name: str) -> bool:
    """Whether an image name leads outside the image folder: an absolute path, or one with a `..` part. (Judged
    from the name alone: links inside the image folder are its owner's, and followed.)"""
    return os.path.isabs(name) or ".." in Path(name).parts


def check_inside(splits: dict[str, list[Entry]], paths: tuple[Path, ...], image_dir: Path | None) -> None:
    """Refuse, in one line naming the first one and their count, image names that lead outside the image folder:
    a caption file must never make make_dataset.py read (and store) images from anywhere else."""
    bad = [e.filename for entries in splits.values() for e in entries if outside(e.filename)]
    if bad:
        folder = f"--image-dir {image_dir}" if image_dir is not None else "the image folder"
        names = "1 image name leads" if len(bad) == 1 else f"{len(bad)} image names lead"
        raise UserError(f"{', '.join(map(str, paths))}: {names} outside {folder}, the first {ascii(bad[0])}; an "
                        "image name is a path inside the image folder (no '..', not absolute): move the images in, or "
                        "choose the folder that holds them all as --image-dir")


def _read_any(source: CaptionInput, max_len: int, image_dir: Path | None) -> Captions:
    opened = [_open(p, source.format) for p in source.paths]
    fmt = opened[0][0]
    for path, (other, _) in zip(source.paths, opened):
        if other != fmt:
            raise UserError(f"--captions: {source.paths[0]} is {fmt} but {path} is {other}; give files of one format",
                            EXIT_BAD_OPTION)
    if fmt == "karpathy":
        given = [o for o, v in (("--split-lists", source.split_lists), ("--val-size", source.val_size),
                                ("--test-size", source.test_size)) if v is not None]
        if given:
            raise UserError(f"{given[0]}: Karpathy's JSON has its own split; leave out {' and '.join(given)}",
                            EXIT_BAD_OPTION)
        return _read_karpathy([(p, doc) for p, (_, doc) in zip(source.paths, opened)], max_len)

    images = _Captioned()
    for path, (_, content) in zip(source.paths, opened):
        if fmt == "flickr-token":
            _read_flickr_token(path, content, images)
        elif fmt == "csv":
            _read_csv(path, content, images, source.image_column, source.caption_column)
        elif fmt == "coco":
            _read_coco(path, content, images, image_dir)
        else:
            _read_jsonl(path, content, images)
    if not images.refs:
        raise UserError(f"{source.paths[0]}: no captions in it")
    assignment, split_from, warnings = _assign_splits(source, fmt, images)
    if images.repeats:
        warnings.insert(0, f"{len(images.repeats)} repeated (image, caption) rows kept once, the first at "
                           f"{images.repeats[0]}")
    left_out = len(images.refs) - sum(map(len, assignment.values()))
    splits: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    dropped: Counter = Counter()
    for split, names in assignment.items():
        for name in names:
            entry = _entry(name, images.refs[name], max_len)
            if entry is None:
                dropped[split] += 1
            else:
                splits[split].append(entry)
    return Captions(splits, dropped, split_from, left_out, warnings)


def detect_format(path: Path, text: str) -> str:
    """A caption file's format from its name, else its first line (a one-line JSON document reads as
    "json": Karpathy's or COCO's, told apart by their keys once parsed)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    first = next((line for line in _lines(text) if line.strip()), "").strip()
    if first.startswith("["):
        return "json"
    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except ValueError:  # the first line of a JSON document printed over several lines
            return "json"
        return "jsonl" if isinstance(obj, dict) and "image" in obj else "json"
    if _FLICKR_LINE.fullmatch(first):
        return "flickr-token"
    if any(d in first for d in CSV_DELIMITERS):
        return "csv"
    raise UserError(f"{path}: cannot tell its format; the formats are {', '.join(FORMATS)} "
                    "(docs/your_data.md): force one with --format")


def _open(path: Path, forced: str | None) -> tuple[str, object]:
    """(format, content): the text of a line format, the parsed document of a JSON one."""
    if forced == "karpathy":  # the same messages as ever for --karpathy-json
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            images = doc["images"]
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as err:
            raise UserError(f"{path}: not a Karpathy split JSON ({type(err).__name__}: {err})") from None
        return "karpathy", images
    text = _read_text(path)
    fmt = forced or detect_format(path, text)
    if fmt not in ("json", "coco"):
        return fmt, text
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
    if fmt == "json":
        if isinstance(doc, dict) and "annotations" in doc:
            fmt = "coco"
        elif isinstance(doc, dict) and isinstance(doc.get("images"), list):
            return "karpathy", doc["images"]
        else:
            raise UserError(f"{path}: JSON, but neither Karpathy's split JSON (\"images\" with \"sentences\") nor "
                            f"COCO's captions (\"images\" and \"annotations\"); the formats are {', '.join(FORMATS)}: "
                            "force one with --format")
    return fmt, doc


def _read_text(path: Path) -> str:
    """The file as text (UTF-8, a byte-order mark allowed); a file that is not is one line naming where."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({type(err).__name__}: {err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte {data[err.start]:#04x})") from None


def _lines(text: str) -> Iterator[str]:
    """A text file's lines (str.splitlines would also split inside a caption at \\x1c, \\u2028 and the like)."""
    return (line.rstrip("\r") for line in text.split("\n"))


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


def _entry(filename: str, references: list[list[str]], max_len: int, meta: dict | None = None) -> Entry | None:
    """The image's Entry, or None when none of its captions has 1..max_len tokens."""
    captions = [c for c in references if 0 < len(c) <= max_len]
    return Entry(filename, captions, references, meta or {}) if captions else None


# ---------------------------------------------------------------- Karpathy's split JSON

def _read_karpathy(docs: list[tuple[Path, object]], max_len: int) -> Captions:
    """Karpathy split JSONs -> entries per split. COCO's `restval` counts as train. Every field is type-checked;
    an image in two splits is refused (it would leak held-out images into training), one listed twice in a
    split is kept once."""
    splits: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    dropped: Counter = Counter()
    seen: dict[str, tuple[str, Path, int]] = {}  # filename -> (split, file, index) where it was first
    repeats: list[str] = []
    for json_path, images in docs:
        if not isinstance(images, list):
            raise UserError(f"{json_path}: \"images\" is {type(images).__name__}, not a list "
                            "(expected Karpathy's format)")
        for i, img in enumerate(images):
            split, filename, references = _karpathy_fields(img, i, json_path)
            split = "train" if split == "restval" else split
            if split not in splits:
                raise UserError(f"{json_path}: {ascii(filename)} has split {ascii(split)}; "
                                "expected train, restval, val or test")
            if filename in seen:
                first_split, first_path, first = seen[filename]
                if first_split != split:
                    of = "" if first_path == json_path else f" of {first_path}"
                    raise UserError(f"{json_path}: image {i}: {ascii(filename)} is in {split}, and in {first_split} as "
                                    f"image {first}{of}: an image in two splits leaks held-out images into training")
                repeats.append(f"{json_path}: image {i} ({ascii(filename)})")
                continue
            seen[filename] = (split, json_path, i)
            entry = _entry(filename, references, max_len, img.get("shapes", {}))
            if entry is None:
                dropped[split] += 1
            else:
                splits[split].append(entry)
    warnings = [f"{len(repeats)} images listed twice in one split kept once, the first at {repeats[0]}"] \
        if repeats else []
    return Captions(splits, dropped, "Karpathy JSON " + ", ".join(p.name for p, _ in docs), warnings=warnings)


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


# ---------------------------------------------------------------- raw captions: one image and caption at a time

class _Captioned:
    """Tokenised captions per image, images in the order they first appear; a repeated (image, caption) is
    kept once and its place remembered for the warning."""

    def __init__(self) -> None:
        self.refs: dict[str, list[list[str]]] = {}
        self.raw: dict[str, set[str]] = {}
        self.repeats: list[str] = []

    def add(self, image: object, caption: object, where: str) -> None:
        if why := _not_text(image):
            raise UserError(f"{where}: the image name is {why}")
        image = image.strip()
        if not image:
            raise UserError(f"{where}: no image name")
        if why := _not_text(caption):
            raise UserError(f"{where}: the caption of {ascii(image)} is {why}")
        caption = caption.strip()
        if not caption:
            raise UserError(f"{where}: empty caption for {ascii(image)}")
        tokens = tokenize(caption)
        if not tokens:
            raise UserError(f"{where}: the caption {ascii(caption)} of {ascii(image)} has no words")
        if caption in self.raw.setdefault(image, set()):
            self.repeats.append(f"{where} ({ascii(image)})")
            return
        self.raw[image].add(caption)
        self.refs.setdefault(image, []).append(tokens)


def _read_flickr_token(path: Path, text: str, images: _Captioned) -> None:
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        m = _FLICKR_LINE.fullmatch(line)
        if m is None:
            raise UserError(f"{path}: line {n}: expected <image>#<n><TAB><caption> (Flickr's token file), "
                            f"got {ascii(line[:60])}")
        images.add(m["image"], m["caption"], f"{path}: line {n}")


def _read_csv(path: Path, text: str, images: _Captioned, image_column: str, caption_column: str) -> None:
    header = next(_lines(text), "")
    delimiter = max(CSV_DELIMITERS, key=header.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    try:
        names = [name.strip() for name in next(reader, [])]
        missing = [c for c in (image_column, caption_column) if c not in names]
        if missing:
            raise UserError(f"{path}: no column {' or '.join(map(ascii, missing))}; its header has "
                            f"{', '.join(map(ascii, names)) or 'nothing'}: choose the columns with --image-column "
                            "and --caption-column")
        i, j = names.index(image_column), names.index(caption_column)
        for row in reader:
            if not any(cell.strip() for cell in row):  # a blank line
                continue
            where = f"{path}: line {reader.line_num}"
            if len(row) != len(names):
                raise UserError(f"{where}: {len(row)} fields, the header has {len(names)} "
                                f"(a caption holding {ascii(delimiter)} needs quotes)")
            images.add(row[i], row[j], where)
    except csv.Error as err:
        raise UserError(f"{path}: line {reader.line_num}: not CSV ({err})") from None


def _read_jsonl(path: Path, text: str, images: _Captioned) -> None:
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:
            raise UserError(f"{where}: not a JSON object ({type(err).__name__}: {err})") from None
        if not isinstance(obj, dict) or "image" not in obj or ("caption" in obj) == ("captions" in obj):
            raise UserError(f'{where}: expected {{"image": ..., "caption": "..."}} or '
                            '{"image": ..., "captions": [...]}')
        captions = [obj["caption"]] if "caption" in obj else obj["captions"]
        if not isinstance(captions, list) or not captions:
            raise UserError(f"{where}: \"captions\" is {ascii(captions)}, not a list of captions")
        for caption in captions:
            images.add(obj["image"], caption, where)


def _read_coco(path: Path, doc: object, images: _Captioned, image_dir: Path | None) -> None:
    """COCO caption annotations; each image must have a caption (an image without one is refused)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise UserError(f'{path}: expected COCO caption annotations ("images" and "annotations" lists)')
    m = _COCO_NAME.fullmatch(path.name)
    folder = m["folder"] if m and image_dir is not None and (image_dir / m["folder"]).is_dir() else ""
    names: dict[object, tuple[str, int]] = {}  # id -> (path under the image folder, index in images[])
    for i, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise UserError(f"{path}: images[{i}]: expected an object with an id and a file_name")
        if why := _not_text(img["file_name"]):
            raise UserError(f"{path}: images[{i}]: file_name is {why}")
        if img["id"] in names:
            raise UserError(f"{path}: images[{i}]: id {ascii(img['id'])} again (also images[{names[img['id']][1]}])")
        names[img["id"]] = (os.path.join(folder, img["file_name"]), i)
    captioned = set()
    for i, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise UserError(f"{where}: expected an object with an image_id and a caption")
        if ann["image_id"] not in names:
            raise UserError(f"{where}: image_id {ascii(ann['image_id'])} is not in images[]")
        images.add(names[ann["image_id"]][0], ann["caption"], where)
        captioned.add(ann["image_id"])
    for image_id, (name, i) in names.items():
        if image_id not in captioned:
            raise UserError(f"{path}: images[{i}] ({ascii(name)}) has no captions in annotations[]")


# ---------------------------------------------------------------- splits

def _assign_splits(source: CaptionInput, fmt: str,
                   images: _Captioned) -> tuple[dict[str, list[str]], str, list[str]]:
    """{split: image names} by the split lists (given, or Flickr8k's beside its token file), else seeded;
    where the split came from, for the summary; the warnings."""
    lists = source.split_lists
    if lists is None and fmt == "flickr-token":
        found = {s: source.paths[0].parent / name for s, name in FLICKR_SPLIT_LISTS.items()}
        lists = found if all(p.is_file() for p in found.values()) else None
    if lists is None:
        assignment = seeded_split(list(images.refs), source.val_size, source.test_size, source.split_seed)
        return assignment, (f"seeded (--split-seed {source.split_seed}): val {len(assignment['val'])}, "
                            f"test {len(assignment['test'])} of {len(images.refs)} images"), []
    if source.val_size is not None or source.test_size is not None:
        raise UserError("--val-size, --test-size: the split lists give the split; leave them out", EXIT_BAD_OPTION)
    assignment, warning = _split_by_lists(lists, images, source.paths)
    return (assignment, "split lists " + ", ".join(f"{s}={p.name}" for s, p in lists.items()),
            [warning] if warning else [])


def _split_by_lists(lists: dict[str, Path], images: _Captioned,
                    caption_files: tuple[Path, ...]) -> tuple[dict[str, list[str]], str | None]:
    """{split: image names} in each list's order, and a warning for names listed twice in one list. Without a
    train list, train is every other captioned image; with one, images that no list names are left out."""
    if not {"val", "test"} <= set(lists):
        raise UserError("--split-lists: give val=FILE and test=FILE (train=FILE too, or every other image is train)",
                        EXIT_BAD_OPTION)
    assignment: dict[str, list[str]] = {s: [] for s in SPLITS}
    listed: dict[str, tuple[str, str]] = {}  # image -> (split, where)
    repeats = []
    for split in SPLITS:
        if split not in lists:
            continue
        path = lists[split]
        for n, line in enumerate(_lines(_read_text(path)), 1):
            name = line.strip()
            if not name:
                continue
            where = f"{path}: line {n}"
            if name in listed:
                first_split, first = listed[name]
                if first_split != split:
                    raise UserError(f"{where}: {ascii(name)} is in {split}, and in {first_split} at {first}: "
                                    "an image in two splits leaks held-out images into training")
                repeats.append(f"{where} ({ascii(name)})")
                continue
            if name not in images.refs:
                raise UserError(f"{where}: {ascii(name)} has no captions in {', '.join(map(str, caption_files))}")
            listed[name] = (split, where)
            assignment[split].append(name)
    if "train" not in lists:
        assignment["train"] = [name for name in images.refs if name not in listed]
    warning = f"{len(repeats)} images listed twice in one split list kept once, the first at {repeats[0]}" \
        if repeats else None
    return assignment, warning


def split_count(size: float | None, n: int) -> int:
    """Images held out for a --val-size / --test-size of `size`: a count (>= 1), or a fraction (< 1) of n, at
    least 1."""
    size = HELD_OUT if size is None else size
    return int(size) if size >= 1 else max(1, round(size * n))


def seeded_split(images: list[str], val_size: float | None, test_size: float | None,
                 seed: int) -> dict[str, list[str]]:
    """{split: image names}: a seeded draw of val and test images, each split in the order of `images`. Only
    images are drawn, so an image's captions stay together; the same seed gives the same split."""
    n = len(images)
    n_val, n_test = split_count(val_size, n), split_count(test_size, n)
    if n_val + n_test >= n:
        raise UserError(f"--val-size, --test-size: {n_val} val and {n_test} test images leave no train images "
                        f"of {n}", EXIT_BAD_OPTION)
    held = random.Random(f"{seed}:split").sample(range(n), n_val + n_test)
    test, val = set(held[:n_test]), set(held[n_test:])
    return {"train": [im for i, im in enumerate(images) if i not in test and i not in val],
            "val": [im for i, im in enumerate(images) if i in val],
            "test": [im for i, im in enumerate(images) if i in test]}
