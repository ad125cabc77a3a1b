"""The training objectives: cross-entropy, or self-critical sequence training (Rennie et al. 2017) with CIDEr-D as
the reward, sampled captions and a baseline. `make_objective` builds the run's one objective from its options;
train.py's batch loop calls it the same way whichever it is.

    python train.py --scst --init-from model_files/flickr8k_lite0/last.pt --run flickr8k_scst ...

For each image the model samples `--scst-samples` captions; each is rewarded with its CIDEr-D against the
image's reference captions (document frequencies from the training references), minus a baseline: the mean
reward of the image's other samples (`mean`, the "new self-critical" variant) or the reward of the model's
greedy caption (`greedy`, the paper's). The loss is the policy gradient's surrogate
-(reward - baseline) * log p(token), averaged over the sampled tokens. Sampling and the gradient pass both
run with dropout off (the default) or both under the same dropout masks (`--scst-dropout`), so the gradient is
that of the policy that produced the samples.

Cross-entropy is per token over the reference captions + alpha_c * the doubly stochastic attention term
(all_models.token_loss). A hard-attention model trains with `HardAttention` instead: the word loss with sampled
regions, and REINFORCE for the attention (paper section 4.1). Letters as in all_models.py; K here is the number
of samples per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from all_models import Captioner, DecoderWithAttention, draw, reinforce_loss, token_loss
from decoding import banned_mask, greedy_decode
from metrics import CiderD
from optim import optimize
from pytorch_dataset_class import DEFAULT_MAX_LEN, CaptionDataset, ImageDataset, Vocab
from runtime import all_reduce_sum


def dropout_masks(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Inverted-dropout masks, as nn.Dropout draws them: 0 with probability p, else 1/(1-p)."""
    return torch.empty(shape, device=device).bernoulli_(1 - p) / (1 - p)


@torch.no_grad()
def sample_captions(decoder: DecoderWithAttention, a: torch.Tensor, vocab: Vocab | dict[str, int], samples: int,
                    max_len: int, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`samples` captions per image drawn word by word from the model's distribution, all B*K at once.

    a: (B, P, D_enc) -> captions (B, K, L) `<start> w1 .. wn <end> <pad>...` (no `<end>` when max_len words were
    drawn without it), lengths (B, K) of tokens with `<start>`, as the teacher-forced forward takes them, and
    with dropout > 0 the output layer's dropout masks (B, K, L - 1, output_dim) the words were drawn under
    (None without). `vocab`: a Vocab, or a checkpoint's word map.
    """
    B, K = a.size(0), samples
    vocab = Vocab.of(vocab)
    start, end, pad = vocab.start, vocab.end, vocab.pad
    a, a_proj, h, c = decoder.prepare(a)  # (B, P, D), (B, P, A), (B, H), (B, H)
    h, c = h.unsqueeze(1).expand(-1, K, -1), c.unsqueeze(1).expand(-1, K, -1)  # (B, K, H)
    banned = banned_mask(decoder.cfg.vocab_size, vocab, a.device)  # (V,)
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


BASELINES = ("mean", "greedy")


@dataclass(frozen=True)
class HardConfig:
    """Hard attention's training options (train.py's --hard-expected-p and --hard-entropy-weight)."""

    expected_p: float = 0.5  # the probability that an image's captions take the expected context in a step
    entropy_weight: float = 0.002  # lambda_e, the weight of the attention's entropy bonus


@dataclass(frozen=True)
class ScstConfig:
    """The self-critical loss's options (train.py's --scst-* options, --max-decode-len, --alpha-c and
    --label-smoothing)."""

    samples: int = 5  # captions sampled per image
    baseline: str = "mean"  # mean (of the image's other samples' rewards) or greedy (its greedy caption's)
    max_len: int = DEFAULT_MAX_LEN  # the most words of a sampled (and of the greedy) caption
    dropout: bool = False  # sample and train under the decoder's output dropout, the same masks in both passes
    ce_weight: float = 0.0  # add this times the cross-entropy loss of the reference captions (a mixed objective)
    alpha_c: float = 0.0  # that cross-entropy loss's doubly stochastic term's weight
    label_smoothing: float = 0.0  # and its label smoothing


def scst_loss(model: torch.nn.Module, bare: Captioner, x: torch.Tensor,
              references: Sequence[Sequence[Sequence[str]]], cider: CiderD, vocab: Vocab | dict[str, int],
              cfg: ScstConfig, *, captions: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
              autocast: AbstractContextManager | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The self-critical loss of one batch and its statistics {"reward", "baseline"} (the mean CIDEr-D per
    sample; "ce" with a ce_weight).

    `model` runs the gradient pass (the DDP wrapper under torchrun, else `bare`), `bare` the sampling; both
    in eval mode. With `cfg.dropout`, the samples are drawn under the decoder's output dropout and the gradient
    pass applies the same masks, so it is still the gradient of the policy that drew them. x: images
    (B, 3, S, S) or cached annotations (B, P, D); references[b]: image b's reference token lists.
    cfg.ce_weight > 0 adds that times the cross-entropy training loss (with alpha_c's doubly stochastic term) of
    the reference captions (B, C, L) with lengths (B, C), label_smoothing applied as in cross-entropy training:
    a mixed objective, computed in the same forward pass as the samples' log-probabilities. `vocab`: a Vocab, or a
    checkpoint's word map.
    """
    vocab = Vocab.of(vocab)
    p = bare.decoder.cfg.dropout if cfg.dropout else 0.0
    with torch.no_grad(), autocast or nullcontext():
        a = bare.annotations(x)  # (B, P, D)
        sampled, sampled_len, keep = sample_captions(bare.decoder, a, vocab, cfg.samples, cfg.max_len,
                                                     p)  # (B, K, L), (B, K), (B, K, L - 1, F) or None
    reward, base = rewards(bare.decoder, a, sampled, references, cider, vocab, cfg, autocast)  # (B, K) each
    advantage = (reward - base).to(x.device)  # (B, K)
    B, K = sampled_len.shape
    rows, rows_len = sampled, sampled_len  # what the gradient pass reads
    if cfg.ce_weight > 0:  # the references join the samples as more rows of each image: one forward pass for both
        if captions is None or lengths is None:
            raise ValueError("ce_weight > 0 needs the reference captions and their lengths")
        rows, rows_len, keep = with_references(sampled, sampled_len, keep, captions, lengths, vocab.pad, p)
    N = rows.size(1)  # rows per image: K samples (+ C references)
    # A frozen encoder's annotations are what the sampling used: the gradient pass takes them instead of the images.
    with autocast or nullcontext():
        keep = keep.flatten(0, 1) if keep is not None else None  # (B*N, L - 1, F)
        tf = model(a if bare.encoder.frozen else x, rows, rows_len, keep)  # M real tokens, packed
    # B * N rows, image-major in the input: row r is image r // N's (r % N)-th.
    row = tf.rows  # (M,): the input row of each token
    sample = row % N < K  # (M,): a sampled token, not a reference's
    logp = F.log_softmax(tf.logits[sample].float(), dim=-1)  # (M_s, V)
    logp = logp.gather(1, tf.targets[sample].unsqueeze(1)).squeeze(1)  # (M_s,)
    owner = (row // N * K + row % N)[sample]  # (M_s,): each token's sample, as advantage.view(-1) counts them
    loss = -(advantage.view(-1)[owner] * logp).sum() / max(len(logp), 1)
    stats = {"reward": float(reward.mean()), "baseline": float(base.mean())}
    if cfg.ce_weight > 0:
        references_rows = tf.order % N >= K  # (B * N,) in the pass's row order
        ce_loss, ce, _ = token_loss(tf.logits[~sample], tf.targets[~sample], tf.alphas[references_rows], cfg.alpha_c,
                                    cfg.label_smoothing)
        loss = loss + cfg.ce_weight * ce_loss
        stats["ce"] = ce.item()
    return loss, stats


def rewards(decoder: DecoderWithAttention, a: torch.Tensor, sampled: torch.Tensor,
            references: Sequence[Sequence[Sequence[str]]], cider: CiderD, vocab: Vocab, cfg: ScstConfig,
            autocast: AbstractContextManager | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward, baseline), both (B, K) on the cpu: the CIDEr-D of the samples (B, K, L) of the images whose
    annotations are a (B, P, D), and what each is compared with (cfg.baseline)."""
    B, K, _ = sampled.shape
    words = [vocab.decode(row) for row in sampled.view(B * K, -1).tolist()]
    owner = [b for b in range(B) for _ in range(K)]  # sample -> its image
    reward = torch.from_numpy(cider.scores(words, references, owner)).float().view(B, K)  # (B, K)
    if cfg.baseline == "mean":  # each sample against the mean of the image's other samples
        return reward, (reward.sum(dim=1, keepdim=True) - reward) / max(K - 1, 1)  # (B, K)
    with autocast or nullcontext():  # the greedy caption's reward
        greedy = [vocab.decode(g.tokens) for g in greedy_decode(decoder, a, vocab, cfg.max_len)]
    return reward, torch.from_numpy(cider.scores(greedy, references)).float().view(B, 1).expand(B, K)  # (B, K)


def with_references(sampled: torch.Tensor, sampled_len: torch.Tensor, keep: torch.Tensor | None,
                    captions: torch.Tensor, lengths: torch.Tensor, pad: int,
                    p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each image's samples (B, K, L) and reference captions (B, C, L') as the rows (B, K + C, max(L, L')) of one
    teacher-forced pass, their lengths (B, K + C) and, under dropout, their masks (B, K + C, max(L, L') - 1, F):
    the samples' own (ones past their last step) and fresh ones for the references."""
    B = sampled.size(0)
    L = max(sampled.size(2), captions.size(2))
    rows = torch.cat([F.pad(sampled, (0, L - sampled.size(2)), value=pad),
                      F.pad(captions, (0, L - captions.size(2)), value=pad)], dim=1)  # (B, K + C, L)
    rows_len = torch.cat([sampled_len, lengths], dim=1)  # (B, K + C)
    if keep is not None:
        ref_keep = dropout_masks((B, captions.size(1), L - 1, keep.size(3)), p, keep.device)  # (B, C, L - 1, F)
        keep = torch.cat([F.pad(keep, (0, 0, 0, L - 1 - keep.size(2)), value=1.0), ref_keep], dim=1)
    return rows, rows_len, keep


# ----------------------------------------------------------------------------------------------
# The objectives: (model, batch) -> (loss, the step's statistics)


class Batch(NamedTuple):
    """One training step's items, on the device."""

    x: torch.Tensor  # images (B, 3, S, S) float32, or cached annotations (B, P, D)
    captions: torch.Tensor  # (B, L), or (B, C, L): C captions of each image
    lengths: torch.Tensor  # (B,) or (B, C): tokens with <start> and <end>
    index: list[int] | None  # the images' indices in the training split (image items), else None


class CrossEntropy:
    """Cross-entropy of the reference captions (label-smoothed with label_smoothing > 0) + alpha_c * the doubly
    stochastic term; the model trains in train mode (dropout on)."""

    keys = ("loss", "ce", "dsr")  # the step's statistics, as metrics.jsonl's train_* and TensorBoard's train/*
    train_mode = True

    def __init__(self, alpha_c: float, label_smoothing: float = 0.0,
                 autocast: AbstractContextManager | None = None) -> None:
        self.alpha_c, self.label_smoothing, self.autocast = alpha_c, label_smoothing, autocast

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        with self.autocast or nullcontext():
            tf = model(batch.x, batch.captions, batch.lengths)  # logits (M, V) of the M real tokens
        loss, ce, dsr = tf.loss(self.alpha_c, self.label_smoothing)
        return loss, {"ce": ce.item(), "dsr": dsr.item()}

    def captions(self, batch: Batch) -> int:
        """The captions the step's statistics are means over."""
        return batch.lengths.numel()

    def state_dict(self) -> dict:
        """The objective's run state, which checkpoints keep (HardAttention's baseline; none here)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HardAttention:
    """Cross-entropy training of a hard-attention model (paper section 4.1). The captions of an image sample a
    region per word (with probability 1 - expected_p; else they take the expected context); the word loss trains
    through the chosen annotations, the attention by REINFORCE against a moving baseline of the sampled captions'
    log-likelihood, b <- 0.9 b + 0.1 mean log p(y | s, a), with an entropy bonus (all_models.reinforce_loss).
    Label smoothing applies to the word loss; there is no doubly stochastic term. The baseline is run state:
    state_dict() goes into every checkpoint and load_state_dict() takes it back on --resume."""

    keys = ("loss", "ce", "attn_baseline", "attn_entropy")  # the baseline used; entropy of alpha per word (nats)
    train_mode = True

    def __init__(self, expected_p: float, entropy_weight: float, label_smoothing: float = 0.0,
                 autocast: AbstractContextManager | None = None) -> None:
        self.expected_p, self.entropy_weight = expected_p, entropy_weight
        self.label_smoothing, self.autocast = label_smoothing, autocast
        self.baseline: float | None = None  # None until a batch has sampled: then that batch's mean starts it

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        device = batch.lengths.device
        sample = torch.rand(batch.x.size(0), device=device) >= self.expected_p  # (B,) the images that sample
        with self.autocast or nullcontext():
            tf = model(batch.x, batch.captions, batch.lengths, sample=sample)  # M real tokens, packed
        fit, ce, _ = tf.loss(0.0, self.label_smoothing)
        R = tf.log_likelihood().detach()  # (N,) log p(y | s, a)
        # The batch's mean over the sampled captions, over all ranks: every rank keeps the same baseline.
        total, n = all_reduce_sum([float(R[tf.sampled].sum()), float(tf.sampled.sum())], device)
        b = self.baseline if self.baseline is not None else (total / n if n else 0.0)
        loss = fit + reinforce_loss(tf, R - b, self.entropy_weight)
        if n:
            self.baseline = 0.9 * b + 0.1 * total / n if self.baseline is not None else b
        return loss, {"ce": ce.item(), "attn_baseline": b, "attn_entropy": tf.entropy.sum().item() / len(tf.targets)}

    def captions(self, batch: Batch) -> int:
        return batch.lengths.numel()

    def state_dict(self) -> dict:
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = state.get("baseline")


class SelfCritical:
    """scst_loss on the batch's images against their training references. The model samples from the policy it
    follows: eval mode, with any dropout scst_loss's own masks, the same in both passes."""

    train_mode = False

    def __init__(self, cfg: ScstConfig, model: Captioner, references: list[list[list[str]]],
                 vocab: Vocab, autocast: AbstractContextManager | None = None) -> None:
        self.cfg, self.model, self.references, self.vocab, self.autocast = cfg, model, references, vocab, autocast
        self.cider = CiderD(references)  # the document frequencies of the training references
        self.keys = ("loss", "reward", "baseline") + (("ce",) if cfg.ce_weight > 0 else ())

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """`model` runs the gradient pass (the DDP wrapper under torchrun); the bare model samples."""
        return scst_loss(model, self.model, batch.x, [self.references[i] for i in batch.index], self.cider,
                         self.vocab, self.cfg, captions=batch.captions, lengths=batch.lengths,
                         autocast=self.autocast)

    def captions(self, batch: Batch) -> int:
        return batch.x.size(0) * self.cfg.samples

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


Objective = CrossEntropy | HardAttention | SelfCritical


def make_objective(scst: ScstConfig | None, *, alpha_c: float, label_smoothing: float, model: Captioner,
                   vocab: Vocab, train_split: ImageDataset | CaptionDataset, hard: HardConfig | None = None,
                   autocast: AbstractContextManager | None = None) -> Objective:
    """The run's objective: self-critical with an `scst` config (--scst), else cross-entropy, of a hard-attention
    model with `hard` (its options). `model` is the bare model (not DDP-wrapped); under --scst `train_split` is an
    ImageDataset, whose references are the rewards'. Self-critical training of a hard model samples words with
    its decoding context (decoding.DecodeConfig.hard_context's default) and trains that captioner: it samples
    no regions."""
    if scst is not None:
        return SelfCritical(scst, model, train_split.references(), vocab, autocast)
    if hard is not None:
        return HardAttention(hard.expected_p, hard.entropy_weight, label_smoothing, autocast)
    return CrossEntropy(alpha_c, label_smoothing, autocast)


def train_step(model: torch.nn.Module, x: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
               optimizer: torch.optim.Optimizer, *, alpha_c: float, label_smoothing: float = 0.0,
               grad_clip: float = 0.0, scaler: torch.amp.GradScaler | None = None,
               autocast: AbstractContextManager | None = None) -> dict[str, float]:
    """One cross-entropy training step, as train.py takes it (for benchmarks and tests): the objective, then
    optim.optimize. x: images (B, 3, S, S) or cached annotations (B, P, D); captions (B, L) and lengths (B,), or
    (B, C, L) and (B, C). Returns {"loss", "ce", "dsr"}; raises optim.NonFiniteLoss on a NaN or infinite loss."""
    loss, stats = CrossEntropy(alpha_c, label_smoothing, autocast)(model, Batch(x, captions, lengths, None))
    return {"loss": optimize(loss, optimizer, grad_clip=grad_clip, scaler=scaler), **stats}
