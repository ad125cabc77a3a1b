"""decoding.py: greedy decoding and batched beam search on tiny decoders with random weights, and DecodeConfig (the
decoding options inference.py and evaluate.py share)."""

from __future__ import annotations

import itertools
import re
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from tiny_models import P, annotations, forced_captions, make_decoder, make_word_map, padded, summed_log_probs

import evaluate
import inference
from all_models import HARD_CONTEXTS, DecoderWithAttention
from cli import AMP_CHOICES, UserError, field_help
from decoding import DecodeConfig, beam_search, greedy_decode


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
            # its own option, taking several sizes: some help, and its default shown
            assert re.search(r"--beam-sizes BEAM_SIZES \[BEAM_SIZES \.\.\.\] \w.*? \(default: \[1, 3, 5\]\)", text)
            continue
        flag = "--" + f.name.replace("_", "-")
        choices = {"amp": AMP_CHOICES, "hard_context": HARD_CONTEXTS}.get(f.name)
        metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()  # choices show as such
        assert f"{flag} {metavar} {helps[f.name]} (default: {f.default})" in text
    argv = ["photo.jpg"] if script is inference else ["--checkpoint", "c.pt", "--data", "d"]
    assert DecodeConfig.from_args(script.parse_args(argv)) == DecodeConfig()
