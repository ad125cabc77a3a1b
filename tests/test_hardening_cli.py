"""The command line of every script: `--` ends the options wherever it stands, an option given twice is refused in
one line (exit 2) naming it, and the messages of a few mistakes name what the user gave and the file at fault."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint, one_line, run_script, sha1, shapes_word_map, tiny_train_args, write_karpathy
from PIL import Image

import all_models
import app
import bench
import evaluate
import files
import inference
import make_dataset
import pytorch_dataset_class
import release
import train
from checkpoints import load_checkpoint
from cli import UserError
from pytorch_dataset_class import preprocess_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", shapes_word_map())


# ----------------------------------------------------------------------------------------------
# `--`


@pytest.mark.parametrize("argv, images", [
    (["--", "-x.jpg"], ["-x.jpg"]),
    (["--json", "--workers", "0", "--", "-x.jpg"], ["-x.jpg"]),
    (["--", "one.png", "-x.jpg"], ["one.png", "-x.jpg"]),
    (["one.png", "--", "-x.jpg"], ["one.png", "-x.jpg"]),
    (["one.png", "--json", "two.png", "--", "-x.jpg", "--json"], ["one.png", "two.png", "-x.jpg", "--json"]),
    (["--checkpoint", "a.pt", "b.pt", "--", "-x.jpg"], ["-x.jpg"]),
])
def test_dashes_end_the_options_wherever_they_stand(argv: list[str], images: list[str]) -> None:
    """Everything after `--` is an image, also a name that starts with '-', with options before `--` or images on
    both sides of it."""
    assert inference.parse_args(argv).images == images


def test_a_dash_file_after_dashes_is_captioned(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    """The README's advice for a file name that starts with '-' works as it says."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "-x.jpg")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "one.png")
    r = run_script("inference.py", "--checkpoint", checkpoint, "--workers", "0", "--json", "--", "one.png", "-x.jpg",
                   mode="in_process")
    assert r.rc == 0, str(r)
    assert [json.loads(line)["image"] for line in r.out.splitlines()] == ["one.png", "-x.jpg"]


# ----------------------------------------------------------------------------------------------
# An option given twice


@pytest.mark.parametrize("parse, argv, needles", [
    (inference.parse_args, ["--checkpoint", "A.pt", "--checkpoint", "B.pt", "x.jpg"],
     ["--checkpoint is given twice", "--checkpoint A B"]),
    (inference.parse_args, ["x.jpg", "--beam-size", "3", "--beam-size=5"], ["--beam-size is given twice"]),
    (inference.parse_args, ["--json", "x.jpg", "--json"], ["--json is given twice"]),
    (evaluate.parse_args, ["--checkpoint", "A.pt", "--data", "d", "--checkpoint", "B.pt"],
     ["--checkpoint is given twice"]),
    (train.build_parser().parse_args, ["--run", "a", "--run-name", "b"], ["given twice (as --run and --run-name)"]),
    (train.build_parser().parse_args, ["--epochs=1", "--epochs", "2"], ["--epochs is given twice"]),
    (train.build_parser().parse_args, ["--tensorboard", "--no-tensorboard"], ["--tensorboard is given twice"]),
    (train.build_parser().parse_args, ["--epo", "1", "--epochs", "2"], ["--epochs is given twice"]),
    (make_dataset.parse_args, ["--captions", "a.json", "--captions", "b.json"], ["--captions is given twice"]),
    (app.parse_args, ["--port", "1", "--port", "2"], ["--port is given twice"]),
    (bench.parse_args, ["--only", "decode", "--only", "train"], ["--only is given twice"]),
    (release.main, ["--checkpoint", "a.pt", "--checkpoint", "b.pt"], ["--checkpoint is given twice"]),
], ids=["inference-checkpoint", "equals-form", "flag", "evaluate", "alias", "equals-first", "bool-pair",
        "abbreviation", "make_dataset", "app", "bench", "release"])
def test_an_option_given_twice_is_refused(parse, argv: list[str], needles: list[str], capsys) -> None:
    """argparse keeps the last value without a word (`--checkpoint A --checkpoint B` would use B alone): one line,
    exit 2, naming the option; its aliases and abbreviations are the same option."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    for needle in needles:
        assert needle in line, line


def test_one_option_with_several_values_and_options_after_dashes_are_not_repeats() -> None:
    args = inference.parse_args(["--checkpoint", "A.pt", "B.pt", "--beam-size", "3", "--", "--beam-size"])
    assert args.checkpoint == [Path("A.pt"), Path("B.pt")] and args.images == ["--beam-size"]
    assert evaluate.parse_args(["--checkpoint", "A.pt", "--data", "d", "--beam-sizes", "1", "3"]).beam_sizes == [1, 3]


def test_a_repeated_option_is_refused_by_the_script(checkpoint: Path, tmp_path: Path) -> None:
    """As the user sees it: one line on stderr, nothing captioned."""
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    r = run_script("inference.py", "--checkpoint", checkpoint, "--checkpoint", checkpoint, image, mode="in_process")
    one_line(r, 2, "--checkpoint is given twice")
    assert r.out == ""


# ----------------------------------------------------------------------------------------------
# Messages that name what the user gave, and the file at fault


def test_a_resumed_bad_value_is_blamed_on_the_checkpoint(trained: Path, tmp_path: Path) -> None:
    """A checkpoint whose train_config holds batch_size 0: the line names the file and its value, not an option the
    user did not give; the option given on the command line is still named as such."""
    ck = load_checkpoint(trained / "last.pt")
    ck["train_config"]["batch_size"] = 0
    path = tmp_path / "r" / "last.pt"
    path.parent.mkdir()
    torch.save(ck, path)
    line = one_line(run_script("train.py", "--resume", path, mode="in_process"), 1,
                    f"--resume {path}: its train_config's batch_size must be >= 1, got 0", "give --batch-size")
    assert not line.split(": error: ", 1)[1].startswith("--batch-size")
    one_line(run_script("train.py", "--resume", path, "--batch-size", "0", mode="in_process"), 2,
             "--batch-size must be >= 1, got 0")


def test_the_vocabulary_refusal_names_the_datas_sha1(trained: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    data = datasets["other_vocab"]
    r = run_script("train.py", *tiny_train_args(data, tmp_path / "out", "--init-from", trained / "best.pt"),
                   mode="in_process")
    line = one_line(r, 1, "--init-from", "trained with another vocabulary", f"sha1 {sha1(data / 'word_map.json')[:12]}")
    assert "None" not in line


def test_a_vocabulary_too_large_for_a_model_names_word_map_json(tiny_shapes: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A word_map.json of more words than a model takes is the data's fault (exit 1), not a model option's (the
    limit lowered here stands for a 5-million-word file)."""
    monkeypatch.setitem(all_models.MODEL_LIMITS, "vocab_size", 10)
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path / "out"), mode="in_process")
    line = one_line(r, 1, f"--data {tiny_shapes}: its word_map.json holds", "more than a model takes (10)")
    assert "model option" not in line and not list(tmp_path.glob("out/*"))


def photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (10 * i, 100, 200)).save(folder / f"p{i:02d}.jpg")
    return folder


def make_dataset_on(tmp_path: Path, *args: str | Path, size: int = 16) -> object:
    return run_script("make_dataset.py", "--dataset", "mine", "--output-dir", tmp_path / "out", "--image-size", size,
                      "--min-word-freq", "1", "--workers", "0", *args, mode="in_process")


@pytest.mark.parametrize("option", ["--captions", "--image-dir", "--karpathy-json"])
def test_an_input_of_the_wrong_kind_is_named_as_such(tmp_path: Path, option: str) -> None:
    """A folder given where a file goes (or a file where a folder goes) is not "not found"."""
    images = photos(tmp_path / "photos", 2)
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\np00.jpg,a red thing\n")
    given = {"--captions": ["--captions", tmp_path, "--image-dir", images],
             "--image-dir": ["--captions", captions, "--image-dir", captions],
             "--karpathy-json": ["--karpathy-json", images, "--image-dir", images]}[option]
    kind = "is a file, not a folder" if option == "--image-dir" else "is a folder, not a file"
    line = one_line(make_dataset_on(tmp_path, *given), 1, f"{option} ", kind)
    assert "not found" not in line


def test_images_missing_from_their_subfolder_are_all_counted(tmp_path: Path) -> None:
    """Every train name in a subfolder --image-dir lacks (COCO's val2014/...): the line counts all of them, where
    the decoding stops after the first few."""
    json_path, image_dir = write_karpathy(tmp_path / "raw", [
        {"split": split, "captions": [["a", "red", "thing"]], "filename": f"sub/{split}_{i}.jpg"}
        for split, n in (("train", 40), ("val", 4), ("test", 4)) for i in range(n)], make_images=False)
    r = make_dataset_on(tmp_path, "--karpathy-json", json_path, "--image-dir", image_dir)
    one_line(r, 1, "train: 40 of 40 images are unusable", f"not in --image-dir {image_dir}", "sub/train_0.jpg")


def test_a_full_disk_names_the_file_that_filled_it(tmp_path: Path, monkeypatch) -> None:
    """One disk for every file make_dataset writes: train.h5's images fill it (1.2 MB, more than HDF5 caches),
    and the small word_map.json written after them finds no room either; the line names train.h5. (ENOSPC is
    simulated at the write: a 600 KB disk, full from the first write that found no room.)"""
    json_path, image_dir = write_karpathy(tmp_path / "raw", [
        {"split": split, "captions": [["a", f"thing{i}"]]} for split, n in (("train", 100), ("val", 4), ("test", 4))
        for i in range(n)])
    room = [600_000]
    real_write = files.GuardedFile.write

    def write(self, data) -> int:
        n = len(memoryview(data))
        if self.error is None and n > room[0]:
            self.error, room[0] = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 0
        if self.error is None:
            room[0] -= n
        return real_write(self, data)

    monkeypatch.setattr(files.GuardedFile, "write", write)
    r = make_dataset_on(tmp_path, "--karpathy-json", json_path, "--image-dir", image_dir, size=64)
    one_line(r, 1, f"no space left on device while writing {tmp_path / 'out' / 'train.h5'}")
    assert not list(tmp_path.glob("out/*")) and not list(tmp_path.glob("out/.*"))


# ----------------------------------------------------------------------------------------------
# A HEIC photo, --compile on a CPU

HEIC_HEAD = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"  # an ISO media file's ftyp box, as phones write it


def test_a_heic_photo_says_which_plugin_reads_it(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    """Pillow alone cannot identify a HEIC photo: the line says what it is and how to read it (inference.py, and
    the web page's uploads, which preprocess_image reads from memory); with pillow-heif installed, no hint."""
    photo = tmp_path / "IMG_0001.HEIC"
    photo.write_bytes(HEIC_HEAD + bytes(200))
    monkeypatch.setattr(pytorch_dataset_class, "HEIF_PLUGIN", False)
    one_line(run_script("inference.py", "--checkpoint", checkpoint, "--workers", "0", photo, mode="in_process"), 1,
             f"{photo}: cannot read image: a HEIC/HEIF photo", "pip install pillow-heif")
    with pytest.raises(UserError, match="upload.heic: cannot read image: a HEIC/HEIF photo"):
        preprocess_image(app.Upload(HEIC_HEAD + bytes(200), "upload.heic"), 16)
    monkeypatch.setattr(pytorch_dataset_class, "HEIF_PLUGIN", True)  # registered, and still unreadable: no hint
    with pytest.raises(UserError, match="cannot identify image file") as err:
        preprocess_image(photo, 16)
    assert "pillow-heif" not in str(err.value)
    (tmp_path / "text.jpg").write_bytes(b"ftypheic is not at the start of this file")
    monkeypatch.setattr(pytorch_dataset_class, "HEIF_PLUGIN", False)
    with pytest.raises(UserError, match="cannot identify image file"):
        preprocess_image(tmp_path / "text.jpg", 16)


def test_compile_is_refused_on_a_cpu(tiny_shapes: Path, tmp_path: Path) -> None:
    """torch.compile made a CPU run 13x slower, with a page of warnings: one line, before anything is written."""
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path / "out", "--compile", "--device", "cpu"),
                   mode="in_process")
    one_line(r, 2, "--compile: on a CPU torch.compile makes training slower")
    assert not (tmp_path / "out").exists()
