"""Tiny models with random weights, and captions for them: what the model, decoding, checkpoint and ensemble tests
share. Plain functions and constants, imported as `from tiny_models import ...`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from all_models import DecoderWithAttention, ModelConfig

if TYPE_CHECKING:
    from all_models import TeacherForced

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
# Tiny decoders with random weights (decoding, ensembles)

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
