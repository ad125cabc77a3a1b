"""The command line of every script: `--` ends the options wherever it stands, an option given twice is refused in
one line (exit 2) naming it, and the messages of a few mistakes name what the user gave and the file at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_checkpoint, one_line, run_script, shapes_word_map
from PIL import Image

import app
import bench
import evaluate
import inference
import make_dataset
import release
import train


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
