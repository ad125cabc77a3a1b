"""DecodeConfig: the decoding options inference.py and evaluate.py share, and the length penalty a released model
carries (release.py stores it; the scripts decode with it unless --length-penalty says otherwise)."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from test_inference import make_checkpoint, shapes_word_map

import evaluate
import inference
import release
from all_models import DecodeConfig, load_checkpoint
from make_dataset import word_map_sha1
from pytorch_dataset_class import ImageDataset
from shapes import _sample_objects, render
from utils import EXIT_BAD_OPTION, UserError, field_help, run_cli


def with_stored_penalty(checkpoint: Path, out: Path, value: object) -> Path:
    """A copy of `checkpoint` that stores `value` as its length penalty, as release.py does."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["decode"] = {"length_penalty": value}
    torch.save(ckpt, out)
    return out


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


@pytest.mark.parametrize("script", [inference, evaluate])
def test_the_decoding_options_are_decode_configs_fields(script, capsys, monkeypatch):
    """--help lists every field (evaluate.py: --beam-sizes for beam_size) with its comment as the help and its
    default; the options left out parse to DecodeConfig's defaults."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width, even inside a word
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    helps = field_help(DecodeConfig)
    for f in fields(DecodeConfig):
        if script is evaluate and f.name == "beam_size":
            assert "--beam-sizes BEAM_SIZES [BEAM_SIZES ...] beam sizes to compare (default: [1, 3, 5])" in text
            continue
        flag = "--" + f.name.replace("_", "-")
        assert f"{flag} {f.name.upper()} {helps[f.name]} (default: {f.default})" in text
    argv = ["photo.jpg"] if script is inference else ["--checkpoint", "c.pt", "--data", "d"]
    assert DecodeConfig.from_args(script.parse_args(argv)) == DecodeConfig()


@pytest.mark.parametrize("script", [inference, evaluate])
@pytest.mark.parametrize("value, message", [
    ("-1", "argument --length-penalty: must be a finite number >= 0, got -1.0"),
    ("inf", "argument --length-penalty: must be a finite number >= 0, got inf")])
def test_a_bad_length_penalty_is_one_line_exit_2(script, value, message, tmp_path, capsys, monkeypatch):
    # Refused before anything is read: the checkpoint and the data need not exist.
    argv = ["photo.jpg"] if script is inference else ["--data", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", "--checkpoint", "missing.pt", *argv,
                                      "--length-penalty", value])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == EXIT_BAD_OPTION and message in line


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


def test_evaluate_decodes_with_and_records_the_length_penalty_it_used(tiny_shapes, tmp_path):
    wm_path = tiny_shapes / "word_map.json"
    size = ImageDataset(tiny_shapes / "val.h5").attrs["image_size"]
    plain = make_checkpoint(tmp_path / "plain.pt", json.loads(wm_path.read_text()), size, 0, word_map_sha1(wm_path))
    stored = with_stored_penalty(plain, tmp_path / "stored.pt", 0.5)

    def used(checkpoint: Path, length_penalty: float | None) -> float:
        out = tmp_path / "out"
        evaluate.evaluate(checkpoint, tiny_shapes, "val", DecodeConfig(max_len=6, length_penalty=length_penalty),
                          beam_sizes=[2], workers=0, max_images=4, out_dir=out, java=False, progress=False)
        return json.loads((out / "results_val_first4.json").read_text())["length_penalty"]  # what release.py reads

    assert used(stored, None) == 0.5
    assert used(stored, 0.0) == 0.0
    assert used(plain, None) == 0.0


def test_release_stores_the_length_penalty_the_scores_were_measured_with(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "best.pt", shapes_word_map())
    scores = tmp_path / "results_val.json"
    scores.write_text(json.dumps({"split": "val", "dataset": "shapes", "n_images": 4, "length_penalty": 0.5,
                                  "metrics": {"2": {"BLEU-4": 0.1}}}))

    def released(*options: str) -> dict:
        out = tmp_path / "released.pt"
        release.main(["--checkpoint", str(checkpoint), "--out", str(out), *options])
        return load_checkpoint(out)

    ckpt = released("--scores", str(scores))
    assert ckpt["decode"] == {"length_penalty": 0.5}
    assert DecodeConfig().for_checkpoint(ckpt).length_penalty == 0.5  # what inference, evaluate and app use
    assert released("--scores", str(scores), "--length-penalty", "0.25")["decode"] == {"length_penalty": 0.25}
    assert released()["decode"] == {"length_penalty": 0.0}

    scores.write_text(json.dumps({**json.loads(scores.read_text()), "length_penalty": -1}))
    with pytest.raises(UserError, match=f"--scores {scores}: its length_penalty must be a finite number >= 0"):
        released("--scores", str(scores))
