"""The built-in synthetic "shapes" dataset: a generator in Karpathy's split format and a scorer.

Each image shows one or two coloured shapes on a plain light background, captioned from a few
templates ("a small red circle to the left of a blue square"). It is small enough to learn on a
laptop CPU in minutes, and unlike BLEU its scorer says exactly what a caption got right: the
objects (colour and shape) and, for two objects, their spatial relation.

Ground truth, stored in every image entry of `dataset_shapes.json` under "shapes":
    {"objects": [{"shape", "color", "size", "cx", "cy"}, ...], "relation": null | "left" | ...}
`cx`, `cy` are the object's centre as fractions of the image side (x grows right, y grows down);
`relation` says where objects[0] is relative to objects[1].
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from cli import UserError
from files import fsync, process_alive

SHAPES = ("circle", "square", "triangle")
# Pure, far-apart colours: the point is to test attention and grammar, not colour naming.
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 225), "yellow": (235, 200, 0)}
SIZES = {"small": 0.18, "large": 0.30}  # side of the object's bounding box / image side
BACKGROUND = (240, 240, 240)
SUPERSAMPLE = 4  # draw at 4x and downsample with LANCZOS: clean anti-aliased edges at 64 px
P_ONE_OBJECT = 0.3
MAX_TOKENS = 12
JSON_NAME = "dataset_shapes.json"
# The demo's model for these images: ModelConfig fields as train.py options (demo.py trains it, bench.py measures
# decoding with the same sizes).
DEMO_MODEL = {"encoder": "smallcnn", "encoded_size": 8, "embed_dim": 128, "attention_dim": 128,
              "decoder_dim": 256, "dropout": 0.0, "position": "coords", "fine_tune_encoder": True}
DEMO_IMAGE_SIZE = 64
GENERATED_NAME = re.compile(r"^shapes_\d{6}\.png$")  # what an images folder of ours holds
STAGING_NAME = re.compile(r"^\.images\.(?P<pid>\d+)\.[^.]+\.tmp$")  # generate_shapes' temporary folders

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Every relation phrase the templates use, and the only ones the scorer accepts.
RELATION_PHRASES = {
    ("to", "the", "left", "of"): "left", ("left", "of"): "left",
    ("to", "the", "right", "of"): "right", ("right", "of"): "right",
    ("above",): "above", ("below",): "below",
}
ONE_OBJECT_PREFIXES = ((), ("there", "is"), ("a", "picture", "of"))
TWO_OBJECT_PREFIXES = ((), ("there", "is"))


def _sample_objects(rng: random.Random) -> dict:
    """One image's ground truth: 1 or 2 objects, and for 2 a clear, non-overlapping relation."""
    n = 1 if rng.random() < P_ONE_OBJECT else 2
    objects = []
    for _ in range(n):
        while True:
            obj = {"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
                   "size": rng.choice(list(SIZES))}
            # Two objects never share both colour and shape, so a caption can always tell them apart.
            if not any(o["shape"] == obj["shape"] and o["color"] == obj["color"] for o in objects):
                objects.append(obj)
                break
    pad = 0.04  # keep every object clear of the border
    if n == 1:
        h = SIZES[objects[0]["size"]] / 2
        objects[0]["cx"] = rng.uniform(h + pad, 1 - h - pad)
        objects[0]["cy"] = rng.uniform(h + pad, 1 - h - pad)
        relation = None
    else:
        h0, h1 = (SIZES[o["size"]] / 2 for o in objects)
        main, other = ("cx", "cy") if rng.random() < 0.5 else ("cy", "cx")
        while True:
            a0, a1 = rng.uniform(h0 + pad, 1 - h0 - pad), rng.uniform(h1 + pad, 1 - h1 - pad)
            b0, b1 = rng.uniform(h0 + pad, 1 - h0 - pad), rng.uniform(h1 + pad, 1 - h1 - pad)
            # Well apart along the relation's axis (so the boxes never overlap), and offset by
            # clearly less along the other one, so "left of" vs "above" is never ambiguous.
            if abs(a0 - a1) >= h0 + h1 + 0.08 and abs(b0 - b1) <= 0.4 * abs(a0 - a1):
                break
        objects[0][main], objects[1][main] = a0, a1
        objects[0][other], objects[1][other] = b0, b1
        if main == "cx":
            relation = "left" if a0 < a1 else "right"
        else:
            relation = "above" if a0 < a1 else "below"
    # Fixed key order (and rounding) so the JSON reads the same for every entry.
    objects = [{"shape": o["shape"], "color": o["color"], "size": o["size"],
                "cx": round(o["cx"], 4), "cy": round(o["cy"], 4)} for o in objects]
    return {"objects": objects, "relation": relation}


def _noun_phrase(obj: dict, with_size: bool) -> list[str]:
    return ["a"] + ([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]]


def _caption(truth: dict, rng: random.Random) -> list[str]:
    """One caption naming every object's colour and shape (and the relation for two objects)."""
    objects = truth["objects"]
    if len(objects) == 1:
        tokens = list(rng.choice(ONE_OBJECT_PREFIXES)) + _noun_phrase(objects[0], rng.random() < 0.5)
    else:
        first, second, relation = objects[0], objects[1], truth["relation"]
        if rng.random() < 0.5:  # name the other object first, with the mirrored relation
            first, second, relation = second, first, OPPOSITE[relation]
        phrase = rng.choice([p for p, r in RELATION_PHRASES.items() if r == relation])
        tokens = (list(rng.choice(TWO_OBJECT_PREFIXES)) + _noun_phrase(first, rng.random() < 0.5)
                  + list(phrase) + _noun_phrase(second, rng.random() < 0.5))
    while len(tokens) > MAX_TOKENS:  # drop optional size words until the caption is short enough
        tokens.remove(next(t for t in tokens if t in SIZES))
    return tokens


def _captions(truth: dict, rng: random.Random, k: int = 5) -> list[list[str]]:
    """k different captions when the templates allow it (they always do for k = 5)."""
    captions: list[list[str]] = []
    for _ in range(50 * k):
        tokens = _caption(truth, rng)
        if tokens not in captions:
            captions.append(tokens)
        if len(captions) == k:
            break
    while len(captions) < k:
        captions.append(_caption(truth, rng))
    return captions


def render(truth: dict, image_size: int) -> Image.Image:
    """Draw the ground truth's objects: an RGB image of image_size x image_size."""
    side = image_size * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in truth["objects"]:
        cx, cy, h = obj["cx"] * side, obj["cy"] * side, SIZES[obj["size"]] * side / 2
        color = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=color)
        elif obj["shape"] == "square":
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=color)
        else:
            draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=color)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _render_to_file(job: tuple[str, dict, int]) -> None:
    path, truth, image_size = job
    render(truth, image_size).save(path, format="PNG")


def generate_shapes(out_dir: str | os.PathLike, n_train: int = 4000, n_val: int = 250, n_test: int = 500,
                    image_size: int = 64, seed: int = 0, workers: int | None = None,
                    progress: bool = True) -> Path:
    """Write `out_dir/images/*.png` and `out_dir/dataset_shapes.json` (Karpathy format).

    Deterministic: the same arguments give the same JSON and image bytes. Returns the JSON path.
    The whole set is rendered into a hidden temporary folder and swapped in when complete
    (`_swap_in`), so a run killed while rendering leaves the previous set as it was, and the JSON
    never describes images of another run. An `images` folder holding anything the generator did
    not write is refused (UserError): it is replaced as a whole, so it must be the generator's.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    _check_generated(image_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_folders(out_dir)
    rng = random.Random(seed)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    # The pid in the name (files.atomic_path's pattern) lets a later run tell a dead run's folder from a live one's.
    staging = Path(tempfile.mkdtemp(prefix=f".images.{os.getpid()}.", suffix=".tmp", dir=out_dir))
    try:
        (staging / "images").mkdir()
        entries, jobs = [], []
        for i, split in enumerate(splits):
            truth = _sample_objects(rng)
            captions = _captions(truth, rng)
            filename = f"shapes_{i:06d}.png"
            entries.append({
                "filename": filename, "imgid": i, "split": split,
                "sentences": [{"tokens": t, "raw": " ".join(t), "imgid": i, "sentid": 5 * i + j}
                              for j, t in enumerate(captions)],
                "sentids": [5 * i + j for j in range(len(captions))],
                "shapes": truth,
            })
            jobs.append((str(staging / "images" / filename), truth, image_size))
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        bar = dict(total=len(jobs), desc="render shapes", unit="img", disable=not progress)
        if workers > 1 and len(jobs) > 200:
            with Pool(workers) as pool:
                for _ in tqdm(pool.imap_unordered(_render_to_file, jobs, chunksize=64), **bar):
                    pass
        else:
            for job in tqdm(jobs, **bar):
                _render_to_file(job)
        (staging / JSON_NAME).write_text(json.dumps({"dataset": "shapes", "images": entries}))
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / JSON_NAME


def _check_generated(image_dir: Path) -> None:
    """Refuse to replace an `images` folder (or file) that holds anything but the generator's PNGs."""
    if not image_dir.exists():
        return
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: is a file; the shapes generator writes its images folder there "
                        "(choose another --raw-dir)")
    foreign = next((p.name for p in image_dir.iterdir() if not GENERATED_NAME.match(p.name)), None)
    if foreign is not None:
        raise UserError(f"{image_dir}: holds {foreign!r}, which the shapes generator did not write; it replaces "
                        "that folder as a whole, so choose another --raw-dir")


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Move staging's images folder and JSON to their final names in out_dir.

    The old JSON goes first and the new one comes last: between the renames (microseconds) a kill
    leaves a folder without its JSON, which make_dataset regenerates, never a JSON beside images of
    another run.
    """
    json_path, image_dir = out_dir / JSON_NAME, out_dir / "images"
    if json_path.exists():
        os.replace(json_path, staging / f"old-{JSON_NAME}")
    if image_dir.exists():
        os.replace(image_dir, staging / "old-images")
    os.replace(staging / "images", image_dir)
    os.replace(staging / JSON_NAME, json_path)
    fsync(out_dir)  # the renames reach the disk too (power loss, not only a kill)


def _remove_stale_folders(out_dir: Path) -> None:
    """Delete the staging folders of generator runs that were killed (their pid is gone)."""
    for p in out_dir.iterdir():
        m = STAGING_NAME.match(p.name)
        if m and p.is_dir() and not process_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def _mentions(tokens: list[str]) -> tuple[list[tuple[str | None, str, int, int]], int]:
    """Objects named in a caption: (colour, shape, first index, shape index), and stray colours."""
    mentions, stray = [], 0
    for i, tok in enumerate(tokens):
        if tok in SHAPES:
            color = tokens[i - 1] if i > 0 and tokens[i - 1] in COLORS else None
            mentions.append((color, tok, i - 1 if color else i, i))
        elif tok in COLORS and (i + 1 >= len(tokens) or tokens[i + 1] not in SHAPES):
            stray += 1  # a colour that names no shape ("a red blue circle"): an extra, wrong object
    return mentions, stray


def caption_correctness(tokens: list[str], truth: dict) -> tuple[bool, bool | None]:
    """Score one caption against an image's ground truth.

    objects_ok: the multiset of (colour, shape) the caption names equals the ground truth's.
    relation_ok: None for one-object images; else whether the first-named object, the relation
    phrase and the second-named object agree with the ground truth (either naming order).
    Never raises: a garbled caption (or ground truth) just scores False.
    """
    try:
        tokens = tokens.split() if isinstance(tokens, str) else [str(t) for t in tokens]
    except TypeError:
        tokens = []
    try:
        objects = [(o["color"], o["shape"]) for o in truth["objects"]]
        true_relation = truth.get("relation")
    except (TypeError, KeyError, AttributeError):
        return False, None
    mentions, stray = _mentions(tokens)
    objects_ok = stray == 0 and Counter((c, s) for c, s, _, _ in mentions) == Counter(objects)
    if true_relation is None or len(objects) != 2:
        return objects_ok, None
    if len(mentions) != 2 or true_relation not in OPPOSITE:
        return objects_ok, False
    (c0, s0, _, end0), (c1, s1, start1, _) = mentions
    between = tokens[end0 + 1:start1]
    if between and between[-1] in SIZES:
        between.pop()
    if between and between[-1] == "a":
        between.pop()
    said = RELATION_PHRASES.get(tuple(between))
    if (c0, s0) == objects[0] and (c1, s1) == objects[1]:
        expected = true_relation
    elif (c0, s0) == objects[1] and (c1, s1) == objects[0]:
        expected = OPPOSITE[true_relation]
    else:
        return objects_ok, False
    return objects_ok, said == expected
