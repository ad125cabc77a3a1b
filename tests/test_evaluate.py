"""evaluate.py and metrics.py: COCO metrics, nltk BLEU-4, shapes correctness, the Java fallback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_inference import make_checkpoint

import evaluate
import metrics
from all_models import DecodeConfig, greedy_decode, model_from_checkpoint
from make_dataset import word_map_sha1
from pytorch_dataset_class import ImageDataset, to_model_input
from shapes import COLORS, OPPOSITE
from utils import UserError, run_cli

needs_java = pytest.mark.skipif(not metrics.java_available(), reason="java is not installed")


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes: Path, tmp_path_factory) -> Path:
    wm_path = tiny_shapes / "word_map.json"
    size = ImageDataset(tiny_shapes / "test.h5").attrs["image_size"]
    return make_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", json.loads(wm_path.read_text()), size, 0,
                           word_map_sha1(wm_path))


@pytest.fixture(scope="module")
def test_split(tiny_shapes: Path) -> tuple[list[list[list[str]]], list[dict], list[str]]:
    ds = ImageDataset(tiny_shapes / "test.h5")
    return ds.references(), ds.meta(), ds.filenames()


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """Hide `java` from PATH (an empty folder as the whole PATH)."""
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert not metrics.java_available()


# ---------------------------------------------------------------- metrics

REFS = {
    "img1": ["A dog runs across the grass.", "a brown dog is running on a lawn", "The dog's running, isn't it?"],
    "img2": ["Two children play in the snow .", "two kids playing in snow", "children in the snow"],
    "img3": ["A man rides a red bike on the road.", "a cyclist on a red bicycle", "A man on a bike."],
}
PREDS = {"img1": "a dog is running on the grass", "img2": "two children are playing in the snow",
         "img3": "a man riding a bike"}


@needs_java
def test_metrics_equal_pycocoevalcap_called_directly(capsys):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # As COCOEvalCap.evaluate does it: tokenize references and results, then each scorer.
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in PREDS.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    meteor = Meteor()
    direct = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    direct["METEOR"] = meteor.compute_score(gts, res)[0]
    del meteor  # its __del__ stops the java process
    direct["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    direct["CIDEr"] = Cider().compute_score(gts, res)[0]
    capsys.readouterr()

    info: dict = {}
    ours = metrics.coco_metrics(REFS, PREDS, info=info)
    assert info == {"tokenizer": "ptb", "meteor": True}
    assert set(ours) == set(metrics.COCO_METRICS)
    for name, value in direct.items():
        assert ours[name] == pytest.approx(float(value), abs=1e-9), name
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1 and ours["METEOR"] > 0
    # The Python fallback tokenizer agrees with PTB on these sentences.
    for k, v in REFS.items():
        assert [metrics.python_tokenize(c) for c in v] == gts[k]
    assert "PTBTokenizer tokenized" not in capsys.readouterr().err  # java's chatter is silenced


def test_missing_java_falls_back_to_python_tokenizer(no_java, capsys):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    info: dict = {}
    ours = metrics.coco_metrics(REFS, PREDS, info=info)
    assert capsys.readouterr().err.splitlines() == [metrics.JAVA_MISSING]
    assert info == {"tokenizer": "python", "meteor": False}
    assert set(ours) == set(metrics.COCO_METRICS) - {"METEOR"}
    gts = {k: [metrics.python_tokenize(c) for c in v] for k, v in REFS.items()}
    res = {k: [metrics.python_tokenize(c)] for k, c in PREDS.items()}
    assert gts["img1"][2] == "the dog 's running is n't it"
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])


def test_perfect_predictions_score_1(test_split):
    references, truths, filenames = test_split
    # The longest reference: nltk counts a caption shorter than 4 words as one unmatched 4-gram, so
    # "a red circle" alone would keep its corpus BLEU-4 below 1 (pycocoevalcap's is 1 either way).
    perfect = [max(r, key=len) for r in references]
    assert min(len(p) for p in perfect) >= 4
    refs = {f: [" ".join(t) for t in r] for f, r in zip(filenames, references)}
    scores = metrics.coco_metrics(refs, {f: " ".join(p) for f, p in zip(filenames, perfect)}, java=False)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-6) and scores["ROUGE-L"] == pytest.approx(1.0)
    assert metrics.nltk_bleu4(references, perfect) == pytest.approx(1.0)
    sc = metrics.shapes_correctness(perfect, truths)
    assert sc["objects_right"] == sc["relation_right"] == sc["all_right"] == 1.0
    assert sc["n_images"] == len(truths) and 0 < sc["n_two_objects"] < len(truths)


def test_wrong_colour_or_relation_lowers_correctness(test_split):
    references, truths, _ = test_split
    perfect = [list(r[0]) for r in references]
    n, two = len(truths), sum(t["relation"] is not None for t in truths)
    wrong_colour = [list(c) for c in perfect]
    i = next(j for j, t in enumerate(truths) if t["relation"] is None)
    k = next(j for j, w in enumerate(wrong_colour[i]) if w in COLORS)
    wrong_colour[i][k] = next(c for c in COLORS if c != wrong_colour[i][k])
    sc = metrics.shapes_correctness(wrong_colour, truths)
    assert sc["objects_right"] == pytest.approx(1 - 1 / n) and sc["all_right"] == pytest.approx(1 - 1 / n)
    assert sc["relation_right"] == 1.0
    # A two-object caption with the relation word flipped: objects still right, relation wrong.
    wrong_relation = [list(c) for c in perfect]
    i = next(j for j, t in enumerate(truths) if t["relation"] is not None)
    k = next(j for j, w in enumerate(wrong_relation[i]) if w in OPPOSITE)
    wrong_relation[i][k] = OPPOSITE[wrong_relation[i][k]]
    sc = metrics.shapes_correctness(wrong_relation, truths)
    assert sc["objects_right"] == 1.0
    assert sc["relation_right"] == pytest.approx(1 - 1 / two) and sc["all_right"] == pytest.approx(1 - 1 / n)


# ---------------------------------------------------------------- evaluate.py


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
    rev = {i: w for w, i in wm.items()}
    greedy = [" ".join(rev[t] for t in c.tokens) for c in greedy_decode(model.decoder, model.annotations(x), wm, 8)]
    beam1 = [p["caption"] for p in json.loads((out / "predictions_test_beam1.json").read_text())]
    assert beam1 == greedy


def test_max_images_and_default_out_dir(checkpoint, tiny_shapes):
    results = evaluate.evaluate(checkpoint, tiny_shapes, "val", DecodeConfig(max_len=6), beam_sizes=[3], workers=0,
                                max_images=4, java=False, progress=False)
    assert results["n_images"] == 4 and results["split"] == "val"
    preds = json.loads((checkpoint.parent / "predictions_val_first4_beam3.json").read_text())
    assert len(preds) == 4
    assert (checkpoint.parent / "results_val_first4.json").is_file()
    assert not list(checkpoint.parent.glob("*.tmp"))


def test_word_map_mismatch_is_refused(tiny_shapes, tmp_path, monkeypatch, capsys):
    wm = json.loads((tiny_shapes / "word_map.json").read_text())
    wm["zebra"] = len(wm)
    other = make_checkpoint(tmp_path / "other.pt", wm, 32, 0, "f" * 40)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--checkpoint", str(other), "--data", str(tiny_shapes)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(evaluate.main)
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "word map" in line and "ffffffffffff" in line and word_map_sha1(tiny_shapes / "word_map.json")[:12] in line
    with pytest.raises(UserError, match="no train.h5|split"):
        evaluate.evaluate(other, tmp_path, "train")
