"""Self-critical sequence training (Rennie et al. 2017): CIDEr-D as the reward, sampled captions, the baseline.

    python train.py --scst --init-from model_files/flickr8k_lite0/last.pt --run flickr8k_scst ...

For each image the model samples `--scst-samples` captions; each is rewarded with its CIDEr-D against the
image's reference captions (document frequencies from the training references), minus a baseline: the mean
reward of the image's other samples (`mean`, the "new self-critical" variant) or the reward of the model's
greedy caption (`greedy`, the paper's). The loss is the policy gradient's surrogate
-(reward - baseline) * log p(token), averaged over the sampled tokens. Sampling and the gradient pass both
run with dropout off, so the gradient is that of the policy that produced the samples.

Letters as in all_models.py; K here is the number of samples per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from all_models import Captioner, DecoderWithAttention, _banned_mask, decode_words, greedy_decode, real_tokens
from metrics import CiderD


@torch.no_grad()
def sample_captions(decoder: DecoderWithAttention, a: torch.Tensor, word_map: dict[str, int], samples: int,
                    max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` captions per image drawn word by word from the model's distribution, all B*K at once.

    a: (B, P, D_enc) -> captions (B, K, L) `<start> w1 .. wn <end> <pad>...` (no `<end>` when max_len words were
    drawn without it) and lengths (B, K) of tokens with `<start>`, as the teacher-forced forward takes them.
    """
    B, K = a.size(0), samples
    start, end, pad = word_map["<start>"], word_map["<end>"], word_map["<pad>"]
    a, a_proj, h, c = decoder.prepare(a)  # (B, P, D), (B, P, A), (B, H), (B, H)
    h, c = h.unsqueeze(1).expand(-1, K, -1), c.unsqueeze(1).expand(-1, K, -1)  # (B, K, H)
    banned = _banned_mask(decoder.cfg.vocab_size, word_map, a.device)  # (V,)
    words = torch.full((B, K), start, dtype=torch.long, device=a.device)  # (B, K)
    done = torch.zeros(B, K, dtype=torch.bool, device=a.device)  # (B, K)
    drawn = [words]
    for _ in range(max_len):
        logits, h, c, _ = decoder.step(words, h, c, a, a_proj)  # (B, K, V)
        probs = F.softmax(logits.float() + banned, dim=-1)  # (B, K, V)
        words = torch.multinomial(probs.view(B * K, -1), 1).view(B, K)  # (B, K)
        words = torch.where(done, torch.full_like(words, pad), words)
        drawn.append(words)
        done |= words == end
        if bool(done.all()):
            break
    captions = torch.stack(drawn, dim=2)  # (B, K, L)
    real = captions != pad  # (B, K, L): <start>, the words and <end>
    return captions, real.sum(dim=2)  # (B, K, L), (B, K)


def scst_loss(model: torch.nn.Module, bare: Captioner, x: torch.Tensor,
              references: Sequence[Sequence[Sequence[str]]], cider: CiderD, word_map: dict[str, int], *,
              samples: int, baseline: str, max_len: int,
              autocast: AbstractContextManager | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The self-critical loss of one batch and its statistics {"reward", "baseline"} (mean CIDEr-D per sample).

    `model` runs the gradient pass (the DDP wrapper under torchrun, else `bare`), `bare` the sampling; both
    in eval mode (no dropout). x: images (B, 3, S, S) or cached annotations (B, P, D); references[b]: image
    b's reference token lists.
    """
    rev = {i: w for w, i in word_map.items()}
    with torch.no_grad(), autocast or nullcontext():
        a = bare.annotations(x)  # (B, P, D)
        captions, lengths = sample_captions(bare.decoder, a, word_map, samples, max_len)  # (B, K, L), (B, K)
    B, K = lengths.shape
    words = [decode_words(row, rev) for row in captions.view(B * K, -1).tolist()]
    owner = [b for b in range(B) for _ in range(K)]  # sample -> its image
    reward = torch.from_numpy(cider.scores(words, references, owner)).float().view(B, K)  # (B, K)
    if baseline == "mean":  # each sample against the mean of the image's other samples
        base = (reward.sum(dim=1, keepdim=True) - reward) / max(K - 1, 1)  # (B, K)
    else:  # the greedy caption's reward
        with autocast or nullcontext():
            greedy = greedy_decode(bare.decoder, a, word_map, max_len)
        base = torch.from_numpy(cider.scores([decode_words(g.tokens, rev) for g in greedy], references)).float()
        base = base.view(B, 1).expand(B, K)  # (B, K)
    advantage = (reward - base).to(x.device)  # (B, K)
    # A frozen encoder's annotations are what the sampling used: the gradient pass takes them instead of the images.
    with autocast or nullcontext():
        logits, _ = model(a if bare.encoder.frozen else x, captions, lengths)  # (B*K, T, V) image-major rows
    T = logits.size(1)
    targets = captions.view(B * K, -1)[:, 1 : T + 1]  # (B*K, T)
    real = real_tokens(lengths.view(-1), T)  # (B*K, T) sampled tokens
    logp = F.log_softmax(logits.float(), dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)  # (B*K, T)
    loss = -(advantage.view(-1, 1) * logp * real).sum() / real.sum().clamp(min=1)
    return loss, {"reward": float(reward.mean()), "baseline": float(base.mean())}
