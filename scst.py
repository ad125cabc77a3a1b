"""Self-critical sequence training (Rennie et al. 2017): CIDEr-D as the reward, sampled captions, the baseline.

    python train.py --scst --init-from model_files/flickr8k_lite0/last.pt --run flickr8k_scst ...

For each image the model samples `--scst-samples` captions; each is rewarded with its CIDEr-D against the
image's reference captions (document frequencies from the training references), minus a baseline: the mean
reward of the image's other samples (`mean`, the "new self-critical" variant) or the reward of the model's
greedy caption (`greedy`, the paper's). The loss is the policy gradient's surrogate
-(reward - baseline) * log p(token), averaged over the sampled tokens. Sampling and the gradient pass both
run with dropout off (the default) or both under the same dropout masks (`--scst-dropout`), so the gradient is
that of the policy that produced the samples.

Letters as in all_models.py; K here is the number of samples per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from all_models import Captioner, DecoderWithAttention, token_loss
from decoding import banned_mask, decode_words, greedy_decode
from metrics import CiderD, sentence_bleu4


def dropout_masks(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Inverted-dropout masks, as nn.Dropout draws them: 0 with probability p, else 1/(1-p)."""
    return torch.empty(shape, device=device).bernoulli_(1 - p) / (1 - p)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of probs (N, V), drawn with those probabilities; a zero-probability index never.

    By the inverse of the cumulative distribution: one uniform number a row. torch.multinomial draws an
    exponential number per entry (V of them a row), which took a fifth of the sampling pass on a CPU.
    """
    cdf = probs.cumsum(dim=-1)  # (N, V)
    u = torch.rand(probs.size(0), 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]  # (N, 1), in [0, total)
    # right=True: the first index whose cumulative sum exceeds u, which is one that added mass.
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)  # (N,)


@torch.no_grad()
def sample_captions(decoder: DecoderWithAttention, a: torch.Tensor, word_map: dict[str, int], samples: int,
                    max_len: int, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`samples` captions per image drawn word by word from the model's distribution, all B*K at once.

    a: (B, P, D_enc) -> captions (B, K, L) `<start> w1 .. wn <end> <pad>...` (no `<end>` when max_len words were
    drawn without it), lengths (B, K) of tokens with `<start>`, as the teacher-forced forward takes them, and
    with dropout > 0 the output layer's dropout masks (B, K, L - 1, output_dim) the words were drawn under
    (None without).
    """
    B, K = a.size(0), samples
    start, end, pad = word_map["<start>"], word_map["<end>"], word_map["<pad>"]
    a, a_proj, h, c = decoder.prepare(a)  # (B, P, D), (B, P, A), (B, H), (B, H)
    h, c = h.unsqueeze(1).expand(-1, K, -1), c.unsqueeze(1).expand(-1, K, -1)  # (B, K, H)
    banned = banned_mask(decoder.cfg.vocab_size, word_map, a.device)  # (V,)
    words = torch.full((B, K), start, dtype=torch.long, device=a.device)  # (B, K)
    done = torch.zeros(B, K, dtype=torch.bool, device=a.device)  # (B, K)
    drawn, keeps = [words], []
    for _ in range(max_len):
        keep = None
        if dropout > 0:
            keep = dropout_masks((B, K, decoder.output_dim), dropout, a.device)  # (B, K, F)
            keeps.append(keep)
        logits, h, c, _ = decoder.step(words, h, c, a, a_proj, keep)  # (B, K, V)
        probs = F.softmax(logits.float() + banned, dim=-1)  # (B, K, V)
        words = draw(probs.view(B * K, -1)).view(B, K)  # (B, K)
        words = torch.where(done, torch.full_like(words, pad), words)
        drawn.append(words)
        done |= words == end
        if bool(done.all()):
            break
    captions = torch.stack(drawn, dim=2)  # (B, K, L)
    real = captions != pad  # (B, K, L): <start>, the words and <end>
    masks = torch.stack(keeps, dim=2) if keeps else None  # (B, K, L - 1, F)
    return captions, real.sum(dim=2), masks  # (B, K, L), (B, K), (B, K, L - 1, F) or None


def scst_loss(model: torch.nn.Module, bare: Captioner, x: torch.Tensor,
              references: Sequence[Sequence[Sequence[str]]], cider: CiderD, word_map: dict[str, int], *,
              samples: int, baseline: str, max_len: int, dropout: bool = False, ce_weight: float = 0.0,
              captions: torch.Tensor | None = None, lengths: torch.Tensor | None = None, alpha_c: float = 0.0,
              label_smoothing: float = 0.0, bleu_weight: float = 0.0, entropy_weight: float = 0.0,
              autocast: AbstractContextManager | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The self-critical loss of one batch and its statistics {"reward", "baseline"} (the mean reward per sample:
    CIDEr-D, plus the BLEU-4 term with a bleu_weight; "ce" with a ce_weight; "entropy" with an entropy_weight).

    `model` runs the gradient pass (the DDP wrapper under torchrun, else `bare`), `bare` the sampling; both
    in eval mode. With `dropout`, the samples are drawn under the decoder's output dropout and the gradient
    pass applies the same masks, so it is still the gradient of the policy that drew them. x: images
    (B, 3, S, S) or cached annotations (B, P, D); references[b]: image b's reference token lists.
    ce_weight > 0 adds that times the cross-entropy training loss (with alpha_c's doubly stochastic term) of
    the reference captions (B, C, L) with lengths (B, C), label_smoothing applied as in cross-entropy training:
    a mixed objective, computed in the same forward pass as the samples' log-probabilities. bleu_weight > 0 adds
    that times each caption's sentence BLEU-4 (metrics.sentence_bleu4) to its CIDEr-D reward, the baseline's too.
    entropy_weight > 0 subtracts that times the mean entropy (in nats) of the model's word distributions at the
    sampled tokens: a bonus for keeping several words likely, against the policy settling on a few captions.
    """
    rev = {i: w for w, i in word_map.items()}
    p = bare.decoder.cfg.dropout if dropout else 0.0
    with torch.no_grad(), autocast or nullcontext():
        a = bare.annotations(x)  # (B, P, D)
        sampled, sampled_len, keep = sample_captions(bare.decoder, a, word_map, samples, max_len, p)  # (B, K, L)..
    B, K = sampled_len.shape
    words = [decode_words(row, rev) for row in sampled.view(B * K, -1).tolist()]
    owner = [b for b in range(B) for _ in range(K)]  # sample -> its image

    def score(captions: list[list[str]], owner: list[int] | None = None) -> torch.Tensor:
        value = cider.scores(captions, references, owner)  # (n,)
        if bleu_weight > 0:
            value = value + bleu_weight * sentence_bleu4(captions, references, owner)
        return torch.from_numpy(value).float()

    reward = score(words, owner).view(B, K)  # (B, K)
    if baseline == "mean":  # each sample against the mean of the image's other samples
        base = (reward.sum(dim=1, keepdim=True) - reward) / max(K - 1, 1)  # (B, K)
    else:  # the greedy caption's reward
        with autocast or nullcontext():
            greedy = greedy_decode(bare.decoder, a, word_map, max_len)
        base = score([decode_words(g.tokens, rev) for g in greedy]).view(B, 1).expand(B, K)  # (B, K)
    advantage = (reward - base).to(x.device)  # (B, K)
    rows, rows_len = sampled, sampled_len  # what the gradient pass reads
    if ce_weight > 0:  # the references join the samples as more rows of each image: one forward pass for both
        if captions is None or lengths is None:
            raise ValueError("ce_weight > 0 needs the reference captions and their lengths")
        L = max(sampled.size(2), captions.size(2))
        pad = word_map["<pad>"]
        rows = torch.cat([F.pad(sampled, (0, L - sampled.size(2)), value=pad),
                          F.pad(captions, (0, L - captions.size(2)), value=pad)], dim=1)  # (B, K + C, L)
        rows_len = torch.cat([sampled_len, lengths], dim=1)  # (B, K + C)
        if keep is not None:  # ones past a sample's last step; fresh masks for the references
            ref_keep = dropout_masks((B, captions.size(1), L - 1, keep.size(3)), p, keep.device)  # (B, C, L - 1, F)
            keep = torch.cat([F.pad(keep, (0, 0, 0, L - 1 - keep.size(2)), value=1.0), ref_keep], dim=1)
    N = rows.size(1)  # rows per image: K samples (+ C references)
    # A frozen encoder's annotations are what the sampling used: the gradient pass takes them instead of the images.
    with autocast or nullcontext():
        keep = keep.flatten(0, 1) if keep is not None else None  # (B*N, L - 1, F)
        tf = model(a if bare.encoder.frozen else x, rows, rows_len, keep)  # M real tokens, packed
    # B * N rows, image-major in the input: row r is image r // N's (r % N)-th.
    row = tf.rows  # (M,): the input row of each token
    sample = row % N < K  # (M,): a sampled token, not a reference's
    logp_all = F.log_softmax(tf.logits[sample].float(), dim=-1)  # (M_s, V)
    logp = logp_all.gather(1, tf.targets[sample].unsqueeze(1)).squeeze(1)  # (M_s,)
    owner = (row // N * K + row % N)[sample]  # (M_s,): each token's sample, as advantage.view(-1) counts them
    loss = -(advantage.view(-1)[owner] * logp).sum() / max(len(logp), 1)
    stats = {"reward": float(reward.mean()), "baseline": float(base.mean())}
    if entropy_weight > 0:
        entropy = -(logp_all.exp() * logp_all).sum(dim=1).mean()  # nats per sampled token
        loss = loss - entropy_weight * entropy
        stats["entropy"] = entropy.item()
    if ce_weight > 0:
        references_rows = tf.order % N >= K  # (B * N,) in the pass's row order
        ce_loss, ce, _ = token_loss(tf.logits[~sample], tf.targets[~sample], tf.alphas[references_rows], alpha_c,
                                    label_smoothing)
        loss = loss + ce_weight * ce_loss
        stats["ce"] = ce.item()
    return loss, stats
