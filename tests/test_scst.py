"""scst.py and train.py --scst: samples are well-formed captions, the policy gradient raises the reward, and a
self-critical run selects on CIDEr-D and resumes exactly. (CIDEr-D itself: test_metrics.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line, run_script, shapes_word_map, tiny_train_args, tiny_train_config
from tiny_models import padded

import train
from all_models import Captioner, ModelConfig
from checkpoints import load_checkpoint
from metrics import CiderD
from scst import ScstConfig, draw, sample_captions, scst_loss


def tiny_model(seed: int = 0, dropout: float = 0.0, deep_output: bool = False) -> tuple[Captioner, dict[str, int]]:
    torch.manual_seed(seed)
    word_map = shapes_word_map()
    cfg = ModelConfig(vocab_size=len(word_map), encoder="smallcnn", encoded_size=4, embed_dim=16, attention_dim=16,
                      decoder_dim=32, dropout=dropout, deep_output=deep_output)
    return Captioner(cfg).eval(), word_map


def test_draw_follows_the_probabilities_and_never_draws_a_banned_word() -> None:
    torch.manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])  # (2, V)
    words = torch.stack([draw(probs) for _ in range(20000)])  # (20000, 2)
    assert words[:, 1].eq(4).all()  # a certain word, always
    freq = torch.bincount(words[:, 0], minlength=6).float() / len(words)  # (V,)
    assert freq[[0, 2, 5]].eq(0).all()  # zero probability: never
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)  # about 0.004 is the standard error at 20,000


def test_samples_are_captions_the_teacher_forced_pass_reads() -> None:
    model, wm = tiny_model()
    a = torch.randn(3, 16, model.decoder.encoder_dim)  # (B, P, D)
    torch.manual_seed(0)
    caps, lens, keep = sample_captions(model.decoder, a, wm, samples=4, max_len=7)
    assert keep is None  # no dropout asked for: no masks
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


@pytest.mark.parametrize("deep_output", [False, True])
def test_dropout_masks_of_the_samples_are_those_of_the_gradient_pass(deep_output: bool) -> None:
    """--scst-dropout: the teacher-forced pass given the sampling's masks scores every sampled word exactly as the
    sampling step did, so the policy gradient is that of the policy that drew the words."""
    model, wm = tiny_model(4, dropout=0.5, deep_output=deep_output)
    a = torch.randn(2, 16, model.decoder.encoder_dim)  # (B, P, D)
    torch.manual_seed(0)
    caps, lens, keep = sample_captions(model.decoder, a, wm, samples=3, max_len=6, dropout=0.5)
    B, K, L = caps.shape
    assert keep.shape == (B, K, L - 1, model.decoder.output_dim)
    assert set(keep.unique().tolist()) == {0.0, 2.0}  # inverted dropout: dropped, or kept and scaled by 1/(1-p)
    # Replay the sampling step by step with its masks: the logits the words were drawn from.
    d = model.decoder
    aa, a_proj, h, c = d.prepare(a)
    h, c = h.unsqueeze(1).expand(-1, K, -1), c.unsqueeze(1).expand(-1, K, -1)  # (B, K, H)
    replay = []
    for t in range(L - 1):
        logits, h, c, _ = d.step(caps[:, :, t], h, c, aa, a_proj, keep[:, :, t])  # (B, K, V)
        replay.append(logits)
    replay = torch.stack(replay, dim=2).view(B * K, L - 1, -1)  # (B*K, L - 1, V)
    forced, _ = padded(d(a, caps, lens, keep.flatten(0, 1)))  # (B*K, T, V)
    unmasked, _ = padded(d(a, caps, lens))  # eval mode: no dropout at all
    T = forced.size(1)
    for row, n in enumerate(lens.view(-1).tolist()):
        torch.testing.assert_close(forced[row, : n - 1], replay[row, : n - 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(forced, unmasked[:, :T])  # the masks do change the scores


@pytest.mark.parametrize("baseline,dropout", [("mean", False), ("greedy", False), ("mean", True)])
def test_policy_gradient_raises_the_reward(baseline: str, dropout: bool) -> None:
    """Thirty steps of SCST on two images whose references all say one caption each: the mean sampled reward
    more than doubles (also when sampling and training under the decoder's dropout)."""
    model, wm = tiny_model(1, dropout=0.3 if dropout else 0.0)
    x = torch.randn(2, 16, model.decoder.encoder_dim)  # cached annotations (B, P, D)
    refs = [[["a", "red", "circle"]] * 5, [["a", "blue", "square"]] * 5]
    cider = CiderD(refs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    rewards = []
    for _ in range(30):
        loss, stats = scst_loss(model, model, x, refs, cider, wm,
                                ScstConfig(samples=8, baseline=baseline, max_len=6, dropout=dropout))
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(stats["reward"])
    assert np.mean(rewards[-5:]) > 2 * np.mean(rewards[:5]), rewards


def test_mean_baseline_is_the_mean_of_the_other_samples() -> None:
    model, wm = tiny_model(2)
    x = torch.randn(2, 16, model.decoder.encoder_dim)
    refs = [[["a", "red", "circle"]], [["a", "blue", "square"]]]
    _, stats = scst_loss(model, model, x, refs, CiderD(refs), wm, ScstConfig(samples=4, baseline="mean", max_len=6))
    # The mean over samples of (sum of the others / (K - 1)) is the mean reward itself.
    assert stats["baseline"] == pytest.approx(stats["reward"], abs=1e-6)


def test_mixed_objective_adds_the_references_cross_entropy() -> None:
    """--scst-ce-weight w: the loss is the self-critical loss of the same samples plus w times the cross-entropy
    training loss of the reference captions, as train.py's cross-entropy step computes it."""
    model, wm = tiny_model(5)
    x = torch.randn(2, 16, model.decoder.encoder_dim)  # (B, P, D)
    refs = [[["a", "red", "circle"], ["a", "red", "circle", "left", "of", "a", "blue", "square"]],
            [["a", "blue", "square"], ["there", "is", "a", "blue", "square"]]]
    L = 2 + max(len(r) for image in refs for r in image)
    caps = torch.full((2, 2, L), wm["<pad>"])  # (B, C, L)
    for b, image in enumerate(refs):
        for c, r in enumerate(image):
            caps[b, c, : len(r) + 2] = torch.tensor([wm["<start>"], *(wm[w] for w in r), wm["<end>"]])
    lens = (caps != wm["<pad>"]).sum(dim=2)  # (B, C)
    kw = dict(samples=3, baseline="mean", max_len=6, alpha_c=0.5)
    torch.manual_seed(0)
    plain, _ = scst_loss(model, model, x, refs, CiderD(refs), wm, ScstConfig(**kw))
    torch.manual_seed(0)  # the same samples
    mixed, stats = scst_loss(model, model, x, refs, CiderD(refs), wm, ScstConfig(**kw, ce_weight=0.3), captions=caps,
                             lengths=lens)
    ce_loss, ce, _ = model(x, caps, lens).loss(0.5)  # the cross-entropy step's forward pass and loss
    assert stats["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert mixed.item() == pytest.approx(plain.item() + 0.3 * ce_loss.item(), rel=1e-5)
    mixed.backward()  # one graph through both kinds of rows
    assert model.decoder.fc.weight.grad is not None
    # With --scst-dropout too: the samples' masks, padded, and fresh ones for the references, in one pass.
    model, wm = tiny_model(5, dropout=0.5)
    loss, _ = scst_loss(model, model, x, refs, CiderD(refs), wm, ScstConfig(**kw, dropout=True, ce_weight=0.3),
                        captions=caps, lengths=lens)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.decoder.fc.weight.grad).all()


def test_scst_loss_under_mixed_precision() -> None:
    """Under autocast (bfloat16, as --amp bf16 on CUDA; here on the CPU) the loss is a finite float32 and its
    gradient reaches the decoder."""
    model, wm = tiny_model(3)
    x = torch.randn(2, 16, model.decoder.encoder_dim)
    refs = [[["a", "red", "circle"]], [["a", "blue", "square"]]]
    loss, _ = scst_loss(model, model, x, refs, CiderD(refs), wm, ScstConfig(samples=3, baseline="greedy", max_len=6),
                        autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.decoder.fc.weight.grad is not None and torch.isfinite(model.decoder.fc.weight.grad).all()


# ----------------------------------------------------------------------------------------------
# train.py --scst


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "dropout-ce"])
def test_scst_run_selects_on_cider_and_resumes_exactly(trained: Path, tiny_shapes: Path, tmp_path: Path,
                                                       mixed: bool) -> None:
    """Also with --scst-dropout and --scst-ce-weight (the masks come from the resumed random state)."""
    init = str(trained / "last.pt")
    kw = dict(scst=True, init_from=init, decoder_lr=1e-3, scst_samples=3, max_decode_len=8)
    if mixed:
        kw.update(scst_dropout=True, scst_ce_weight=0.5)
    full = train.train(tiny_train_config(tiny_shapes, tmp_path, run="full", epochs=2, **kw), progress=False)
    hist = full["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    for h in hist:
        assert {"train_loss", "train_reward", "train_baseline", "val_cider", "val_bleu4"} <= h.keys()
        assert ("train_ce" in h) == mixed  # reported only when it is trained
    best = max(range(2), key=lambda i: hist[i]["val_cider"])
    assert full["best_score"] == hist[best]["val_cider"] and full["best_epoch"] == best + 1
    assert load_checkpoint(tmp_path / "full/best.pt")["epoch"] == best + 1

    train.train(tiny_train_config(tiny_shapes, tmp_path, run="a", epochs=1, **kw), progress=False)
    resumed = train.train(tiny_train_config(tiny_shapes, tmp_path, run="a", epochs=2, **kw,
                                            resume=str(tmp_path / "a/last.pt")), progress=False)
    for w, g in zip(hist, resumed["history"], strict=True):
        for k in ("train_reward", "train_loss", "val_cider", "val_loss",
                  *(("train_ce",) if mixed else ())):
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
    (("--init-from", "X", "--scst-ce-weight", "-1"), "--scst-ce-weight must be >= 0, got -1.0"),
])
def test_scst_mistakes_are_one_line(tiny_shapes: Path, tmp_path: Path, extra: tuple, needle: str) -> None:
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path / "out", "--scst", *extra), mode="in_process")
    one_line(r, 2, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mixed", [(), ("--scst-dropout", "--scst-ce-weight", "0.5")], ids=["plain", "mixed"])
def test_scst_under_torchrun_keeps_both_ranks_identical(trained: Path, tiny_shapes: Path, tmp_path: Path,
                                                        mixed: tuple) -> None:
    """Two processes (gloo on CPU), each sampling its own images: the gradients are averaged, so both ranks end
    with the same weights, and those are not the weights they started from (also with dropout masks and the
    references' rows in the one DDP forward pass)."""
    dump = tmp_path / "params"
    proc = run_script("tests/ddp_worker.py", dump,
                      *tiny_train_args(tiny_shapes, tmp_path, "--device", "cpu", "--epochs", "1", "--scst",
                                       "--init-from", trained / "last.pt", "--decoder-lr", "1e-3", *mixed),
                      mode="fresh", launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
                      timeout=240)
    assert proc.rc == 0, proc.err[-3000:]
    ranks = [json.loads(Path(f"{dump}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha1"] == ranks[1]["sha1"]
    start = load_checkpoint(trained / "last.pt")["model_state"]
    end = load_checkpoint(tmp_path / "shapes/last.pt")["model_state"]
    assert any(not torch.equal(start[k], end[k]) for k in end if k.startswith("decoder."))
