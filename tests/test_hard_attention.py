"""Hard (stochastic) attention, paper section 4.1: the REINFORCE estimator against the exact gradient of the lower
bound L_s on a toy, the expected-context branch against soft attention, decoding and attention maps, training
runs (metrics, exact resume, checkpoints), self-critical training from a hard model, and the options."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import one_line, run_script, sigint_after_step, tiny_train_args, tiny_train_config
from tiny_models import WORD_MAP, captions_batch, images, padded, tiny_config

import all_models
import imcap
import train
from all_models import Captioner, DecoderWithAttention, HardSample, ModelConfig, reinforce_loss
from checkpoints import load_checkpoint, model_from_checkpoint
from decoding import DecodeConfig, beam_search, greedy_decode
from metrics import CiderD
from scst import Batch, CrossEntropy, HardAttention, ScstConfig, sample_captions, scst_loss

# ----------------------------------------------------------------------------------------------
# The estimator


def toy_decoder(T: int) -> tuple[DecoderWithAttention, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A hard-attention decoder over 3 regions with a 2-word vocabulary, in float64, every weight from N(0, 1);
    one image's annotations a (1, 3, 3) and one caption (1, T + 1) of T target words, with its length."""
    cfg = ModelConfig(vocab_size=2, encoder="smallcnn", encoded_size=2, embed_dim=4, attention_dim=4, decoder_dim=4,
                      dropout=0.0, attention="hard")
    decoder = DecoderWithAttention(cfg, encoder_dim=3).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    a = 2 * torch.randn(1, 3, 3, generator=g, dtype=torch.float64)  # (1, P, D): three distinct regions
    caption = torch.tensor([[1, 0, 1, 1, 0][: T + 1]])  # (1, T + 1): the first token is the given one
    return decoder, a, caption, torch.tensor([T + 1])


def test_reinforce_expected_gradient_is_the_exact_gradient_of_the_lower_bound(monkeypatch) -> None:
    """L_s = sum over every location sequence s of p(s | a) log p(y | s, a), enumerated (3 regions, 3 words: 27
    sequences) and differentiated exactly. The training loss's gradient (word loss + reinforce_loss), averaged over
    20,000 sampled sequences, must match it: the attention weights' part within 6% (relative error of the vector;
    1-3% is what 20,000 samples give), the whole within 2%. The word loss alone misses the attention's gradient."""
    T = 3
    decoder, a, caption, length = toy_decoder(T)
    params = list(decoder.parameters())
    attention = [i for i, (name, _) in enumerate(decoder.named_parameters()) if name.startswith("attention.")]

    def forward(n: int):
        return decoder(a.expand(n, -1, -1), caption.expand(n, -1), length.expand(n), sample=torch.ones(n, dtype=bool))

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        found = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(found, params)]

    # Exact: one row per location sequence, the draws replaced by the enumeration.
    sequences = torch.tensor(list(itertools.product(range(3), repeat=T)))  # (27, T)
    steps = iter(range(T))
    with monkeypatch.context() as m:
        m.setattr(all_models, "draw", lambda probs: sequences[: probs.size(0), next(steps)])
        tf = forward(len(sequences))
    p_s = tf.log_p_regions.exp()  # (27,) p(s | a)
    assert float(p_s.detach().sum()) == pytest.approx(1.0, abs=1e-12)
    L_s = (p_s * tf.log_likelihood()).sum()
    exact = grads(L_s)

    def estimate(with_reinforce: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        tf = forward(20_000)
        loss = F.cross_entropy(tf.logits, tf.targets)  # the word loss: the mean over the M = 20,000 * T tokens
        if with_reinforce:
            loss = loss + reinforce_loss(tf, tf.log_likelihood() - float(L_s.detach()), entropy_weight=0.0)
        return [-T * g for g in grads(loss)]  # the loss is -1/M sum of the samples' L_s estimates: undo the -1/M

    def error(got: list[torch.Tensor], which) -> float:
        g, e = (torch.cat([x[i].flatten() for i in which]) for x in (got, exact))
        return float((g - e).norm() / e.norm())

    mc = estimate(with_reinforce=True)
    assert error(mc, attention) < 0.06
    assert error(mc, range(len(params))) < 0.02
    assert error(estimate(with_reinforce=False), attention) == pytest.approx(1.0)  # no gradient reaches alpha


def test_the_entropy_term_raises_the_attentions_entropy() -> None:
    """The authors' sign: the loss has -lambda_e * H, so a step down its gradient spreads the attention."""
    decoder, a, caption, length = toy_decoder(3)
    n = 50
    tf = decoder(a.expand(n, -1, -1), caption.expand(n, -1), length.expand(n), sample=torch.ones(n, dtype=bool))
    before = tf.entropy.sum().item()
    reinforce_loss(tf, torch.zeros(n, dtype=torch.float64), entropy_weight=1.0).backward()
    with torch.no_grad():
        for p in decoder.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    torch.manual_seed(0)
    tf = decoder(a.expand(n, -1, -1), caption.expand(n, -1), length.expand(n), sample=torch.zeros(n, dtype=bool))
    assert tf.entropy.sum().item() > before


def test_a_sampling_row_takes_its_drawn_regions_annotation_and_the_others_the_expected_one(monkeypatch) -> None:
    a = torch.randn(3, 4, 5)  # (n, P, D)
    alpha = torch.softmax(torch.randn(3, 1, 4), dim=-1)  # (n, 1, P)
    z = torch.bmm(alpha, a)  # (n, 1, D): the expected context
    monkeypatch.setattr(all_models, "draw", lambda probs: torch.tensor([2, 0, 3]))
    rule = HardSample(torch.tensor([True, False, True]))
    out = rule(z, alpha, a)  # (n, 1, D)
    assert torch.equal(out[0, 0], a[0, 2]) and torch.equal(out[1], z[1]) and torch.equal(out[2, 0], a[2, 3])
    torch.testing.assert_close(rule.log_p[0], torch.stack([alpha[0, 0, 2].log(), torch.tensor(0.0),
                                                           alpha[2, 0, 3].log()]))
    torch.testing.assert_close(rule.entropy[0], -(alpha[:, 0] * alpha[:, 0].log()).sum(-1))


# ----------------------------------------------------------------------------------------------
# The expected-context branch is soft attention, to the bit


def soft_and_hard_twins(**kw) -> tuple[Captioner, Captioner]:
    torch.manual_seed(0)
    soft = Captioner(tiny_config(**kw))
    hard = Captioner(tiny_config(attention="hard", **kw))
    hard.load_state_dict(soft.state_dict())  # the same weights: only the context differs
    return soft, hard


@pytest.mark.parametrize("grouped", [False, True])
def test_the_expected_context_gives_exactly_soft_attentions_outputs_and_gradients(grouped: bool) -> None:
    soft, hard = soft_and_hard_twins(deep_output=True)
    caps, lens = captions_batch([5, 7, 4, 6, 3, 7])
    if grouped:  # 3 images, 2 captions each
        caps, lens = caps.view(3, 2, -1), lens.view(3, 2)
    x = images(caps.size(0))
    tfs = [soft(x, caps, lens), hard(x, caps, lens, sample=torch.zeros(x.size(0), dtype=bool))]
    for tf in tfs:
        tf.loss(0.0)[0].backward()
    assert torch.equal(tfs[0].logits, tfs[1].logits) and torch.equal(tfs[0].alphas, tfs[1].alphas)
    assert not tfs[1].sampled.any()
    for (name, p), q in zip(soft.named_parameters(), hard.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
    # Not sampling at all (evaluation, --scst): the same again, in eval mode.
    soft.eval(), hard.eval()
    with torch.no_grad():
        assert torch.equal(soft(x, caps, lens).logits, hard(x, caps, lens).logits)


def test_an_image_samples_for_all_its_captions_and_the_objective_with_p_one_is_cross_entropys() -> None:
    soft, hard = soft_and_hard_twins()
    caps, lens = captions_batch([5, 7, 4, 6, 3, 7])
    caps, lens = caps.view(3, 2, -1), lens.view(3, 2)
    x = images(3)
    sample = torch.tensor([True, False, True])
    tf = hard(x, caps, lens, sample=sample)
    assert torch.equal(tf.sampled, sample[tf.order // 2])  # rows in the pass's order, image r // 2
    assert (tf.log_p_regions[tf.sampled] < 0).all() and (tf.log_p_regions[~tf.sampled] == 0).all()
    # hard_expected_p 1 and no entropy bonus: the cross-entropy objective exactly, value and gradients.
    batch = Batch(x, caps, lens, None)
    losses = [CrossEntropy(0.0)(soft, batch)[0], HardAttention(1.0, 0.0)(hard, batch)[0]]
    assert torch.equal(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for p, q in zip(soft.parameters(), hard.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


def test_the_baseline_starts_at_the_first_batchs_mean_then_moves_by_a_tenth() -> None:
    _, hard = soft_and_hard_twins()
    caps, lens = captions_batch([5, 7, 4, 6])
    batch = Batch(images(4), caps, lens, None)
    objective = HardAttention(0.0, 0.002)  # every image samples
    means = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        _, stats = objective(hard, batch)
        torch.manual_seed(seed)
        means.append(hard(batch.x, caps, lens, sample=torch.rand(4) >= 0.0).log_likelihood().mean().item())
    assert stats["attn_baseline"] == pytest.approx(means[0])  # the second step used the first batch's mean
    assert objective.baseline == pytest.approx(0.9 * means[0] + 0.1 * means[1])
    assert objective.state_dict() == {"baseline": objective.baseline}


# ----------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("context", ["expected", "argmax"])
def test_beam_one_is_greedy_and_the_maps_are_one_hot_at_the_most_likely_region(context: str) -> None:
    _, hard = soft_and_hard_twins()
    hard.eval()
    a = hard.annotations(images(4))  # (B, P, D)
    greedy = greedy_decode(hard.decoder, a, WORD_MAP, 8, context)
    beam = beam_search(hard.decoder, a, WORD_MAP, 1, 8, context=context)
    for g, b in zip(greedy, beam):
        assert g.tokens == b.tokens and g.score == pytest.approx(b.score, abs=1e-5)
        assert torch.equal(g.alphas, b.alphas)
        assert set(g.alphas.flatten().tolist()) <= {0.0, 1.0} and (g.alphas.sum(dim=1) == 1).all()
    # The map's region is where the attention weights peak, and "argmax" decodes from that region's annotation.
    dec = hard.decoder
    prepared = dec.prepare(a)
    h, c = prepared[2].unsqueeze(1), prepared[3].unsqueeze(1)  # (B, 1, H)
    words = torch.full((4, 1), WORD_MAP["<start>"])
    with torch.no_grad():
        weights = dec.attention(prepared[0], prepared[1], h)[1]  # (B, 1, P)
        logits, _, _, alpha = dec.step(words, h, c, *prepared[:2], context=context)
        other = dec.step(words, h, c, *prepared[:2], context="argmax" if context == "expected" else "expected")[0]
    assert torch.equal(alpha.argmax(-1), weights.argmax(-1))
    assert not torch.equal(logits, other)  # the two contexts are two captioners


def test_the_hard_context_option_is_checked_and_soft_models_ignore_it() -> None:
    with pytest.raises(Exception, match="--hard-context must be one of expected, argmax"):
        DecodeConfig(hard_context="sampled")
    soft, _ = soft_and_hard_twins()
    a = soft.eval().annotations(images(2))
    assert [c.tokens for c in greedy_decode(soft.decoder, a, WORD_MAP, 8, "argmax")] == \
        [c.tokens for c in greedy_decode(soft.decoder, a, WORD_MAP, 8)]


# ----------------------------------------------------------------------------------------------
# Training runs


HARD = dict(attention="hard")


def test_a_hard_run_logs_its_statistics_and_resumes_exactly(tiny_shapes: Path, tmp_path: Path, monkeypatch) -> None:
    """Stopped after epoch 1, or by Ctrl-C in epoch 2, and resumed: the history and the weights of the
    uninterrupted run, the moving baseline included (it is in the checkpoint)."""
    full = train.train(tiny_train_config(tiny_shapes, tmp_path, run="full", epochs=2, **HARD), progress=False)
    train.train(tiny_train_config(tiny_shapes, tmp_path, run="a", epochs=1, **HARD), progress=False)
    after_epoch = train.train(tiny_train_config(tiny_shapes, tmp_path, run="a2", epochs=2,
                                                resume=str(tmp_path / "a/last.pt"), **HARD), progress=False)
    with sigint_after_step(monkeypatch, 20), pytest.raises(train.Interrupted):
        train.train(tiny_train_config(tiny_shapes, tmp_path, run="b", epochs=2, **HARD), progress=False)
    mid = load_checkpoint(tmp_path / "b/last.pt")
    assert mid["step_in_epoch"] == 5 and isinstance(mid["objective_state"]["baseline"], float)
    after_sigint = train.train(tiny_train_config(tiny_shapes, tmp_path, run="b2", epochs=2,
                                                 resume=str(tmp_path / "b/last.pt"), **HARD), progress=False)
    timings = ("seconds", "images_per_s")
    want = [{k: v for k, v in h.items() if k not in timings} for h in full["history"]]
    assert {"train_attn_baseline", "train_attn_entropy"} <= want[0].keys() and "train_dsr" not in want[0]
    assert want[0]["train_attn_baseline"] < 0 < want[0]["train_attn_entropy"] <= torch.log(torch.tensor(16.0)) + 1e-6
    ref = load_checkpoint(tmp_path / "full/last.pt")
    assert ref["model_config"]["attention"] == "hard" and ref["train_config"]["hard_expected_p"] == 0.5
    for name, summary in (("a2", after_epoch), ("b2", after_sigint)):
        got = [{k: v for k, v in h.items() if k not in timings} for h in summary["history"]]
        assert got == want, name
        ck = load_checkpoint(tmp_path / name / "last.pt")
        assert ck["objective_state"] == ref["objective_state"]
        for k, v in ref["model_state"].items():
            assert torch.equal(ck["model_state"][k], v), (name, k)
    model = model_from_checkpoint(ref)[0]  # the checkpoint round trip: a hard model, in eval mode
    assert model.config.attention == "hard" and not model.training


@pytest.fixture(scope="module")
def hard_run(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hard")
    train.train(tiny_train_config(tiny_shapes, out, run="r", epochs=1, **HARD), progress=False)
    return out / "r"


def test_self_critical_training_from_a_hard_model_trains_the_captioner_that_decodes(hard_run: Path, tiny_shapes,
                                                                                    tmp_path: Path) -> None:
    """--scst samples words with the decoding context, and its gradient pass scores them with that context (it
    samples no regions): the teacher-forced scores of the sampled captions are those they were drawn from."""
    _, hard = soft_and_hard_twins()
    d = hard.eval().decoder
    a = hard.annotations(images(2))  # (B, P, D)
    torch.manual_seed(0)
    caps, lens, _ = sample_captions(d, a, WORD_MAP, samples=3, max_len=6)
    B, K, L = caps.shape
    aa, a_proj, h, c = d.prepare(a)
    h, c = h.unsqueeze(1).expand(-1, K, -1), c.unsqueeze(1).expand(-1, K, -1)  # (B, K, H)
    replay = []
    with torch.no_grad():
        for t in range(L - 1):
            logits, h, c, _ = d.step(caps[:, :, t], h, c, aa, a_proj)  # (B, K, V)
            replay.append(logits)
        tf = d(a, caps, lens)
    replay = torch.stack(replay, dim=2).view(B * K, L - 1, -1)  # (B*K, L - 1, V)
    forced, _ = padded(tf)  # (B*K, T, V)
    assert tf.sampled is None
    for row, n in enumerate(lens.view(-1).tolist()):
        torch.testing.assert_close(forced[row, : n - 1], replay[row, : n - 1], rtol=1e-5, atol=1e-5)
    # The loss itself, and a run of it from a trained hard model (which keeps its attention).
    refs = [[["w4", "w5"]], [["w6"]]]
    loss, _ = scst_loss(hard, hard, images(2), refs, CiderD(refs), WORD_MAP, ScstConfig(samples=2, max_len=6))
    assert torch.isfinite(loss)
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path, "--init-from", hard_run / "best.pt",
                                                "--attention", "hard", "--scst", "--scst-samples", "2",
                                                "--epochs", "1", "--run", "scst"), mode="in_process")
    assert r.rc == 0, str(r)
    assert load_checkpoint(tmp_path / "scst/last.pt")["model_config"]["attention"] == "hard"


def test_decoding_a_hard_checkpoint_with_either_context(hard_run: Path) -> None:
    photo = images(1, size=32)[0]
    for context in ("expected", "argmax"):
        captioner = imcap.load(hard_run / "best.pt", "cpu", beam_size=2, hard_context=context)
        assert captioner.decode.hard_context == context
        result = captioner.batch(((photo - photo.min()) / (photo.max() - photo.min()) * 255).byte().unsqueeze(0))[0]
        maps = result.attention.flatten(1)  # (T, P)
        assert len(maps) == len(result.beam_words) and set(maps.flatten().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("extra, message", [
    (("--attention", "hard", "--alpha-c", "0.5"), "--alpha-c only applies with --attention soft"),
    (("--hard-entropy-weight", "0.01"), "--hard-entropy-weight only applies with --attention hard"),
    (("--attention", "hard", "--hard-expected-p", "1.5"), "--hard-expected-p must be in [0, 1], got 1.5"),
    (("--attention", "hard", "--hard-entropy-weight", "-1"), "--hard-entropy-weight must be >= 0, got -1.0"),
    (("--attention", "hard", "--scst", "--init-from", "x.pt", "--hard-expected-p", "0.3"),
     "--hard-expected-p trains hard attention by cross-entropy: --scst samples no regions"),
    (("--attention", "sharp"), "invalid choice: 'sharp'"),
])
def test_hard_attention_options_that_cannot_mean_what_they_say_are_refused(tiny_shapes: Path, tmp_path: Path,
                                                                           extra: tuple, message: str) -> None:
    r = run_script("train.py", *tiny_train_args(tiny_shapes, tmp_path, *extra), mode="in_process")
    one_line(r, 2, message)
