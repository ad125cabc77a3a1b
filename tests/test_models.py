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
    a, h = torch.randn(B, P, D), torch.randn(B, K, H)
    z, alpha = att(a, att.project(a), h)
    assert z.shape == (B, K, D) and alpha.shape == (B, K, P)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B, K))
    assert bool((alpha >= 0).all())
    # the paper's alpha = softmax(w^T tanh(W_a a + W_h h) + b), which forward computes through sigmoid
    u = att.enc_att(a).unsqueeze(1) + att.dec_att(h).unsqueeze(2)  # (B, K, P, A)
    torch.testing.assert_close(alpha, att.full_att(torch.tanh(u)).squeeze(-1).softmax(-1))
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


@pytest.mark.parametrize("position", ["none", "coords"])
@pytest.mark.parametrize("deep_output", [False, True])
def test_teacher_forcing_equals_step_by_step_decoding(position: str, deep_output: bool) -> None:
    """Training runs the word projection and output layer outside its loop; decoding runs them in
    step(). Fed the same words, both give the same scores and attention maps, so what validation and
    inference decode is the model that training optimised."""
    torch.manual_seed(0)
    dec = DecoderWithAttention(tiny_config(position=position, deep_output=deep_output), encoder_dim=20).eval()
    lengths = [6, 4, 7]
    caps, lens = captions_batch(lengths)
    a = torch.randn(3, 16, 20)
    logits, alphas = dec(a, caps, lens)  # (B, T, V), (B, T, P)
    with torch.no_grad():
        a2, a_proj, h, c = dec.prepare(a)
        h, c = h.unsqueeze(1), c.unsqueeze(1)  # (B, 1, H)
        for t in range(max(lengths) - 1):
            out, h, c, alpha = dec.step(caps[:, t : t + 1], h, c, a2, a_proj)
            for i, n in enumerate(lengths):
                if t < n - 1:
                    torch.testing.assert_close(logits[i, t], out[i, 0])
                    torch.testing.assert_close(alphas[i, t], alpha[i, 0])


def test_grouped_captions_equal_repeated_images() -> None:
    """C captions per image (--group-captions) give the same scores, attention and gradients as the
    image repeated C times with one caption each, while W_a a and h0, c0 are computed once per image."""
    torch.manual_seed(0)
    dec = DecoderWithAttention(tiny_config(), encoder_dim=20)
    a = torch.randn(2, 16, 20)
    caps, lens = captions_batch([5, 7, 4, 6, 6, 3], width=8)  # 2 images x 3 captions
    grouped = dec(a, caps.view(2, 3, 8), lens.view(2, 3))
    grouped[0].square().sum().backward()
    grad = dec.attention.enc_att.weight.grad.clone()
    dec.zero_grad()
    repeated = dec(a.repeat_interleave(3, dim=0), caps, lens)
    repeated[0].square().sum().backward()
    for g, r in zip(grouped, repeated):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(grad, dec.attention.enc_att.weight.grad)


def test_grouped_step_gives_the_same_gradients_every_time_on_two_threads() -> None:
    """Seeded runs repeat exactly (README): the C copies of each image's W_a a, h0, c0 must add their
    gradients in a fixed order, also when PyTorch splits the work over threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        dec = DecoderWithAttention(tiny_config(encoded_size=8, attention_dim=32), encoder_dim=32)
        a = torch.randn(8, 64, 32)  # (B, P, D): big enough for PyTorch's parallel kernels
        lengths = torch.randint(3, 9, (8 * 5,)).tolist()
        caps, lens = captions_batch(lengths, width=8)
        grads = []
        for _ in range(3):
            dec.zero_grad()
            logits, _ = dec(a, caps.view(8, 5, 8), lens.view(8, 5))
            logits.square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in dec.parameters() if p.grad is not None]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def test_written_out_lstm_cell_equals_nn_lstmcell() -> None:
    """advance() computes the LSTM cell by hand (to split the input projection); it must be exactly
    what nn.LSTMCell computes with the same weights, which are the ones checkpoints store."""
    torch.manual_seed(0)
    dec = DecoderWithAttention(tiny_config(), encoder_dim=20)
    with torch.no_grad():
        a, a_proj, h, c = dec.prepare(torch.randn(2, 16, 20))
        h, c = torch.randn(2, 3, 24), torch.randn(2, 3, 24)  # (B, K, H): K = 3 hypotheses
        words = torch.randint(0, V, (2, 3))  # (B, K)
        emb = dec.embedding(words)  # (B, K, E)
        w_word, w_ctx = dec.input_weights()
        h1, c1, z, _ = dec.advance(dec.word_gates(emb, w_word), h, c, a, a_proj, w_ctx)
        h2, c2 = dec.lstm(torch.cat([emb, z], -1).flatten(0, 1), (h.flatten(0, 1), c.flatten(0, 1)))
    torch.testing.assert_close(h1.flatten(0, 1), h2)
    torch.testing.assert_close(c1.flatten(0, 1), c2)


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
