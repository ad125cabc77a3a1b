"""scst.py and train.py --scst: CIDEr-D equals pycocoevalcap's, samples are well-formed captions, the policy
gradient raises the reward, and a self-critical run selects on CIDEr-D and resumes exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line, run_script, shapes_word_map, tiny_train_args, tiny_train_config
from pycocoevalcap.cider.cider_scorer import CiderScorer

import train
from all_models import Captioner, ModelConfig, load_checkpoint
from scst import CiderD, sample_captions, scst_loss

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


def tiny_model(seed: int = 0) -> tuple[Captioner, dict[str, int]]:
    torch.manual_seed(seed)
    word_map = shapes_word_map()
    cfg = ModelConfig(vocab_size=len(word_map), encoder="smallcnn", encoded_size=4, embed_dim=16, attention_dim=16,
                      decoder_dim=32, dropout=0.0)
    return Captioner(cfg).eval(), word_map


def test_samples_are_captions_the_teacher_forced_pass_reads() -> None:
    model, wm = tiny_model()
    a = torch.randn(3, 16, model.decoder.encoder_dim)  # (B, P, D)
    torch.manual_seed(0)
    caps, lens = sample_captions(model.decoder, a, wm, samples=4, max_len=7)
    assert caps.shape[:2] == (3, 4) and lens.shape == (3, 4) and caps.size(2) <= 8
    for row, n in zip(caps.view(12, -1).tolist(), lens.view(-1).tolist()):
        assert row[0] == wm["<start>"] and all(t == wm["<pad>"] for t in row[n:])
        words = row[1:n]
        assert wm["<start>"] not in words and wm["<pad>"] not in words
        assert (words[-1] == wm["<end>"] and wm["<end>"] not in words[:-1]) or (len(words) == 7 and wm["<end>"]
                                                                                not in words)
    torch.manual_seed(0)
    again = sample_captions(model.decoder, a, wm, samples=4, max_len=7)
    assert torch.equal(again[0], caps)  # the global RNG decides: a seeded run samples the same captions
    # The samples differ from each other: they are draws, not K copies of the greedy caption.
    assert len({tuple(r) for r in caps.view(12, -1).tolist()}) > 3


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_policy_gradient_raises_the_reward(baseline: str) -> None:
    """Thirty steps of SCST on two images whose references all say one caption each: the mean sampled reward
    more than doubles."""
    model, wm = tiny_model(1)
    x = torch.randn(2, 16, model.decoder.encoder_dim)  # cached annotations (B, P, D)
    refs = [[["a", "red", "circle"]] * 5, [["a", "blue", "square"]] * 5]
    cider = CiderD(refs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    rewards = []
    for _ in range(30):
        loss, stats = scst_loss(model, model, x, refs, cider, wm, samples=8, baseline=baseline, max_len=6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(stats["reward"])
    assert np.mean(rewards[-5:]) > 2 * np.mean(rewards[:5]), rewards


def test_mean_baseline_is_the_mean_of_the_other_samples() -> None:
    model, wm = tiny_model(2)
    x = torch.randn(2, 16, model.decoder.encoder_dim)
    refs = [[["a", "red", "circle"]], [["a", "blue", "square"]]]
    _, stats = scst_loss(model, model, x, refs, CiderD(refs), wm, samples=4, baseline="mean", max_len=6)
    # The mean over samples of (sum of the others / (K - 1)) is the mean reward itself.
    assert stats["baseline"] == pytest.approx(stats["reward"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# train.py --scst


def test_scst_run_selects_on_cider_and_resumes_exactly(trained: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    init = str(trained / "last.pt")
    kw = dict(scst=True, init_from=init, decoder_lr=1e-3, scst_samples=3, max_decode_len=8)
    full = train.train(tiny_train_config(tiny_shapes, tmp_path, run="full", epochs=2, **kw), progress=False)
    hist = full["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    for h in hist:
        assert {"train_loss", "train_reward", "train_baseline", "val_cider", "val_bleu4"} <= h.keys()
        assert "train_ce" not in h  # no cross-entropy is trained
    best = max(range(2), key=lambda i: hist[i]["val_cider"])
    assert full["best_score"] == hist[best]["val_cider"] and full["best_epoch"] == best + 1
    assert load_checkpoint(tmp_path / "full/best.pt")["epoch"] == best + 1

    train.train(tiny_train_config(tiny_shapes, tmp_path, run="a", epochs=1, **kw), progress=False)
    resumed = train.train(tiny_train_config(tiny_shapes, tmp_path, run="a", epochs=2, **kw,
                                            resume=str(tmp_path / "a/last.pt")), progress=False)
    for w, g in zip(hist, resumed["history"], strict=True):
        for k in ("train_reward", "train_loss", "val_cider", "val_loss"):
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), k


def test_scst_from_the_command_line(trained: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path, "--epochs", "1", "--run", "s", "--scst",
                                                 "--init-from", trained / "last.pt", "--scst-baseline", "greedy"))
    assert r.rc == 0, str(r)
    assert "reward" in r.out and "best val CIDEr-D" in r.out
    assert json.loads((tmp_path / "s/config.json").read_text())["scst_baseline"] == "greedy"


@pytest.mark.parametrize("extra, needle", [
    ((), "--scst trains a model further: start from a cross-entropy model with --init-from"),
    (("--init-from", "X", "--scst-samples", "1"), "--scst-baseline mean needs --scst-samples >= 2"),
    (("--init-from", "X", "--scst-baseline", "best"), "--scst-baseline"),
])
def test_scst_mistakes_are_one_line(tiny_shapes: Path, tmp_path: Path, extra: tuple, needle: str) -> None:
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path / "out", "--scst", *extra), mode="in_process")
    one_line(r, 2, needle)
    assert not (tmp_path / "out").exists()
