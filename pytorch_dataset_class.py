"""The data: `Vocab` (the word map, the one place that spells a special token), THE image preprocessing function
(used by make_dataset and inference), HDF5-backed datasets and `open_data`.

Shapes: N images per split, cpi captions per image, S image side, L = max_len + 2 caption slots,
P encoder regions, D encoder channels.

The HDF5 file is opened lazily, once per process: an h5py handle opened in `__init__` and copied
into forked DataLoader workers is not safe to share, which is why the tutorial this descends from
had to run with a single worker.

A split file is checked field by field when a dataset opens it (`_check_split`: layout, checksums,
every caption index and length); the HDF5 checksums catch damage where data is read, as one line
(`DamagedFile`), also inside DataLoader workers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import signal
import threading
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, DistributedSampler

from cli import UserError, printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow warns about images over 89 megapixels as "decompression bombs" (and refuses twice that).
# Real photos can be big (a 12000 x 12000 scan is 144 MP), so for the whole process allow up to
# 200 MP, silently; anything larger is refused with a UserError naming the file, never a Pillow
# warning line. A big JPEG decodes in draft mode at 1/2 to 1/8 scale, so it costs little memory;
# other formats (PNG, TIFF, ...) have no such mode and decode at full size: a 144 MP RGB PNG takes
# 576 MB for a moment (Pillow stores 4 bytes a pixel) and about 3 s, the price of accepting them.
MAX_IMAGE_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
MAX_IMAGE_SIZE = 4096  # pixels a side of a stored image: a 4096 px image through ResNet101 already takes tens of GB
# Tokens of a caption, by default: make_dataset.py keeps captions of up to this many words, decoding generates up to
# this many tokens (<end> included), and so does a greedy validation caption.
DEFAULT_MAX_LEN = 50

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

# Every HDF5 file the project writes (make_dataset.py, feature_cache.py) is in HDF5 1.10's format, whose
# metadata (superblock, object headers, chunk indexes) carry checksums, with fletcher32 checksums on every
# dataset's chunks, and no variable-length strings (attrs_to_write): a damaged file fails to open or to read,
# in one line (DamagedFile), where the older files let h5py read garbage, or loop forever on a damaged global
# heap (the variable-length strings' storage).
HDF5_FORMAT = "v110"
CHECKSUMS = {"fletcher32": True}
REBUILD = "rebuild it with make_dataset.py"
FEATURES_FIX = "delete it: train.py --cache-features builds it again"


class Vocab:
    """The word map and what follows from it: the inverse map, the special tokens' ids and the map's hash.

    The word map is `{word: index}` with the special tokens first, `<pad>` = 0 (make_dataset.py writes it as
    word_map.json; checkpoints store it as a plain dict beside its hash). This class is the only place that
    spells a special token.
    """

    PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
    SPECIAL = (PAD, START, END, UNK)  # indices 0..3 of every word map make_dataset.py writes
    MARKERS = (START, END, PAD)  # what frames a caption: decoding needs them, decode() drops them
    NEVER_GENERATED = (PAD, START)  # tokens a decoded caption never contains

    def __init__(self, word_map: dict[str, int], sha1: str | None = None) -> None:
        """`sha1`: the hash of the word_map.json it was read from (checkpoints store it); unset, that of the file
        `to_json` writes."""
        self.word_map = dict(word_map)
        # None where the map lacks the token (a checkpoint's word map needs only the markers)
        self.pad, self.start, self.end, self.unk = (self.word_map.get(t) for t in self.SPECIAL)
        self._sha1 = sha1

    @functools.cached_property
    def words(self) -> dict[int, str]:
        """The inverse map: index -> word (built when first needed: decoding takes plain word maps too)."""
        return {i: w for w, i in self.word_map.items()}

    @classmethod
    def of(cls, vocab: Vocab | dict[str, int]) -> Vocab:
        """A Vocab, or a plain {word: index} dict (a checkpoint's word_map) made one."""
        return vocab if isinstance(vocab, Vocab) else cls(vocab)

    @classmethod
    def build(cls, captions: list[list[str]], min_word_freq: int) -> Vocab:
        """The special tokens first, then the words with count >= min_word_freq by (-count, word)."""
        counts = Counter(w for c in captions for w in c)
        words = sorted((w for w, n in counts.items() if n >= min_word_freq and w not in cls.SPECIAL),
                       key=lambda w: (-counts[w], w))
        return cls({w: i for i, w in enumerate(list(cls.SPECIAL) + words)})

    @classmethod
    def read(cls, path: str | os.PathLike) -> Vocab:
        """word_map.json -> Vocab whose hash is that of the file's bytes. OSError when it cannot be read, ValueError
        when it is not a {word: index} JSON object with the indices 0..V-1 (each index once: anything else would
        index outside the model's embedding and output layers)."""
        raw = Path(path).read_bytes()
        word_map = json.loads(raw)
        if not (isinstance(word_map, dict) and all(type(i) is int for i in word_map.values())
                and sorted(word_map.values()) == list(range(len(word_map)))):
            raise ValueError(f"{path}: not a {{word: index}} JSON object with the indices 0..V-1")
        return cls(word_map, cls.hash(raw))

    @staticmethod
    def hash(source: bytes | str | os.PathLike) -> str:
        """A word map's identity: the sha1 of word_map.json's bytes (`source`: the bytes, or the file). The HDF5
        files and checkpoints store it, so a mismatched pair is caught."""
        return hashlib.sha1(source if isinstance(source, bytes) else Path(source).read_bytes()).hexdigest()

    @property
    def sha1(self) -> str:
        if self._sha1 is None:
            self._sha1 = self.hash(self.to_json())
        return self._sha1

    def to_json(self) -> bytes:
        """word_map.json's bytes (ASCII: json escapes the rest)."""
        return json.dumps(self.word_map, indent=1).encode()

    def encode(self, tokens: list[str], max_len: int) -> tuple[list[int], int]:
        """Words -> `<start> w1..wn <end> <pad>...` as max_len + 2 indices (unknown words <unk>), and n + 2."""
        ids = [self.start] + [self.word_map.get(w, self.unk) for w in tokens] + [self.end]
        return ids + [self.pad] * (max_len + 2 - len(ids)), len(ids)

    def decode(self, tokens: list[int]) -> list[str]:
        """Word indices -> words, without <start>, <end>, <pad>; an index outside the map reads <unk>."""
        return [w for w in (self.words.get(t, self.UNK) for t in tokens) if w not in self.MARKERS]

    def __len__(self) -> int:
        return len(self.word_map)

    def __eq__(self, other: object) -> bool:
        """The same words at the same indices, whatever the bytes of the files they came from."""
        return isinstance(other, Vocab) and self.word_map == other.word_map


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled down, transparency composited on white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float32)
        # 16-bit PNGs open as I;16 (or I in older Pillow): 0..65535. A plain convert("RGB") clips
        # them to 255, i.e. white. An "I" image whose values fit in 8 bits is left as it is.
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), "L")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Dropping alpha would show whatever colour transparent pixels store (often black).
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy: 576 MB for 144 MP


def _register_heif() -> bool:
    """Let Pillow open HEIC/HEIF photos (what phones take) through the optional pillow-heif plugin, where it is
    installed; whether it is."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


HEIF_PLUGIN = _register_heif()
# The brands of an ISO media file's `ftyp` box that say HEIC/HEIF (bytes 8-12 of the file)
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def is_heif(source: str | os.PathLike | typing.BinaryIO) -> bool:
    """Whether the file (a path, or an open binary file, left at its position) starts as a HEIC/HEIF photo does."""
    try:
        if hasattr(source, "read"):
            where = source.tell()
            source.seek(0)
            head = source.read(12)
            source.seek(where)
        else:
            with open(source, "rb") as f:
                head = f.read(12)
    except (OSError, ValueError):
        return False
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def preprocess_image(img_or_path: str | os.PathLike | Image.Image, size: int) -> np.ndarray:
    """Open (or take) an image, convert it to RGB and resize it to size x size.

    :param img_or_path: a file path or a PIL image
    :param size: output side S
    :return: uint8 array of shape (3, S, S)
    :raises UserError: naming the file when it is missing, unreadable or over MAX_IMAGE_PIXELS
    """
    is_image = isinstance(img_or_path, Image.Image)
    name = printable((getattr(img_or_path, "filename", "") or "<image>") if is_image else str(img_or_path))
    try:
        with warnings.catch_warnings():
            # Pillow's warnings (odd EXIF, palette transparency, ...) are about things handled here:
            # they would only be stray lines on stderr. Over MAX_IMAGE_PIXELS Pillow only warns (it
            # raises over twice that): make that fail too, as a UserError below.
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            arr = _decode(img_or_path, name, size)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{name}: image not found") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"{name}: image too large ({err})") from None
    except Exception as err:  # Pillow plugins raise many exception types on corrupt files
        if isinstance(err, UnidentifiedImageError) and not (HEIF_PLUGIN or is_image) and is_heif(img_or_path):
            raise UserError(f"{name}: cannot read image: a HEIC/HEIF photo, which Pillow reads only with the "
                            "pillow-heif plugin (pip install pillow-heif)") from None
        detail = (str(err).strip().splitlines() or [""])[0]
        raise UserError(f"{name}: cannot read image ({type(err).__name__}: {detail})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, S, S)


def _decode(img_or_path: str | os.PathLike | Image.Image, name: str, size: int) -> np.ndarray:
    """preprocess_image's work, without its error handling: -> uint8 (S, S, 3)."""
    opened = not isinstance(img_or_path, Image.Image)
    img = Image.open(img_or_path) if opened else img_or_path
    with img if opened else contextlib.nullcontext():  # close the file we opened, not the caller's image
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise UserError(f"{name}: {w} x {h} pixels is over the limit of {MAX_IMAGE_PIXELS:,} pixels")
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers size x size: a
            # big photo then never decodes at full size, and we resize only once.
            img.draft("RGB", (size, size))
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: phone photos are often rotated
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if img.size != (size, size):
            # Bilinear, as the reference preprocessing (imresize): Pillow widens the filter when it
            # shrinks, so this is antialiased, and twice as fast as bicubic.
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)  # (S, S, 3)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, S, S) -> float32 (..., 3, S, S) scaled to [0, 1], ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def to_model_input(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch as the datasets give it -> what the model takes, on `device`: uint8 images (B, 3, S, S)
    are normalised there, float16 cached annotations (B, P, D) become float32 there.

    Datasets hand over the stored type, so DataLoader workers pass 4x (images) or 2x (annotations)
    fewer bytes to the main process, and to the GPU, than float32 would be.
    """
    x = x.to(device, non_blocking=True)
    return normalize(x) if x.dtype == torch.uint8 else x.float()


def _python(value):
    """HDF5 attribute -> plain Python (numpy scalars and bytes are awkward in configs and JSON)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(obj: h5py.HLObject) -> dict:
    """An HDF5 file's or dataset's attributes as plain Python values."""
    return {k: _python(v) for k, v in obj.attrs.items()}


def attrs_to_write(attrs: dict) -> dict:
    """Attribute values as the project writes them: a str as fixed-length bytes. h5py would store it as a
    variable-length string in HDF5's global heap, which no checksum covers, and a few zeroed bytes there send
    HDF5 into an endless loop; read_attrs turns the bytes back into str."""
    return {k: np.bytes_(v.encode("utf-8", "surrogateescape")) if isinstance(v, str) else v for k, v in attrs.items()}


class DamagedFile(UserError):
    """A data or feature file that h5py cannot read: its checksums fail, or it is truncated or corrupt.

    Raised in a DataLoader worker, it reaches the main process as DamagedFile("Caught DamagedFile in
    DataLoader worker process 0. Original Traceback ...") (torch rebuilds exceptions from their traceback's
    text); the constructor keeps the traceback's last line, the message, so the user still reads one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith(f"Caught {type(self).__name__} "):
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def _h5_error(err: Exception) -> str:
    """h5py's error message, with a plain word for what HDF5's checksums found."""
    msg = f"{type(err).__name__}: {err}" if isinstance(err, KeyError) else str(err)
    return f"checksum mismatch: {msg}" if "checksum" in msg or "filter returned failure" in msg else msg


@contextlib.contextmanager
def _reading(path: Path, fix: str) -> Iterator[None]:
    """Turn an h5py error while reading `path` into one line: a DamagedFile saying how to `fix` it."""
    try:
        yield
    except (OSError, KeyError) as err:
        raise DamagedFile(f"{path}: damaged, truncated or corrupt ({_h5_error(err)}); {fix}") from None


def stored_here_problem(f: h5py.File) -> str | None:
    """What of `f` is not stored in the file itself, or None: every object must be reached by a hard link (not a
    soft or external link) and every dataset keep its data in the file (not virtual, no external raw storage).
    A data folder someone downloaded could otherwise pull any HDF5 file of the user's (another data set's images
    or captions) into training, or into the references that evaluate.py writes. Checked before any dataset is
    read: reading one follows its link."""
    seen = set()

    def visit(group: h5py.Group, prefix: str) -> str | None:
        for name in group.id:  # the link names (bytes), listed without following them
            path = prefix + name.decode("utf-8", "surrogateescape")
            kind = group.id.links.get_info(name).type
            if kind == h5py.h5l.TYPE_EXTERNAL:
                link = group.get(name, getlink=True)
                return f"dataset {path} is an external link to {link.filename}:{link.path}"
            if kind == h5py.h5l.TYPE_SOFT:
                return f"dataset {path} is a soft link to {group.get(name, getlink=True).path}"
            if kind != h5py.h5l.TYPE_HARD:
                return f"dataset {path} is a user-defined link"
            obj = group[name]
            if obj.id in seen:  # a group linked twice (or into itself)
                continue
            seen.add(obj.id)
            if isinstance(obj, h5py.Group):
                problem = visit(obj, path + "/")
                if problem:
                    return problem
            elif isinstance(obj, h5py.Dataset) and obj.is_virtual:
                return f"dataset {path} is virtual (its data lies in other files)"
            elif isinstance(obj, h5py.Dataset) and obj.external:
                return f"dataset {path} keeps its data in the external file {obj.external[0][0]}"
        return None

    return visit(f, "/")


def check_stored_here(f: h5py.File, path: str | os.PathLike, fix: str) -> None:
    """A UserError of one line naming the file `path` (open as `f`) and the dataset, when something of it is not
    stored in it (stored_here_problem); `fix` says what to do."""
    problem = stored_here_problem(f)
    if problem:
        raise UserError(f"{path}: {problem}, not stored in the file; a data file is read only from itself ({fix})")


def _int_attr(attrs: dict, name: str, low: int) -> int:
    value = attrs.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"attribute {name} is {value!r}, not an integer >= {low}")
    return value


def _check_split(f: h5py.File, attrs: dict) -> tuple[int, int]:
    """Every field of a split file that its readers rely on (data/README.md), checked once on open, cheaply:
    the layout, the checksums, and every caption index and length (vectorised, in blocks). -> (N, cpi).
    A field that is wrong raises ValueError, saying which. (That the images are image_size pixels is checked
    where one is read, _SplitFile._x: a checkpoint of another image size is refused first, saying so.)"""
    cpi, size = _int_attr(attrs, "captions_per_image", 1), _int_attr(attrs, "image_size", 1)
    vocab, max_len = _int_attr(attrs, "vocab_size", 4), _int_attr(attrs, "max_len", 1)
    images, captions, lengths = f["images"], f["captions"], f["caption_lengths"]
    n = images.shape[0] if images.ndim else 0
    side = images.shape[-1] if images.ndim else size
    expected = {"images": ((n, 3, side, side), "u"), "captions": ((n * cpi, max_len + 2), "iu"),
                "caption_lengths": ((n * cpi,), "iu"), "filenames": ((n,), "SO"), "references": ((n,), "SO"),
                "meta": ((n,), "SO")}
    for name, (shape, kinds) in expected.items():
        ds = f[name]
        if ds.shape != shape or ds.dtype.kind not in kinds or (name == "images" and ds.dtype != np.uint8):
            raise ValueError(f"{name} is {ds.dtype} {ds.shape}, expected shape {shape}")
        if not ds.fletcher32:
            raise ValueError(f"{name} has no checksums (written by an older make_dataset.py)")
    block = 2**16  # rows: a few MB at a time, whatever the split's size
    for start in range(0, n * cpi, block):
        rows = captions[start:start + block]  # (b, L)
        if rows.min() < 0 or rows.max() >= vocab:
            raise ValueError(f"captions hold word indices outside the vocabulary [0, {vocab})")
        lens = lengths[start:start + block]  # (b,)
        if lens.min() < 2 or lens.max() > max_len + 2:
            raise ValueError(f"caption_lengths outside [2, {max_len + 2}]")
    return n, cpi


def _token_lists(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(c, list) and all(isinstance(t, str) for t in c) for c in value)


IN_MEMORY_BYTES = 256 * 2**20  # a split file's images and captions up to this size are read into memory whole


class _SplitFile(Dataset):
    """Shared plumbing: the file checked and small metadata read once, the HDF5 file opened lazily in each
    process."""

    def __init__(self, h5_path: str | os.PathLike, feature_path: str | os.PathLike | None = None) -> None:
        self.h5_path = Path(h5_path)
        self.feature_path = Path(feature_path) if feature_path is not None else None
        if not self.h5_path.is_file():
            raise UserError(f"{self.h5_path}: HDF5 split file not found (run make_dataset.py first)")
        try:  # a short-lived handle: nothing open is left behind to be copied into workers
            with h5py.File(self.h5_path, "r") as f:
                check_stored_here(f, self.h5_path, REBUILD)
                self.attrs = read_attrs(f)
                self.n_images, self.cpi = _check_split(f, self.attrs)
        except (OSError, KeyError, TypeError, ValueError) as err:
            # A truncated file fails here ("truncated file: eof = ..."), as does an HDF5 file from elsewhere.
            raise UserError(f"{self.h5_path}: not a readable make_dataset.py split file, damaged, truncated or "
                            f"corrupt ({_h5_error(err)}); {REBUILD}") from None
        self.n_captions = self.n_images * self.cpi
        if self.feature_path is not None:
            if not self.feature_path.is_file():
                raise UserError(f"{self.feature_path}: feature file not found")
            with _reading(self.feature_path, FEATURES_FIX), h5py.File(self.feature_path, "r") as f:
                check_stored_here(f, self.feature_path, FEATURES_FIX)
                ds = f.get("features")
                if not (isinstance(ds, h5py.Dataset) and ds.ndim == 3 and ds.shape[0] == self.n_images
                        and ds.dtype == np.float16 and ds.fletcher32):
                    raise UserError(f"{self.feature_path}: no checksummed float16 'features' dataset with "
                                    f"{self.n_images} rows to match {self.h5_path}; {FEATURES_FIX}")
        self._h5: h5py.File | None = None
        self._features: h5py.Dataset | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._pid: int | None = None

    def _file(self) -> h5py.File:
        # Reopen after a fork: a DataLoader worker must not reuse its parent's HDF5 handle.
        if self._h5 is None or self._pid != os.getpid():
            with _reading(self.h5_path, REBUILD):
                self._h5 = h5py.File(self.h5_path, "r")
            self._arrays = self._read_small()
            if self.feature_path is not None:
                with _reading(self.feature_path, FEATURES_FIX):
                    self._features = h5py.File(self.feature_path, "r")["features"]
            self._pid = os.getpid()
        return self._h5

    def _read_small(self) -> dict[str, np.ndarray]:
        """A small split's images and captions, read whole (once per process), else {}. One HDF5 read per item and
        dataset cost the demo's training 3.5 s of CPU an epoch (4,000 images of 64 px, 49 MB), a tenth of its time.
        A split that fails to read whole (a damaged chunk) is read item by item, which names the item that fails."""
        names = ("captions", "caption_lengths") + (("images",) if self.feature_path is None else ())
        try:
            if sum(self._h5[n].nbytes for n in names) > IN_MEMORY_BYTES:
                return {}
            return {n: self._h5[n][()] for n in names}
        except OSError:
            return {}

    def _dataset(self, name: str) -> np.ndarray | h5py.Dataset:
        """One of the split's datasets: its copy in memory when _read_small made one, else the HDF5 dataset."""
        f = self._file()  # (re)opens the file, and reads a small split whole, in this process
        return self._arrays[name] if name in self._arrays else f[name]

    def __getstate__(self) -> dict:
        # h5py handles cannot be pickled (spawn-started workers); each process opens its own.
        state = self.__dict__.copy()
        state.update(_h5=None, _features=None, _arrays={}, _pid=None)
        return state

    def _x(self, image_index: int) -> torch.Tensor:
        """The stored image uint8 (3, S, S), or its cached encoder annotations float16 (P, D); the
        model takes them through to_model_input."""
        self._file()  # opens the file and the feature cache in this process
        if self._features is not None:
            with _reading(self.feature_path, FEATURES_FIX):
                return torch.from_numpy(self._features[image_index])  # (P, D)
        with _reading(self.h5_path, REBUILD):
            image = self._dataset("images")[image_index]  # (3, S, S)
        if image.shape[-1] != self.attrs["image_size"]:
            raise DamagedFile(f"{self.h5_path}: holds {image.shape[-1]} px images, but its image_size attribute "
                              f"says {self.attrs['image_size']}; {REBUILD}")
        return torch.from_numpy(image)

    def _rows(self, name: str, rows: int | slice) -> torch.Tensor:
        """Rows of the captions or caption_lengths dataset as int64."""
        with _reading(self.h5_path, REBUILD):
            return torch.from_numpy(np.asarray(self._dataset(name)[rows], dtype=np.int64))

    def _read_strings(self, name: str) -> list[str]:
        with _reading(self.h5_path, REBUILD), h5py.File(self.h5_path, "r") as f:
            try:
                return list(f[name].asstr()[()])
            except UnicodeDecodeError as err:
                raise DamagedFile(f"{self.h5_path}: {name} is not UTF-8 text ({err}); {REBUILD}") from None

    def _read_json(self, name: str, valid: Callable[[object], bool], what: str) -> list:
        """Dataset `name`'s strings parsed as JSON, each checked by `valid` (it is `what`)."""
        try:
            values = [json.loads(t) for t in self._read_strings(name)]
        except (ValueError, RecursionError) as err:
            raise DamagedFile(f"{self.h5_path}: {name} is not JSON text ({err}); {REBUILD}") from None
        if not all(map(valid, values)):
            raise DamagedFile(f"{self.h5_path}: {name} holds something else than {what}; {REBUILD}")
        return values


class CaptionDataset(_SplitFile):
    """One item per caption (training): (x, caption int64 (L,), length int64 scalar).

    x is the image uint8 (3, S, S), or with `feature_path` the cached encoder annotations float16
    (P, D), of image i // cpi: to_model_input makes them the model's input.
    """

    def __len__(self) -> int:
        return self.n_captions

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        caption = self._rows("captions", i)  # (L,)
        length = self._rows("caption_lengths", i)  # ()
        return self._x(i // self.cpi), caption, length


class ImageDataset(_SplitFile):
    """One item per image (validation, evaluation): (x, captions int64 (cpi, L), lengths (cpi,), index)."""

    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        rows = slice(i * self.cpi, (i + 1) * self.cpi)
        captions = self._rows("captions", rows)  # (cpi, L)
        lengths = self._rows("caption_lengths", rows)  # (cpi,)
        return self._x(i), captions, lengths, i

    def references(self) -> list[list[list[str]]]:
        """All raw reference captions per image (Karpathy tokens, never <unk>)."""
        return self._read_json("references", _token_lists, "lists of token lists")

    def filenames(self) -> list[str]:
        return self._read_strings("filenames")

    def meta(self) -> list[dict]:
        """Extra ground truth per image (the shapes entry for shapes; {} for real data)."""
        return self._read_json("meta", lambda m: isinstance(m, dict), "JSON objects")


# ----------------------------------------------------------------------------------------------
# A processed data folder, as training opens it


@dataclass
class DataInfo:
    folder: Path
    vocab: Vocab  # word_map.json, its hash that of the file
    image_size: int
    dataset: str
    captions_per_image: int


def open_data(data: str | os.PathLike) -> DataInfo:
    """Check a processed data folder for training; every problem is one UserError line saying what to do."""
    folder = Path(data)
    hint = "build it with make_dataset.py"
    if not folder.is_dir():
        raise UserError(f"--data {folder}: processed data folder not found ({hint})")
    wm_path = folder / "word_map.json"
    if not wm_path.is_file():
        raise UserError(f"--data {folder}: word_map.json not found ({hint})")
    try:
        vocab = Vocab.read(wm_path)
    except (OSError, ValueError, RecursionError):
        raise UserError(f"--data {folder}: word_map.json is not a {{word: index}} JSON object with the indices "
                        f"0..V-1 ({hint})") from None
    missing = [w for w in Vocab.SPECIAL if w not in vocab.word_map]
    if missing:
        raise UserError(f"--data {folder}: word_map.json lacks {', '.join(missing)} ({hint})")
    attrs = {}
    for split in ("train", "val"):
        attrs[split] = _split_attrs(folder, split, hint)
        built_with = str(attrs[split].get("word_map_sha1", ""))
        if built_with != vocab.sha1:
            raise UserError(f"--data {folder}: word_map.json (sha1 {vocab.sha1[:12]}) is not the word map {split}.h5 "
                            f"was built with (sha1 {built_with[:12] or 'missing'}); rebuild the folder with "
                            "make_dataset.py")
    a = attrs["train"]
    return DataInfo(folder, vocab, a["image_size"], str(a.get("dataset", folder.name)), a["captions_per_image"])


def _split_attrs(folder: Path, split: str, hint: str) -> dict:
    """The attributes of a split file of `folder`, checked to be there, readable and holding images."""
    path = folder / f"{split}.h5"
    if not path.is_file():
        raise UserError(f"--data {folder}: {split}.h5 not found ({hint})")
    try:
        with h5py.File(path, "r") as f:
            with _reading(path, REBUILD):  # it opens every object: damage is found here, as the datasets find it
                check_stored_here(f, path, REBUILD)
            attrs = read_attrs(f)
            n_images = len(f["images"])
        for name in ("image_size", "captions_per_image"):
            _int_attr(attrs, name, 1)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"--data {path}: not a readable processed HDF5 file ({_h5_error(err)}); {hint}") from None
    if n_images == 0:
        raise UserError(f"--data {path}: holds no images; {hint}")
    return attrs


class EpochSampler(DistributedSampler):
    """DistributedSampler (its shuffle is a torch.Generator seeded with seed + epoch, so an epoch's order
    never depends on what ran before) that can skip the steps a run resumed mid-epoch already took.
    Without torchrun it is used with one replica, so both cases share one code path."""

    skip = 0  # samples of the current epoch already trained on by this process

    def __iter__(self):  # type: ignore[override]
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C in a terminal, and SIGTERM from a scheduler or systemd, reach every
    process of the group; a worker that died of one would make the main process fail instead of saving and
    stopping cleanly. So a worker ignores SIGINT, and SIGTERM unless the main process sent it: the main process
    ends its workers through the loader's queues, but at exit multiprocessing ends leftover ones with SIGTERM
    and then waits for them, which a worker ignoring every SIGTERM would turn into a hang."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: SIGTERM keeps its default, a group SIGTERM ends the workers
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the block

    def watch() -> None:  # sigwaitinfo says who sent the signal, which a handler cannot
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
