"""metrics.py: COCO metrics (and pycocoevalcap called directly), nltk BLEU-4, CIDEr-D, shapes correctness, the Java
fallback."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider_scorer import CiderScorer

import metrics
from metrics import CiderD
from shapes import COLORS, OPPOSITE

needs_java = pytest.mark.skipif(not metrics.java_available(), reason="java is not installed")

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


# ----------------------------------------------------------------------------------------------
# CIDEr-D

WORDS = "a dog cat runs on the grass red ball man in water jumps over".split()


def random_captions(rng: random.Random, n: int, max_words: int = 12) -> list[list[str]]:
    return [[rng.choice(WORDS) for _ in range(rng.randint(0, max_words))] for _ in range(n)]


def coco_cider(candidates: list[list[str]], references: list[list[list[str]]]) -> np.ndarray:
    """pycocoevalcap's CIDEr-D of each candidate; its document frequencies come from all of `references`."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for cand, refs in zip(candidates, references):
        scorer += (" ".join(cand), [" ".join(r) for r in refs])
    return scorer.compute_score()[1]


def test_cider_d_equals_pycocoevalcap() -> None:
    """Random captions with repeated words, empty and one-word candidates, 1 to 6 references an image."""
    rng = random.Random(0)
    refs = [random_captions(rng, rng.randint(1, 6), 14) for _ in range(60)]
    cands = random_captions(rng, 60) + [[], ["dog"], refs[0][0]]
    refs += [refs[1], refs[2], refs[0]]
    assert CiderD(refs).scores([[], []], refs[:2]).tolist() == [0.0, 0.0]  # no n-gram at all
    ours, theirs = CiderD(refs).scores(cands, refs), coco_cider(cands, refs)
    assert ours.shape == (63,) and theirs.std() > 0.1  # the scores spread: a real comparison
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert ours[-1] > 1.0  # a reference itself scores high


def test_cider_d_with_training_document_frequencies_equals_pycocoevalcap() -> None:
    """Document frequencies from another corpus (SCST's training references): pycocoevalcap computes them from
    all the images it scores, so the corpus's images are scored along and their scores ignored."""
    rng = random.Random(1)
    corpus = [random_captions(rng, 5, 14) for _ in range(80)]
    refs = [random_captions(rng, 5, 14) for _ in range(20)]
    cands = random_captions(rng, 20)
    ours = CiderD(refs + corpus).scores(cands, refs)
    theirs = coco_cider(cands + [[]] * len(corpus), refs + corpus)[: len(cands)]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_cider_d_owner_shares_references() -> None:
    """K samples scored against one copy of their image's references = each against its own copy."""
    rng = random.Random(2)
    refs = [random_captions(rng, 5) for _ in range(4)]
    cands = random_captions(rng, 12)
    owner = [i // 3 for i in range(12)]
    cider = CiderD(refs)
    np.testing.assert_allclose(cider.scores(cands, refs, owner), cider.scores(cands, [refs[o] for o in owner]))


@needs_java
def test_without_meteor_the_other_scores_are_pycocoevalcaps_on_the_ptb_tokens(capsys):
    """meteor=False (evaluate.py --no-meteor) starts no METEOR process and leaves every other score as it was."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in PREDS.items()})
    direct = {f"BLEU-{n + 1}": b for n, b in enumerate(Bleu(4).compute_score(gts, res)[0])}
    direct.update({"ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]})
    info: dict = {}
    ours = metrics.coco_metrics_many(REFS, [PREDS], info=info, meteor=False)[0]
    assert info == {"tokenizer": "ptb", "meteor": False}
    assert set(ours) == set(metrics.COCO_METRICS) - {"METEOR"}
    for name, value in direct.items():
        assert ours[name] == pytest.approx(float(value), abs=1e-9), name
