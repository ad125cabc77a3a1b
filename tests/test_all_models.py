"""all_models.py: the model's shapes and invariants (teacher forcing equals step-by-step decoding, grouped captions,
the deferred weight gradient, padding), the frozen encoder, and the loss (its formula; one small batch is
memorised)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_train_config
from tiny_models import V, captions_batch, images, padded, tiny_config
from torch.utils.data import DataLoader, Subset

import all_models
from all_models import (
    Attention,
    Captioner,
    DecoderWithAttention,
    Encoder,
    token_loss,
    top5_correct,
)
from pytorch_dataset_class import CaptionDataset, to_model_input
from run_start import make_model_config
from scst import train_step

OVERFIT_STEPS = 80
OVERFIT_CE = 0.1  # cross-entropy (nats per token) that one memorised batch of 8 captions must fall below


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
    tf = dec(torch.randn(3, 16, 20), caps, lens)
    T, M = max(lengths) - 1, sum(n - 1 for n in lengths)  # every token after <start>
    assert tf.logits.shape == (M, V) and tf.targets.shape == (M,) and tf.alphas.shape == (3, T, 16)
    _, alphas = padded(tf)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(alphas[i, : n - 1].sum(-1), torch.ones(n - 1))
        assert bool((alphas[i, n - 1 :] == 0).all())


@pytest.mark.parametrize("position", ["none", "learned", "coords"])
@pytest.mark.parametrize("deep_output", [False, True])
def test_captioner_shapes(position: str, deep_output: bool) -> None:
    model = Captioner(tiny_config(position=position, deep_output=deep_output))
    caps, lens = captions_batch([6, 4])
    x = images(2)
    tf = model(x, caps, lens)
    assert tf.logits.shape == (5 + 3, V) and tf.alphas.shape == (2, 5, 16)
    a = model.annotations(x)
    assert a.shape == (2, 16, 128)
    # cached annotations (B, P, D) pass through the encoder untouched and give the same result
    torch.testing.assert_close(tf.logits, model(a, caps, lens).logits)
    loss, ce, dsr = tf.loss(alpha_c=1.0)
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
    logits, alphas = padded(dec(a, caps, lens))  # (B, T, V), (B, T, P)
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
    grouped = padded(dec(a, caps.view(2, 3, 8), lens.view(2, 3)))
    grouped[0].square().sum().backward()
    grad = dec.attention.enc_att.weight.grad.clone()
    dec.zero_grad()
    repeated = padded(dec(a.repeat_interleave(3, dim=0), caps, lens))
    repeated[0].square().sum().backward()
    for g, r in zip(grouped, repeated):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(grad, dec.attention.enc_att.weight.grad)


def test_the_packed_tokens_are_every_captions_next_words() -> None:
    """forward packs every real token once, step-major: its targets are the captions' next words (every word after
    <start>, <end> included, nothing else), and its loss and top-5 count are those of the captions laid out one by
    one, with the cross-entropy and the doubly stochastic term written out here."""
    torch.manual_seed(0)
    dec = DecoderWithAttention(tiny_config(deep_output=True), encoder_dim=20).double()
    a = torch.randn(2, 16, 20, dtype=torch.float64)
    caps, lens = captions_batch([5, 7, 4, 6, 8, 3], width=9)  # 2 images x 3 captions
    tf = dec(a, caps.view(2, 3, 9), lens.view(2, 3))
    logits, alphas = padded(tf)  # (6, 7, V), (6, 7, P)
    assert len(tf.targets) == int((lens - 1).sum())
    real = torch.arange(7) < (lens - 1).unsqueeze(1)  # (6, T): the same tokens, caption-major
    rows, steps = real.nonzero(as_tuple=True)
    by_token = {(int(r), int(t)): i for i, (r, t) in enumerate(zip(rows, steps))}
    packed_steps = torch.arange(7).unsqueeze(1).expand_as(tf.real)[tf.real]
    perm = torch.tensor([by_token[(int(r), int(t))] for r, t in zip(tf.rows, packed_steps)])
    torch.testing.assert_close(tf.logits, logits[real][perm])
    assert torch.equal(tf.targets, caps[:, 1:8][real][perm])
    ce = F.cross_entropy(logits[real], caps[:, 1:8][real])
    dsr = ((1 - alphas.sum(dim=1)) ** 2).sum(dim=1).mean()  # (6, P) -> (6,) -> scalar
    for x, y in zip(tf.loss(0.7), (ce + 0.7 * dsr, ce, dsr)):
        torch.testing.assert_close(x, y.float())  # the loss is computed in float32
    assert top5_correct(tf.logits, tf.targets) == top5_correct(logits[real], caps[:, 1:8][real])


@pytest.mark.parametrize("grouped", [False, True])
def test_deferred_weight_gradient_equals_autograds(grouped: bool) -> None:
    """The context product's weight gradient is made once after the loop (DeferredLinear); every
    gradient must equal the one autograd makes step by step, in float64 to the last bits."""
    torch.manual_seed(0)
    dec = DecoderWithAttention(tiny_config(), encoder_dim=20).double()
    a = torch.randn(2 if grouped else 6, 16, 20, dtype=torch.float64)
    caps, lens = captions_batch([5, 7, 4, 6, 8, 3], width=9)
    if grouped:
        caps, lens = caps.view(2, 3, 9), lens.view(2, 3)
    grads = []
    for defer in (True, False):
        dec.defer = defer
        dec.zero_grad()
        tf = dec(a, caps, lens)
        tf.loss(1.0)[0].backward()
        grads.append({n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "lstm.weight_ih" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-12, atol=1e-14)


def test_teacher_forcing_under_autocast_on_float32_annotations() -> None:
    """--amp on the feature cache: float32 annotations, bfloat16 output layer. The forward pass runs (it once
    failed writing bfloat16 scores into a float32 tensor) and its scores are the float32 ones, rounded."""
    torch.manual_seed(0)
    dec = DecoderWithAttention(tiny_config(), encoder_dim=20)
    a = torch.randn(2, 16, 20)  # (B, P, D) float32, as to_model_input hands over cached annotations
    caps, lens = captions_batch([5, 7], width=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = dec(a, caps, lens).logits  # (M, V)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    torch.testing.assert_close(logits.float(), dec(a, caps, lens).logits, atol=0.05, rtol=0.05)


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
            dec(a, caps.view(8, 5, 8), lens.view(8, 5)).logits.square().sum().backward()
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
    tf = model(x, caps, lens)
    loss, ce, dsr = tf.loss(alpha_c=1.0)
    # more <pad> columns than any caption needs
    wide = torch.cat([caps, torch.zeros(3, 6, dtype=torch.long)], dim=1)  # (B, L + 6)
    loss_wide = model(x, wide, lens).loss(alpha_c=1.0)[0]
    # garbage instead of <pad> past each caption's end
    junk = caps.clone()
    for i, n in enumerate(lens.tolist()):
        junk[i, n:] = torch.randint(0, V, (caps.size(1) - n,))
    loss_junk = model(x, junk, lens).loss(alpha_c=1.0)[0]
    assert loss_wide.item() == pytest.approx(loss.item(), rel=1e-6)
    assert loss_junk.item() == pytest.approx(loss.item(), rel=1e-6)
    # and each caption's loss is the same alone as in a batch with longer ones
    ce_alone = model(x[1:2], caps[1:2, :4], lens[1:2]).loss(alpha_c=0.0)[1]
    mine = tf.rows == 1  # (M,): caption 1's tokens in the batch's pass
    ce_in_batch = token_loss(tf.logits[mine], tf.targets[mine], tf.alphas[tf.order == 1], alpha_c=0.0)[1]
    assert ce_alone.item() == pytest.approx(ce_in_batch.item(), rel=1e-5)


def test_label_smoothing_trains_against_the_smoothed_target_and_reports_the_plain_cross_entropy() -> None:
    """--label-smoothing s: the training loss is (1 - s) * CE + s * the mean over words of -log p (torch's
    definition, written out here by hand) + alpha_c * dsr; the reported ce is the plain cross-entropy."""
    torch.manual_seed(0)
    model = Captioner(tiny_config()).eval()
    caps, lens = captions_batch([7, 4, 5], seed=1)
    tf = model(images(3), caps, lens)
    plain, ce, dsr = tf.loss(0.5)
    logp = tf.logits.log_softmax(-1)  # (M, V)
    nll, uniform = -logp.gather(1, tf.targets[:, None]).mean(), -logp.mean()
    smoothed, ce_s, dsr_s = tf.loss(0.5, label_smoothing=0.2)
    assert ce.item() == pytest.approx(nll.item(), rel=1e-5)
    assert ce_s.item() == pytest.approx(ce.item(), rel=1e-5) and dsr_s.item() == pytest.approx(dsr.item(), rel=1e-5)
    assert plain.item() == pytest.approx(ce.item() + 0.5 * dsr.item(), rel=1e-5)
    assert smoothed.item() == pytest.approx(0.8 * nll.item() + 0.2 * uniform.item() + 0.5 * dsr.item(), rel=1e-5)
    assert tf.loss(0.5, label_smoothing=0.0)[0].item() == pytest.approx(plain.item(), rel=1e-5)


def test_a_bad_config_or_weights_file_is_a_value_error_that_names_it(tmp_path) -> None:
    """The model raises ValueError; checkpoints.py and the training scripts turn it into one line for the user."""
    with pytest.raises(ValueError, match=r"^model option encoded_size must be in \[1, 64\], got 0$"):
        tiny_config(encoded_size=0)
    with pytest.raises(ValueError, match="file not found"):
        Encoder(tiny_config(encoder="resnet18"), str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a resnet18 state dict"):
        Encoder(tiny_config(encoder="resnet18"), str(tmp_path / "junk.pt"))


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
    loss = model(images(2, 64), caps, lens).loss(alpha_c=1.0)[0]
    loss.backward()
    opt.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats alike


def test_fine_tuned_smallcnn_trains() -> None:
    model = Captioner(tiny_config(fine_tune_encoder=True))
    model.train()
    assert not model.encoder.frozen and all(p.requires_grad for p in model.encoder.parameters())
    assert all(m.training for m in model.encoder.cnn.modules())


# ----------------------------------------------------------------------------------------------
# Loss


def test_doubly_stochastic_term_equals_its_formula() -> None:
    # Two captions, 3 steps, 4 regions; caption 1 has 2 real steps (its third row is zero, as the model leaves it).
    alphas = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]],
                           [[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    # sums over steps: caption 0 (1.0, 0.8, 0.3, 0.9), caption 1 (0.75, 0.25, 0.75, 0.25)
    dsr0 = 0.0**2 + 0.2**2 + 0.7**2 + 0.1**2  # 0.54
    dsr1 = 0.25**2 + 0.75**2 + 0.25**2 + 0.75**2  # 1.25
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])  # <start> .. <end> <pad>
    lengths = torch.tensor([4, 3])
    logits = torch.randn(2, 3, 9)
    real = all_models.real_tokens(lengths, 3)  # (2, 3): the targets after <start>, <end> included
    loss, ce, dsr = all_models.token_loss(logits[real], captions[:, 1:][real], alphas, alpha_c=2.0)
    assert dsr.item() == pytest.approx((dsr0 + dsr1) / 2)
    # cross-entropy: mean over the 5 real targets (5, 6, <end>) and (7, <end>); the <pad> one never counts
    logp = logits.log_softmax(-1)
    real = [logp[0, 0, 5], logp[0, 1, 6], logp[0, 2, 2], logp[1, 0, 7], logp[1, 1, 2]]
    assert ce.item() == pytest.approx(-sum(real).item() / 5, rel=1e-6)
    assert loss.item() == pytest.approx(ce.item() + 2.0 * (dsr0 + dsr1) / 2, rel=1e-6)


def test_overfits_one_small_batch(tiny_shapes: Path) -> None:
    """8 images with one caption each, smallcnn trained too, dropout 0: the cross-entropy falls below
    OVERFIT_CE within OVERFIT_STEPS Adam steps (lr 1e-2), while the doubly stochastic term sits within 1% of
    its floor P (1 - T/P)^2 per caption (T steps, P = 16 regions: attention spread as evenly as it can be)."""
    ds = CaptionDataset(tiny_shapes / "train.h5")
    # caption 0 of 8 images: the 5 captions of one image differ, no model can predict them all
    x, caps, lens = next(iter(DataLoader(Subset(ds, range(0, 40, 5)), batch_size=8)))
    x = to_model_input(x, "cpu")  # (8, 3, S, S) float32
    torch.manual_seed(0)
    cfg = tiny_train_config(tiny_shapes, Path("unused"), dropout=0.0, embed_dim=32, attention_dim=32, decoder_dim=64,
                   fine_tune_encoder=True)
    model = Captioner(make_model_config(cfg, len(json.loads((tiny_shapes / "word_map.json").read_text()))))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(OVERFIT_STEPS):
        out = train_step(model, x, caps, lens, opt, alpha_c=1.0, grad_clip=5.0)
    P = 16
    floor = ((1 - (lens - 1).float() / P) ** 2 * P).mean().item()
    assert out["ce"] < OVERFIT_CE, out
    assert out["dsr"] == pytest.approx(floor, rel=0.01)

