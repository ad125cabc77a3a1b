"""imcap.py, the Python API: a tiny checkpoint and the released model, each loaded once, caption a photo by path and
as a PIL image as `inference.py` does; lists, batches, the attention maps, ensembles and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_checkpoint, shapes_word_map
from PIL import Image

import imcap
import inference
from cli import UserError

PHOTO = ROOT / "docs" / "photos" / "chelsea.jpg"
MAX_LEN = 8  # the tiny random model says words until max_len: keep that short


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("imcap") / "tiny.pt", shapes_word_map())


@pytest.fixture(scope="module")
def tiny(checkpoint) -> imcap.Captioner:
    return imcap.load(checkpoint, device="cpu", max_len=MAX_LEN)


@pytest.fixture(scope="module")
def released() -> imcap.Captioner:
    return imcap.load(device="cpu")


def command_line(capsys, *argv: str) -> dict:
    """What `inference.py --json` prints for the photo."""
    inference.main([*argv, "--json", "--workers", "0", str(PHOTO)])
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def check_result(r: imcap.Result, expected: dict, source: Path | None) -> None:
    assert (r.greedy, r.beam, r.beam_size, r.image) == (expected["greedy"], expected["beam"], expected["beam_size"],
                                                        source)
    assert r.beam_score == pytest.approx(expected["score"], abs=1e-6)
    assert r.greedy_words == r.greedy.split() and r.beam_words == r.beam.split()
    side = {49: 7, 16: 4}[r.attention[0].numel()]  # the released model's 7 x 7 grid, the tiny model's 4 x 4
    assert r.attention.shape == (len(r.beam_words), side, side)  # (T, rows, cols): one map per word
    assert torch.allclose(r.attention.sum(dim=(1, 2)), torch.ones(len(r.beam_words)), atol=1e-4)


@pytest.mark.parametrize("model", ["tiny", "released"])
def test_a_path_and_a_pil_image_get_the_command_lines_captions(model, request, checkpoint, capsys):
    captioner = request.getfixturevalue(model)
    argv = ["--checkpoint", str(checkpoint), "--max-len", str(MAX_LEN)] if model == "tiny" else []
    expected = command_line(capsys, *argv)
    check_result(captioner(PHOTO), expected, PHOTO)
    check_result(captioner(str(PHOTO)), expected, PHOTO)
    with Image.open(PHOTO) as im:
        check_result(captioner(im), expected, None)
    assert expected["greedy"] and expected["beam"]


def test_a_list_in_gives_a_list_out_batched_as_one_by_one(checkpoint, tmp_path):
    captioner = imcap.load(checkpoint, device="cpu", max_len=MAX_LEN, batch_size=2)  # 3 photos: 2 batches
    photos = sorted((ROOT / "docs" / "photos").glob("*.jpg"))
    results = captioner(photos)
    assert isinstance(results, list) and [r.image for r in results] == photos
    for photo, r in zip(photos, results):
        alone = captioner(photo)
        assert (r.greedy, r.beam, r.beam_score) == (alone.greedy, alone.beam, pytest.approx(alone.beam_score))
    assert captioner([]) == []
    assert captioner((photos[0],))[0].beam == results[0].beam  # a tuple is a list too


def test_the_beam_size_of_a_call_and_beam_one_is_greedy(tiny):
    one = tiny(PHOTO, beam_size=1)
    assert one.beam_size == 1 and one.beam == one.greedy
    assert tiny(PHOTO).beam_size == 5


def test_several_checkpoints_are_an_ensemble(checkpoint, tiny):
    """Two copies of one model average to that model: the same captions."""
    pair = imcap.load([checkpoint, checkpoint], device="cpu", max_len=MAX_LEN)
    assert "ensemble of 2" in pair.precision
    r, alone = pair(PHOTO), tiny(PHOTO)
    assert (r.greedy, r.beam) == (alone.greedy, alone.beam)


def test_problems_are_one_line_user_errors(tiny, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    cases = [
        (lambda: tiny(bad), f"{bad}: cannot read image"),
        (lambda: tiny([PHOTO, tmp_path / "gone.jpg"]), "gone.jpg: image not found"),
        (lambda: tiny(PHOTO, beam_size=0), "--beam-size must be >= 1"),
        (lambda: imcap.load(tmp_path / "missing.pt"), "missing.pt"),
        (lambda: imcap.load(bad, max_len=0), "--max-len must be >= 1"),
        (lambda: imcap.load(bad, device="tpu"), "--device tpu"),
        (lambda: imcap.load(bad, ensemble_mean="median"), "ensemble_mean must be one of"),
    ]
    for call, message in cases:
        with pytest.raises(UserError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)
