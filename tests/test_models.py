"""Shapes and invariants of the model (all_models.py) with random weights on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from all_models import (
    Attention,
    Captioner,
    DecoderWithAttention,
    Encoder,
    ModelConfig,
    load_checkpoint,
    model_from_checkpoint,
)
from train import compute_loss, save_checkpoint

V = 12  # vocabulary: <pad> 0, <start> 1, <end> 2, <unk> 3, then 8 words
WORD_MAP = {w: i for i, w in enumerate(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(V - 4)])}


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=V, encoder="smallcnn", encoded_size=4, embed_dim=16, attention_dim=16,
                decoder_dim=24, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def captions_batch(lengths: list[int], width: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`<start> w.. <end> <pad>..` rows of the given lengths (which count <start> and <end>)."""
    g = torch.Generator().manual_seed(seed)
    L = width or max(lengths)
    caps = torch.zeros(len(lengths), L, dtype=torch.long)  # (B, L)
    for i, n in enumerate(lengths):
        caps[i, 0] = 1
        caps[i, 1 : n - 1] = torch.randint(4, V, (n - 2,), generator=g)
        caps[i, n - 1] = 2
    return caps, torch.tensor(lengths)


def images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (B, 3, S, S)


# ----------------------------------------------------------------------------------------------
# Output shapes


@pytest.mark.parametrize("size", [32, 64])
def test_smallcnn_encoder_shapes(size: int) -> None:
    enc = Encoder(tiny_config(encoded_size=4))
    assert enc(images(2, size)).shape == (2, 16, 128)  # (B, P = 4 * 4, D = 128)


def test_resnet18_encoder_shapes() -> None:
    enc = Encoder(tiny_config(encoder="resnet18", encoded_size=3), weights="none").eval()
    with torch.no_grad():
        assert enc(images(2, 64)).shape == (2, 9, 512)  # 64 px -> 2 x 2 -> pooled to 3 x 3


def test_attention_shapes_and_weights_sum_to_one() -> None:
    B, K, P, D, H, A = 3, 2, 16, 10, 8, 6
    att = Attention(D, H, A)
    a = torch.randn(B, P, D)
    z, alpha = att(a, att.project(a), torch.randn(B, K, H))
    assert z.shape == (B, K, D) and alpha.shape == (B, K, P)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B, K))
    assert bool((alpha >= 0).all())
    # z is the alpha-weighted mean of the annotations
    torch.testing.assert_close(z, torch.einsum("bkp,bpd->bkd", alpha, a))


def test_decoder_shapes_zeros_past_end_and_alphas_sum_to_one() -> None:
    cfg = tiny_config()
    dec = DecoderWithAttention(cfg, encoder_dim=20)
    lengths = [5, 3, 7]
    caps, lens = captions_batch(lengths, width=9)
    logits, alphas = dec(torch.randn(3, 16, 20), caps, lens)
    T = max(lengths) - 1
    assert logits.shape == (3, T, V) and alphas.shape == (3, T, 16)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(alphas[i, : n - 1].sum(-1), torch.ones(n - 1))
        assert bool((alphas[i, n - 1 :] == 0).all()) and bool((logits[i, n - 1 :] == 0).all())


@pytest.mark.parametrize("position", ["none", "learned", "coords"])
@pytest.mark.parametrize("deep_output", [False, True])
def test_captioner_shapes(position: str, deep_output: bool) -> None:
    model = Captioner(tiny_config(position=position, deep_output=deep_output))
    caps, lens = captions_batch([6, 4])
    x = images(2)
    logits, alphas = model(x, caps, lens)
    assert logits.shape == (2, 5, V) and alphas.shape == (2, 5, 16)
    a = model.annotations(x)
    assert a.shape == (2, 16, 128)
    # cached annotations (B, P, D) pass through the encoder untouched and give the same result
    logits2, _ = model(a, caps, lens)
    torch.testing.assert_close(logits, logits2)
    loss, ce, dsr = compute_loss(logits, alphas, caps, lens, alpha_c=1.0)
    assert loss.ndim == 0 and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# Invariants


def test_padding_never_changes_the_loss() -> None:
    torch.manual_seed(0)
    model = Captioner(tiny_config()).eval()
    caps, lens = captions_batch([7, 4, 5], seed=1)
    x = images(3)
    loss, ce, dsr = compute_loss(*model(x, caps, lens), caps, lens, alpha_c=1.0)
    # more <pad> columns than any caption needs
    wide = torch.cat([caps, torch.zeros(3, 6, dtype=torch.long)], dim=1)  # (B, L + 6)
    loss_wide = compute_loss(*model(x, wide, lens), wide, lens, alpha_c=1.0)[0]
    # garbage instead of <pad> past each caption's end
    junk = caps.clone()
    for i, n in enumerate(lens.tolist()):
        junk[i, n:] = torch.randint(0, V, (caps.size(1) - n,))
    loss_junk = compute_loss(*model(x, junk, lens), junk, lens, alpha_c=1.0)[0]
    assert loss_wide.item() == pytest.approx(loss.item(), rel=1e-6)
    assert loss_junk.item() == pytest.approx(loss.item(), rel=1e-6)
    # and each caption's loss is the same alone as in a batch with longer ones
    ce_alone = compute_loss(*model(x[1:2], caps[1:2, :4], lens[1:2]), caps[1:2, :4], lens[1:2], alpha_c=0.0)[1]
    logits, alphas = model(x, caps, lens)
    ce_in_batch = compute_loss(logits[1:2], alphas[1:2], caps[1:2], lens[1:2], alpha_c=0.0)[1]
    assert ce_alone.item() == pytest.approx(ce_in_batch.item(), rel=1e-5)


def test_checkpoint_round_trip_weights_only(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(position="learned", deep_output=True, dropout=0.5)
    model = Captioner(cfg)
    with torch.no_grad():
        model.decoder.pos_table.normal_()  # not zero, so it must be saved and loaded
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"format_version": 1, "model_config": cfg.__dict__.copy(),
                           "model_state": model.state_dict(), "word_map": WORD_MAP, "epoch": 3,
                           "history": [{"epoch": 1, "val_bleu4": 0.1}], "best_score": float("-inf")})
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["epoch"] == 3
    loaded, word_map = model_from_checkpoint(load_checkpoint(path))
    assert word_map == WORD_MAP and not loaded.training
    model.eval()
    caps, lens = captions_batch([6, 3])
    x = images(2)
    with torch.no_grad():
        for a, b in zip(model(x, caps, lens), loaded(x, caps, lens)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("encoder", ["smallcnn", "resnet18"])
def test_frozen_encoder_stays_in_eval_and_keeps_batchnorm_stats(encoder: str) -> None:
    torch.manual_seed(0)
    model = Captioner(tiny_config(encoder=encoder, encoded_size=2, dropout=0.5), encoder_weights="none")
    model.train()
    assert model.encoder.frozen and model.decoder.training
    assert not any(block.training for block in model.encoder.cnn)  # every block, so every BatchNorm
    assert not any(m.training for m in model.encoder.cnn.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not any(p.requires_grad for p in model.encoder.parameters())
    before = copy.deepcopy(model.encoder.state_dict())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    caps, lens = captions_batch([5, 4])
    loss = compute_loss(*model(images(2, 64), caps, lens), caps, lens, alpha_c=1.0)[0]
    loss.backward()
    opt.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats alike


def test_fine_tuned_smallcnn_trains() -> None:
    model = Captioner(tiny_config(fine_tune_encoder=True))
    model.train()
    assert not model.encoder.frozen and all(p.requires_grad for p in model.encoder.parameters())
    assert all(m.training for m in model.encoder.cnn.modules())
