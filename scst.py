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

import math
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from all_models import Captioner, DecoderWithAttention, _banned_mask, decode_words, greedy_decode

NGRAMS = 4  # CIDEr-D: 1- to 4-grams, equally weighted
SIGMA = 6.0  # CIDEr-D's Gaussian length penalty: exp(-(len_hyp - len_ref)^2 / (2 sigma^2))


def ngram_counts(tokens: Sequence[str]) -> Counter:
    """Every 1- to 4-gram of a caption with its count."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, NGRAMS + 1) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D (Vedantam et al. 2015, as pycocoevalcap computes it) with fixed document frequencies.

    `corpus[i]` are the reference captions (token lists) of document i: an n-gram's document frequency is the
    number of documents whose references hold it, and log(len(corpus)) is the idf's numerator. SCST takes the
    training references as the corpus, validation the val references (as pycocoevalcap does on a test set).
    """

    def __init__(self, corpus: Sequence[Sequence[Sequence[str]]]) -> None:
        df: Counter = Counter()
        for refs in corpus:
            df.update({g for ref in refs for g in ngram_counts(ref)})
        self.df = df
        self.log_docs = math.log(float(max(len(corpus), 1)))

    def scores(self, candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
               owner: Sequence[int] | None = None) -> np.ndarray:
        """CIDEr-D of each candidate (token list) against its references -> (N,) float64, x 10 as reported.
        Candidate i is scored against references[owner[i]] (owner = None: references[i]), so that the K samples
        of an image share one copy of its references.

        Vectorised: every text is a sparse tf-idf vector (one entry per n-gram it holds), and each candidate's
        entries are matched with those of its references by a sorted-key search, so the clipped dot products,
        norms and length penalties of all candidate-reference pairs are a few array operations.
        """
        n_cand = len(candidates)
        owner = np.arange(n_cand) if owner is None else np.asarray(owner, dtype=np.int64)  # (N,)
        texts = list(candidates) + [ref for refs in references for ref in refs]
        column: dict[tuple, int] = {}  # n-gram -> its id in this call
        rows, cols, tf = [], [], []
        for r, text in enumerate(texts):
            for g, c in ngram_counts(text).items():
                rows.append(r)
                cols.append(column.setdefault(g, len(column)))
                tf.append(c)
        row, col = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)  # (entries,)
        grams = list(column)
        order = np.array([len(g) - 1 for g in grams], dtype=np.int64)[col]  # (entries,) n - 1
        idf = self.log_docs - np.log(np.maximum(1.0, np.array([self.df.get(g, 0) for g in grams], dtype=float)))
        vec = np.array(tf, dtype=float) * idf[col]  # (entries,) tf-idf
        n_texts, G = len(texts), max(len(grams), 1)
        norm = np.sqrt(np.bincount(row * NGRAMS + order, weights=vec**2,
                                   minlength=n_texts * NGRAMS)).reshape(n_texts, NGRAMS).astype(float)  # (texts, 4)
        # pycocoevalcap's length is the number of bigrams (words - 1, 0 for an empty caption); kept for equality.
        length = np.array([max(len(t) - 1, 0) for t in texts], dtype=float)  # (texts,)
        set_size = np.array([len(refs) for refs in references], dtype=np.int64)  # (sets,)
        set_start = n_cand + np.cumsum(set_size) - set_size  # (sets,) text row of each set's first reference
        n_refs = set_size[owner]  # (N,)
        pair_cand = np.repeat(np.arange(n_cand), n_refs)  # (pairs,) candidate of each pair
        pair_ref = np.repeat(set_start[owner], n_refs) + _ranges(n_refs)  # (pairs,) reference text row
        pair_of_first = np.cumsum(n_refs) - n_refs  # (N,) each candidate's first pair
        # Each candidate entry, once per reference of its candidate: (pair, n-gram, value).
        is_cand = row < n_cand
        c_row, c_col, c_vec, c_order = row[is_cand], col[is_cand], vec[is_cand], order[is_cand]
        reps = n_refs[c_row]  # (cand entries,)
        e_pair = np.repeat(pair_of_first[c_row], reps) + _ranges(reps)  # (matches,)
        e_col, e_vh, e_order = np.repeat(c_col, reps), np.repeat(c_vec, reps), np.repeat(c_order, reps)
        # The reference's value of that n-gram (0 when it has none), found by key = text row * G + n-gram.
        ref_key, ref_vec = row[~is_cand] * G + col[~is_cand], vec[~is_cand]  # sorted: rows, then first sight
        sort = np.argsort(ref_key, kind="stable")
        ref_key, ref_vec = ref_key[sort], ref_vec[sort]
        query = pair_ref[e_pair] * G + e_col
        at = np.minimum(np.searchsorted(ref_key, query), max(len(ref_key) - 1, 0))
        e_vr = np.where((len(ref_key) > 0) & (ref_key[at] == query), ref_vec[at] if len(ref_vec) else 0.0, 0.0)
        clipped = np.bincount(e_pair * NGRAMS + e_order, weights=np.minimum(e_vh, e_vr) * e_vr,
                              minlength=len(pair_cand) * NGRAMS).reshape(-1, NGRAMS).astype(float)  # (pairs, 4)
        denom = norm[pair_cand] * norm[pair_ref]  # (pairs, 4)
        sim = np.divide(clipped, denom, out=clipped.copy(), where=denom != 0)  # (pairs, 4)
        sim *= np.exp(-((length[pair_cand] - length[pair_ref]) ** 2) / (2 * SIGMA**2))[:, None]
        total = np.bincount(pair_cand, weights=sim.mean(axis=1), minlength=n_cand)  # (N,)
        return 10.0 * total / np.maximum(n_refs, 1)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """[0, 1, .., counts[0] - 1, 0, 1, .., counts[1] - 1, ...] without a Python loop."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)


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
    with autocast or nullcontext():
        logits, _ = model(x, captions, lengths)  # (B*K, T, V) image-major rows
    T = logits.size(1)
    targets = captions.view(B * K, -1)[:, 1 : T + 1]  # (B*K, T)
    real = torch.arange(T, device=x.device) < (lengths.view(-1, 1) - 1)  # (B*K, T) sampled tokens
    logp = F.log_softmax(logits.float(), dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)  # (B*K, T)
    loss = -(advantage.view(-1, 1) * logp * real).sum() / real.sum().clamp(min=1)
    return loss, {"reward": float(reward.mean()), "baseline": float(base.mean())}
