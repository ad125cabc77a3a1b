"""scst.py and train.py --scst: samples are well-formed captions, the policy gradient raises the reward, and a
self-critical run selects on CIDEr-D and resumes exactly. (CIDEr-D itself: test_metrics.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_line, run_script, shapes_word_map, tiny_train_args, tiny_train_config

import train
from all_models import Captioner, ModelConfig, load_checkpoint
from metrics import CiderD
from scst import sample_captions, scst_loss


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


def test_scst_loss_under_mixed_precision() -> None:
    """Under autocast (bfloat16, as --amp bf16 on CUDA; here on the CPU) the loss is a finite float32 and its
    gradient reaches the decoder."""
    model, wm = tiny_model(3)
    x = torch.randn(2, 16, model.decoder.encoder_dim)
    refs = [[["a", "red", "circle"]], [["a", "blue", "square"]]]
    loss, _ = scst_loss(model, model, x, refs, CiderD(refs), wm, samples=3, baseline="greedy", max_len=6,
                        autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.decoder.fc.weight.grad is not None and torch.isfinite(model.decoder.fc.weight.grad).all()


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


def test_scst_under_torchrun_keeps_both_ranks_identical(trained: Path, tiny_shapes: Path, tmp_path: Path) -> None:
    """Two processes (gloo on CPU), each sampling its own images: the gradients are averaged, so both ranks end
    with the same weights, and those are not the weights they started from."""
    dump = tmp_path / "params"
    proc = run_script("tests/ddp_worker.py", dump,
                      *tiny_train_args(tiny_shapes, tmp_path, "--device", "cpu", "--epochs", "1", "--scst",
                                       "--init-from", trained / "last.pt", "--decoder-lr", "1e-3"),
                      mode="fresh", launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
                      timeout=240)
    assert proc.rc == 0, proc.err[-3000:]
    ranks = [json.loads(Path(f"{dump}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha1"] == ranks[1]["sha1"]
    start = load_checkpoint(trained / "last.pt")["model_state"]
    end = load_checkpoint(tmp_path / "shapes/last.pt")["model_state"]
    assert any(not torch.equal(start[k], end[k]) for k in end if k.startswith("decoder."))
