"""evaluate.py: a checkpoint scored on a processed split (tables, results and prediction files), the length
penalty it decodes with and records, and the checkpoints it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint, one_line, run_script, with_stored_penalty

import evaluate
import metrics
from checkpoints import model_from_checkpoint
from cli import UserError
from decoding import DecodeConfig, greedy_decode
from pytorch_dataset_class import ImageDataset, Vocab, to_model_input


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes: Path, tmp_path_factory) -> Path:
    wm_path = tiny_shapes / "word_map.json"
    size = ImageDataset(tiny_shapes / "test.h5").attrs["image_size"]
    return make_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", json.loads(wm_path.read_text()), size, 0,
                           Vocab.hash(wm_path))


def test_evaluate_end_to_end_without_java(checkpoint, tiny_shapes, test_split, tmp_path, no_java, capsys):
    out = tmp_path / "out"
    results = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(tiny_shapes), "--beam-sizes", "1", "2",
                             "--max-len", "8", "--batch-size", "5", "--workers", "0", "--out-dir", str(out)])
    stdout, stderr = capsys.readouterr()
    assert metrics.JAVA_MISSING in stderr.splitlines()
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| beam | BLEU-1 |") and "METEOR" not in table[0] and "images/s" in table[0]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1", "2"]
    assert results["tokenizer"] == "python" and results["meteor"] is False and results["n_images"] == 16
    saved = json.loads((out / "results_test.json").read_text())
    assert saved == json.loads(json.dumps(results))

    references, _, filenames = test_split
    stems = [Path(f).stem for f in filenames]
    refs_file = json.loads((out / "references_test.json").read_text())
    assert [im["id"] for im in refs_file["images"]] == stems
    refs = {s: [] for s in stems}
    for ann in refs_file["annotations"]:
        refs[ann["image_id"]].append(ann["caption"])
    assert refs == {s: [" ".join(t) for t in r] for s, r in zip(stems, references)}
    for k in ("1", "2"):
        m = results["metrics"][k]
        assert m["images_per_s"] > 0
        assert all(0.0 <= m[key] <= 1.0 for key in evaluate.SHAPES_KEYS)
        preds = json.loads(Path(m["predictions"]).read_text())
        assert Path(m["predictions"]) == out / f"predictions_test_beam{k}.json"
        assert [p["image_id"] for p in preds] == stems
        assert all(p["caption"] == p["caption"].lower() for p in preds)
        # Anyone rescoring the written files gets the same numbers.
        rescored = metrics.coco_metrics(refs, {p["image_id"]: p["caption"] for p in preds}, java=False)
        for name, value in rescored.items():
            assert m[name] == pytest.approx(value)

    # Beam size 1 is the greedy caption of each image.
    model, wm = model_from_checkpoint(torch.load(checkpoint, weights_only=True))
    ds = ImageDataset(tiny_shapes / "test.h5")
    x = to_model_input(torch.stack([ds[i][0] for i in range(len(ds))]), "cpu")  # (N, 3, S, S)
    vocab = Vocab(wm)
    greedy = [" ".join(vocab.decode(c.tokens)) for c in greedy_decode(model.decoder, model.annotations(x), vocab, 8)]
    beam1 = [p["caption"] for p in json.loads((out / "predictions_test_beam1.json").read_text())]
    assert beam1 == greedy


@pytest.mark.skipif(not metrics.java_available(), reason="java is not installed")
def test_no_meteor_tokenizes_with_java_and_says_what_it_left_out(checkpoint, tiny_shapes, tmp_path, capsys):
    results = evaluate.main(["--checkpoint", str(checkpoint), "--data", str(tiny_shapes), "--beam-sizes", "1",
                             "--max-len", "8", "--workers", "0", "--out-dir", str(tmp_path), "--no-meteor"])
    stdout = capsys.readouterr().out
    assert results["tokenizer"] == "ptb" and results["meteor"] is False
    assert "METEOR" not in results["metrics"]["1"] and "(PTB tokenizer, no METEOR (--no-meteor))" in stdout


def test_max_images_and_default_out_dir(checkpoint, tiny_shapes):
    results = evaluate.evaluate(checkpoint, tiny_shapes, "val", DecodeConfig(max_len=6), beam_sizes=[3], workers=0,
                                max_images=4, java=False, progress=False)
    assert results["n_images"] == 4 and results["split"] == "val"
    preds = json.loads((checkpoint.parent / "predictions_val_first4_beam3.json").read_text())
    assert len(preds) == 4
    assert (checkpoint.parent / "results_val_first4.json").is_file()
    assert not list(checkpoint.parent.glob("*.tmp"))


def test_evaluate_decodes_with_and_records_the_length_penalty_it_used(tiny_shapes, tmp_path):
    wm_path = tiny_shapes / "word_map.json"
    size = ImageDataset(tiny_shapes / "val.h5").attrs["image_size"]
    plain = make_checkpoint(tmp_path / "plain.pt", json.loads(wm_path.read_text()), size, 0, Vocab.hash(wm_path))
    stored = with_stored_penalty(plain, tmp_path / "stored.pt", 0.5)

    def used(checkpoint: Path, length_penalty: float | None) -> float:
        out = tmp_path / "out"
        evaluate.evaluate(checkpoint, tiny_shapes, "val", DecodeConfig(max_len=6, length_penalty=length_penalty),
                          beam_sizes=[2], workers=0, max_images=4, out_dir=out, java=False, progress=False)
        return json.loads((out / "results_val_first4.json").read_text())["length_penalty"]  # what release.py reads

    assert used(stored, None) == 0.5
    assert used(stored, 0.0) == 0.0
    assert used(plain, None) == 0.0


def test_word_map_mismatch_is_refused(tiny_shapes, tmp_path):
    wm = json.loads((tiny_shapes / "word_map.json").read_text())
    wm["zebra"] = len(wm)
    other = make_checkpoint(tmp_path / "other.pt", wm, 32, 0, "f" * 40)
    r = run_script("evaluate.py", "--checkpoint", other, "--data", tiny_shapes, mode="in_process")
    assert r.rc == 1
    (line,) = r.err.strip().splitlines()
    assert "word map" in line and "ffffffffffff" in line and Vocab.hash(tiny_shapes / "word_map.json")[:12] in line
    with pytest.raises(UserError, match="no train.h5|split"):
        evaluate.evaluate(other, tmp_path, "train")


def test_evaluate_refuses_a_checkpoint_of_another_image_size(trained: Path, datasets) -> None:
    r = run_script("evaluate.py", "--checkpoint", trained / "best.pt", "--data", datasets["size64"], "--workers", "0")
    one_line(r, 1, "was trained on 32 px images", "holds 64 px images")


def test_a_checkpoint_is_checked_once_per_load(checkpoint, monkeypatch):
    """load_for_decoding (every decoding script's loader) checks the checkpoint's fields once: the check builds the
    model on the meta device and loads the weights into it, not free for a large model."""
    import checkpoints

    calls = []
    check = checkpoints.check_checkpoint
    monkeypatch.setattr(checkpoints, "check_checkpoint", lambda *a: calls.append(a) or check(*a))
    loaded = checkpoints.load_for_decoding(checkpoint)
    assert len(calls) == 1 and len(loaded.vocab) == loaded.model.config.vocab_size
