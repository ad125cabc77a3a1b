"""inference.py: captions, JSON output and attention maps for images and folders, odd and unreadable images,
the released model as `python inference.py PHOTO` uses it, and the length penalty a checkpoint stores (decoded
with unless --length-penalty says otherwise)."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    PHOTOS,
    ROOT,
    SHAPES_WORDS,
    make_checkpoint,
    one_line,
    run_script,
    sha1,
    shapes_word_map,
    with_stored_penalty,
)
from PIL import Image

import attention_maps
import inference
from checkpoints import RELEASED_MODEL, load_checkpoint
from cli import UserError, run_cli
from shapes import _sample_objects, render


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", shapes_word_map())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Five generated shapes images (64 px: inference resizes them to the checkpoint's 32 px)."""
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    paths = []
    for i in range(5):
        path = folder / f"img_{i}.png"
        render(_sample_objects(rng), 64).save(path)
        paths.append(path)
    return paths


def run(argv: list[str]) -> None:
    inference.main(argv + ["--workers", "0"])


def test_text_output(checkpoint, images, capsys):
    run(["--checkpoint", str(checkpoint), "--beam-size", "3", "--max-len", "8", str(images[0]), str(images[1])])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    for block, path in zip((lines[:3], lines[3:]), images[:2]):
        assert block[0] == str(path)
        assert block[1].startswith("  greedy: ")
        assert block[2].startswith("  beam 3: ") and "(score -" in block[2]
    words = set(SHAPES_WORDS) | {"<unk>"}
    assert any(len(line.split(":", 1)[1].split("(")[0].split()) > 0 for line in lines[1::3])
    for line in lines:
        if line.startswith("  greedy: "):
            assert set(line[len("  greedy: "):].split()) <= words


def test_json_output_and_attention_map_png(checkpoint, images, tmp_path, capsys):
    png = tmp_path / "maps" / "one.png"
    run(["--checkpoint", str(checkpoint), "--json", "--attention-map", str(png), "--max-len", "10", str(images[2])])
    (line,) = capsys.readouterr().out.splitlines()
    obj = json.loads(line)
    assert set(obj) == {"image", "greedy", "beam", "beam_size", "score", "attention_map"}
    assert obj["image"] == str(images[2]) and obj["beam_size"] == 5 and obj["attention_map"] == str(png)
    assert isinstance(obj["score"], float) and obj["score"] <= 0
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        n_panels = len(obj["beam"].split()) + 1
        columns = min(n_panels, attention_maps.MAP_COLUMNS)
        assert im.format == "PNG" and im.width >= columns * attention_maps.MAP_PANEL_PX * 0.9
    assert png.stat().st_size < 300_000
    assert not list(png.parent.glob("*.tmp"))


def test_folder_batching_and_unreadable_images(checkpoint, images, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("not an image: ignored in a folder")
    maps = tmp_path / "maps"
    run(["--checkpoint", str(checkpoint), "--json", "--batch-size", "2", "--max-len", "6", "--attention-map",
         str(maps), str(folder)])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in images)  # sorted, broken one skipped
    assert "broken.png" in err and "warning" in err
    assert sorted(p.name for p in maps.iterdir()) == sorted(p.stem + ".png" for p in images)
    # Same captions whatever the batch size (batched decoding equals one image at a time).
    run(["--checkpoint", str(checkpoint), "--json", "--batch-size", "1", "--max-len", "6", *map(str, images)])
    single = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["greedy"], r["beam"]) for r in single] == [(r["greedy"], r["beam"]) for r in rows]
    assert [r["score"] for r in single] == pytest.approx([r["score"] for r in rows], abs=1e-4)


def test_user_errors_are_one_line(checkpoint, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    cases = [
        ([str(tmp_path / "missing.jpg")], "no such file or folder"),
        ([str(empty)], "folder holds no images"),
        ([str(broken)], "broken.jpg: cannot read image"),  # a single image: its own error line
        (["--attention-map", str(images[0]), str(images[0]), str(images[1])], "need a folder"),
    ]
    for args, message in cases:
        r = run_script("inference.py", "--checkpoint", checkpoint, "--workers", "0", *args, mode="in_process")
        assert r.rc in (1, 2)
        last = r.err.strip().splitlines()[-1]
        assert message in last and "Traceback" not in r.err
    with pytest.raises(UserError, match="file not found"):
        run(["--checkpoint", str(tmp_path / "nope.pt"), str(images[0])])
    junk = tmp_path / "junk.pt"
    junk.write_text("junk\n")  # the weights-only unpickler raises a KeyError on this one
    with pytest.raises(UserError, match="truncated or corrupt"):
        run(["--checkpoint", str(junk), str(images[0])])


def test_smooth_maps_are_upsampled_where_the_model_looked():
    alphas = torch.full((2, 16), 0.01)
    alphas[0, 3] = 1.0  # row 0, column 3 of the 4 x 4 grid: top right
    alphas[1, 12] = 1.0  # bottom left
    alphas = alphas / alphas.sum(1, keepdim=True)
    maps = attention_maps.smooth_maps(alphas, 64)  # (2, 64, 64)
    assert maps.shape == (2, 64, 64) and bool((maps >= 0).all())
    peak0 = divmod(int(maps[0].argmax()), 64)
    peak1 = divmod(int(maps[1].argmax()), 64)
    assert peak0[0] < 16 and peak0[1] >= 48
    assert peak1[0] >= 48 and peak1[1] < 16


def test_attention_map_paths():
    one = [Path("a/x.jpg")]
    assert inference.attention_map_paths("out.png", one) == [Path("out.png")]
    assert inference.attention_map_paths("out/", one) == [Path("out/x.png")]
    several = [Path("a/x.jpg"), Path("b/x.jpg"), Path("a/y.png")]
    assert inference.attention_map_paths("out", several) == [Path("out/x.png"), Path("out/x_2.png"),
                                                             Path("out/y.png")]


# ----------------------------------------------------------------------------------------------
# Odd and unreadable images, through the command line


def test_inference_captions_every_kind_of_image(trained: Path, odd_images: list[Path]) -> None:
    """1x1, 12000 x 12000 (no DecompressionBombWarning), 16-bit, CMYK, RGBA and palette: all captioned, exit 0."""
    odd = odd_images
    r = run_script("inference.py", "--checkpoint", trained / "best.pt", "--json", "--beam-size", "2", "--max-len",
                   "6", "--workers", "0", *odd)
    assert r.rc == 0, str(r)
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in odd]
    assert all(row["beam_size"] == 2 for row in rows)
    # stderr: the summary line only (no Pillow warning, no torch warning)
    (line,) = r.err.strip().splitlines()
    assert line.startswith(f"captioned {len(odd)} of {len(odd)} images"), str(r)


def test_inference_skips_each_bad_image_with_one_warning(trained: Path, bad_images, good_image: Path) -> None:
    """A good image among bad ones: it is captioned (exit 0); each bad one gets one warning line naming it."""
    bad = list(bad_images.values())
    r = run_script("inference.py", "--checkpoint", trained / "best.pt", "--json", "--max-len", "6", "--workers", "0",
                   good_image, *bad)
    assert r.rc == 0 and "Traceback" not in r.err, str(r)
    (row,) = [json.loads(line) for line in r.out.splitlines()]
    assert row["image"] == str(good_image)
    lines = r.err.strip().splitlines()
    assert len(lines) == len(bad) + 1, str(r)
    for path, line in zip(bad, lines):
        assert line.startswith("inference.py: warning: skipped ") and str(path) in line, line
    assert "too_big.png: image too large" in lines[-2]
    assert lines[-1].startswith(f"captioned 1 of {len(bad) + 1} images") and f"{len(bad)} unreadable" in lines[-1]


@pytest.mark.parametrize("kind", ["missing", "no_images", "empty", "truncated", "text_jpg", "text_txt", "too_big"])
def test_inference_unusable_input_is_one_line(trained: Path, bad_images, tmp_path: Path, kind: str) -> None:
    """A missing path, a folder without images, or a single unreadable image: one error line, exit 1."""
    if kind == "missing":
        target, needle = tmp_path / "nothere.jpg", "no such file or folder"
    elif kind == "no_images":
        target = tmp_path / "folder"
        target.mkdir()
        (target / "readme.txt").write_text("no images here\n")
        needle = "folder holds no images"
    else:
        target = bad_images[kind]
        needle = "image too large" if kind == "too_big" else "cannot read image"
    r = run_script("inference.py", "--checkpoint", trained / "best.pt", "--workers", "0", target)
    one_line(r, 1, target, needle)
    assert r.out == ""


# ----------------------------------------------------------------------------------------------
# The released model, the default checkpoint


def test_released_model_captions_the_readme_photo():
    """`python inference.py PHOTO` with no other argument: the released model, deterministic, in-vocabulary
    words; the caption is the one the README shows."""
    readme = (ROOT / "README.md").read_text()
    photo = ROOT / "docs" / "photos" / "chelsea.jpg"
    runs = [run_script("inference.py", "--json", photo, mode="fresh", timeout=600) for _ in range(2)]
    for r in runs:
        assert r.rc == 0, r.err
    first, second = (json.loads(r.out.strip().splitlines()[-1]) for r in runs)
    assert first == second
    word_map = load_checkpoint(RELEASED_MODEL)["word_map"]
    for caption in (first["greedy"], first["beam"]):
        assert caption and all(w in word_map and w not in ("<start>", "<end>", "<pad>") for w in caption.split())
    assert f"beam 5: {first['beam']}" in readme and f"greedy: {first['greedy']}" in readme


def test_default_checkpoint_missing_is_one_line(tmp_path):
    """A clone without the released model (or a moved one) gets one line naming the file."""
    for name in ("inference.py", "all_models.py", "attention_maps.py", "checkpoints.py", "cli.py", "decoding.py",
                 "efficientnet_lite.py", "files.py", "imcap.py", "pytorch_dataset_class.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    r = run_script("inference.py", PHOTOS[0], mode="fresh", cwd=tmp_path, timeout=600)
    assert r.rc == 1 and "Traceback" not in r.err
    assert "flickr8k_efficientnet_lite0.pt" in r.err and len(r.err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Outputs never destroy inputs; names that are not valid UTF-8


def file_hashes(*folders: Path) -> dict[Path, str]:
    return {p: sha1(p) for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def test_attention_map_onto_an_input_is_refused(checkpoint, images, tmp_path):
    """--attention-map naming an input image, the checkpoint, a symbolic or hard link to an input, or the input
    folder itself (an image's map would land on an input): one line, exit 2, before anything is written."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images[:2]:
        shutil.copy(p, folder / p.name)  # img_0.png, img_1.png
    (tmp_path / "link.png").symlink_to(folder / "img_0.png")
    os.link(folder / "img_1.png", tmp_path / "hard.png")
    before = file_hashes(tmp_path, checkpoint.parent)
    cases = [  # (--attention-map, the images, the input the map would replace)
        (folder / "img_0.png", [folder / "img_0.png"], folder / "img_0.png"),
        (checkpoint, [folder / "img_0.png"], checkpoint),
        (tmp_path / "link.png", [folder / "img_0.png"], folder / "img_0.png"),
        (tmp_path / "hard.png", [folder / "img_1.png"], folder / "img_1.png"),
        (folder, [folder], folder / "img_0.png"),
    ]
    for target, inputs, hit in cases:
        r = run_script("inference.py", "--checkpoint", checkpoint, "--workers", "0", "--attention-map", target,
                       *inputs, mode="in_process")
        one_line(r, 2, "--attention-map", f"is the input {hit}; the map would replace it")
        assert r.out == ""
    assert file_hashes(tmp_path, checkpoint.parent) == before


def test_attention_maps_overwrite_only_maps_inference_wrote(checkpoint, images, tmp_path):
    """A file in the way that inference.py did not write (any file, a PNG too) is refused in one line and kept,
    and nothing is written; a map it wrote (its PNG tEXt chunk says so) is replaced by the next run."""
    maps = tmp_path / "maps"
    maps.mkdir()
    Image.new("RGB", (4, 4)).save(maps / "img_1.png")  # someone else's PNG, named like a map
    (tmp_path / "notes.txt").write_text("mine\n")
    argv = ["--checkpoint", checkpoint, "--workers", "0", "--max-len", "4"]
    for target, inputs, in_the_way in ((maps, images[:3], maps / "img_1.png"),
                                       (tmp_path / "notes.txt", images[:1], tmp_path / "notes.txt")):
        before = file_hashes(tmp_path)
        r = run_script("inference.py", *argv, "--attention-map", target, *inputs, mode="in_process")
        one_line(r, 2, f"--attention-map {in_the_way}: exists and is not an attention map inference.py wrote")
        assert file_hashes(tmp_path) == before and r.out == ""
    (maps / "img_1.png").unlink()
    for _ in range(2):
        r = run_script("inference.py", *argv, "--attention-map", maps, *images[:3], mode="in_process")
        assert r.rc == 0, str(r)
        assert sorted(p.name for p in maps.iterdir()) == ["img_0.png", "img_1.png", "img_2.png"]
    with Image.open(maps / "img_0.png") as im:
        assert im.text["Software"] == attention_maps.MAP_SOFTWARE


def test_attention_map_names_never_collide():
    """One output file per image, even for stems that repeat, that look like a renamed repeat, or that differ
    only in case (one file on macOS and Windows)."""
    images = [Path("a/x.jpg"), Path("b/x.jpg"), Path("c/x_2.jpg"), Path("d/X.jpg"), Path("e/y.png")]
    assert inference.attention_map_paths("out", images) == [Path("out") / n for n in
                                                            ("x.png", "x_2.png", "x_2_2.png", "X_3.png", "y.png")]


def test_file_names_not_valid_utf8_on_a_strict_terminal(checkpoint, images, tmp_path):
    """Images whose names are not valid UTF-8 (Latin-1 bytes on disk), with stdout and stderr in strict UTF-8:
    captioned, the names printed escaped; an unreadable one is one warning line; never a UnicodeEncodeError."""
    name = os.fsdecode(b"caf\xe9")
    good, bad = tmp_path / f"{name}.png", tmp_path / f"{name}_broken.png"
    shutil.copy(images[0], good)
    bad.write_bytes(b"not a png")
    r = run_script("inference.py", "--checkpoint", checkpoint, "--workers", "0", "--max-len", "4", good, bad,
                   mode="fresh", env={"PYTHONIOENCODING": "utf-8:strict"})
    assert r.rc == 0, str(r)
    assert r.out.splitlines()[0] == f"{tmp_path}/caf\\udce9.png" and "  greedy: " in r.out
    warning, summary = r.err.strip().splitlines()
    assert warning.startswith(f"inference.py: warning: skipped {tmp_path}/caf\\udce9_broken.png: cannot read image")
    assert summary.startswith("captioned 1 of 2 images")


# ----------------------------------------------------------------------------------------------
# The length penalty a checkpoint stores: decoded with unless --length-penalty says otherwise


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    rng = random.Random(1)
    paths = [folder / f"img_{i}.png" for i in range(3)]
    for path in paths:
        render(_sample_objects(rng), 64).save(path)
    return paths


def beam_scores(checkpoint: Path, photos: list[Path], capsys, *options: str) -> list[float]:
    """The beam scores `inference.py --json` prints for the photos."""
    inference.main(["--checkpoint", str(checkpoint), "--json", "--max-len", "8", "--workers", "0", *options,
                    *map(str, photos)])
    return [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]


def test_inference_decodes_with_the_stored_length_penalty_unless_told_otherwise(photos, tmp_path, capsys):
    plain = make_checkpoint(tmp_path / "plain.pt", shapes_word_map())
    stored = with_stored_penalty(plain, tmp_path / "stored.pt", 1.0)
    paper = beam_scores(plain, photos, capsys)  # nothing stored: 0, the paper's sum of log-probabilities
    normalised = beam_scores(plain, photos, capsys, "--length-penalty", "1")
    assert paper != normalised  # the captions are long enough for the penalty to show
    assert beam_scores(stored, photos, capsys) == normalised
    assert beam_scores(stored, photos, capsys, "--length-penalty", "0") == paper  # the option wins


@pytest.mark.parametrize("value", [-0.5, float("nan"), "0.5", True])
def test_a_bad_stored_length_penalty_is_one_line_naming_the_checkpoint(value, photos, tmp_path, capsys,
                                                                       monkeypatch):
    bad = with_stored_penalty(make_checkpoint(tmp_path / "plain.pt", shapes_word_map()), tmp_path / "bad.pt", value)
    monkeypatch.setattr(sys, "argv", ["inference.py", "--checkpoint", str(bad), "--workers", "0", str(photos[0])])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference.main)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1
    assert f"--checkpoint {bad}: " in line and "decode.length_penalty must be a finite number >= 0" in line
    assert len(beam_scores(bad, photos, capsys, "--length-penalty", "0")) == len(photos)  # the option wins


def test_a_file_name_starting_with_a_dash_is_named(tmp_path: Path, monkeypatch) -> None:
    """`inference.py -photo.jpg` is taken for an option: the line names it and says how to pass such a file, not
    "required: images"."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "-photo.jpg")
    r = run_script("inference.py", "-photo.jpg", mode="in_process")
    one_line(r, 2, "-photo.jpg: no such option", "goes after '--'", "./-photo.jpg")
    r = run_script("inference.py", "--workers", "0", "--json", "x.jpg", "-photo.jpg", mode="in_process")
    one_line(r, 2, "-photo.jpg: no such option")


def test_every_line_naming_a_file_with_a_newline_stays_one_line(tmp_path: Path) -> None:
    """A file name holding a newline: the skipped warning, the error for a missing file and the caption's header
    each stay one line (the newline shown as \\n)."""
    checkpoint = make_checkpoint(tmp_path / "tiny.pt", shapes_word_map())
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(good)
    bad = tmp_path / "bad\nname.jpg"
    bad.write_text("not an image\n")
    r = run_script("inference.py", "--checkpoint", checkpoint, "--workers", "0", "--max-len", "3", bad, good,
                   mode="in_process")
    warnings = [line for line in r.err.splitlines() if "warning" in line]
    assert r.rc == 0 and len(warnings) == 1 and "bad\\nname.jpg" in warnings[0], str(r)
    assert "name.jpg" not in r.err.replace(warnings[0], ""), str(r)
    one_line(run_script("inference.py", "--checkpoint", checkpoint, tmp_path / "gone\nx.jpg", mode="in_process"), 1,
             "gone\\nx.jpg: no such file or folder")
