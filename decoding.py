"""Decoding captions: `DecodeConfig` (the decoding options of inference.py, evaluate.py, app.py and bench.py, and
the one place for the limits of decoding, validation's included), batched greedy decoding and batched beam search,
captioning a batch of images, and `Ensemble`: several trained models decoding as one.

Shapes as in all_models.py: B images, P regions, D encoder dim, H hidden, V vocabulary, K beam size.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from all_models import DEFAULT_HARD_CONTEXT, HARD_CONTEXTS, Captioner, DecoderWithAttention, Encoder
from cli import (
    AMP_CHOICES,
    EXIT_BAD_OPTION,
    UserError,
    add_dataclass_options,
    amp_help,
    autocast,
    int_in,
    nonnegative_float,
    pick_amp,
)
from pytorch_dataset_class import DEFAULT_MAX_LEN, Vocab, to_model_input

# How an ensemble combines its members' next-word distributions: "log-prob" averages their log-probabilities (a
# normalised geometric mean of the distributions), "prob" their probabilities (the arithmetic mean).
ENSEMBLE_MEANS = ("log-prob", "prob")


def valid_length_penalty(value: object) -> bool:
    """A length penalty is a finite number >= 0 (bool is no number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")


@dataclass(frozen=True)
class DecodeConfig:
    """How inference.py, evaluate.py, app.py and bench.py decode captions; the field comments are their options'
    help, and LIMITS the one place for the bounds of decoding (train.py's --max-decode-len takes LIMITS["max_len"])."""

    beam_size: int = 5  # beam size (1 gives the greedy caption)
    max_len: int = DEFAULT_MAX_LEN  # most tokens per caption, <end> included
    length_penalty: float | None = None  # beam score = log-prob / length**this (unset: the checkpoint's value, else 0)
    batch_size: int = 50  # images decoded together
    hard_context: str = field(default=DEFAULT_HARD_CONTEXT, metadata={"help": (
        "a hard-attention model's context: expected (the alpha-weighted mean annotation, as the authors' code "
        "decodes) or argmax (the most likely region's annotation); soft-attention models ignore it")})
    amp: str = field(default="auto", metadata={"help": amp_help("decode")})  # precision, cli.AUTO_AMP's policy

    # The largest values accepted. Beam search holds 2K candidates per image and a (B, K, max_len, P) history of
    # attention maps: far larger values would not fit in memory, and fail with a traceback instead of a line. A
    # model that never says <end> decodes max_len tokens.
    LIMITS: ClassVar[dict[str, int]] = {"beam_size": 100, "max_len": 1000, "batch_size": 512}

    def __post_init__(self) -> None:
        for name in self.LIMITS:
            check_limit(name, getattr(self, name))
        if self.amp not in AMP_CHOICES:
            raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp}", EXIT_BAD_OPTION)
        if self.hard_context not in HARD_CONTEXTS:
            raise UserError(f"--hard-context must be one of {', '.join(HARD_CONTEXTS)}, got {self.hard_context}",
                            EXIT_BAD_OPTION)
        if self.length_penalty is not None and not valid_length_penalty(self.length_penalty):
            raise UserError(f"--length-penalty must be a finite number >= 0, got {self.length_penalty}",
                            EXIT_BAD_OPTION)

    @classmethod
    def from_args(cls, args: object) -> DecodeConfig:
        """The fields that parsed options (cli.add_dataclass_options) name; the others keep their defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def for_checkpoint(self, ckpt: dict, source: str | Path | None = None) -> DecodeConfig:
        """This config with its length penalty settled: the one given, else the one the checkpoint was released
        with (release.py stores it as ckpt["decode"]["length_penalty"]), else 0 as in the paper. A stored
        value that is not a finite number >= 0 is a UserError naming `source` (the checkpoint's path)."""
        if self.length_penalty is not None:
            return self
        stored = ckpt.get("decode", {})
        value = stored.get("length_penalty", 0.0) if isinstance(stored, dict) else stored
        if not valid_length_penalty(value):
            where = f"--checkpoint {source}: " if source is not None else "checkpoint: "
            raise UserError(f"{where}its stored decode.length_penalty must be a finite number >= 0, got {value!r}")
        return replace(self, length_penalty=float(value))

    def autocast(self, device: torch.device):  # -> a context manager
        """The precision captions are decoded in on `device` (checkpoints.load_for_decoding settles auto once)."""
        return autocast(device, pick_amp(device, self.amp, "decode")[0])

    @property
    def penalty(self) -> float:
        """The length penalty beam search uses: None (no checkpoint settled it) is the paper's 0."""
        return float(self.length_penalty or 0.0)


@dataclass
class Caption:
    """One decoded caption: word indices (no <start>/<end>), its score, one attention map per word."""

    tokens: list[int]
    score: float  # sum of log-probabilities (incl. <end>), divided by length**length_penalty
    alphas: torch.Tensor  # (len(tokens), P)
    finished: bool  # False when max_len was reached without <end>


def banned_mask(vocab_size: int, vocab: Vocab | dict[str, int], device: torch.device) -> torch.Tensor:
    """Tokens a caption never contains (<pad>, <start>): -inf added to their log-probabilities."""
    word_map = Vocab.of(vocab).word_map
    mask = torch.zeros(vocab_size, device=device)  # (V,)
    for w in Vocab.NEVER_GENERATED:
        if w in word_map:
            mask[word_map[w]] = float("-inf")
    return mask


@torch.no_grad()
def greedy_decode(decoder: DecoderWithAttention, a: torch.Tensor, vocab: Vocab | dict[str, int],
                  max_len: int = DEFAULT_MAX_LEN, context: str = DEFAULT_HARD_CONTEXT) -> list[Caption]:
    """Batched greedy decoding: the most likely word at each step, for all B images at once.

    a: (B, P, D_enc) annotations. At most `max_len` tokens are generated, `<end>` included. `vocab`: a Vocab, or a
    checkpoint's word map. `context`: a hard-attention model's (DecodeConfig.hard_context).
    """
    B = a.size(0)
    vocab = Vocab.of(vocab)
    start, end = vocab.start, vocab.end
    a, a_proj, h, c = decoder.prepare(a)
    h, c = h.unsqueeze(1), c.unsqueeze(1)  # (B, 1, H)
    banned = banned_mask(decoder.cfg.vocab_size, vocab, a.device)  # (V,)
    words = torch.full((B, 1), start, dtype=torch.long, device=a.device)  # (B, 1)
    scores = a.new_zeros(B, dtype=torch.float32)  # (B,)
    done = torch.zeros(B, dtype=torch.bool, device=a.device)  # (B,)
    tokens, alphas = [], []
    for _ in range(max_len):
        logits, h, c, alpha = decoder.step(words, h, c, a, a_proj, context=context)  # (B, 1, V), ..., (B, 1, P)
        logp = F.log_softmax(logits[:, 0].float(), dim=-1) + banned  # (B, V)
        best, words_now = logp.max(dim=-1)  # (B,)
        scores += torch.where(done, torch.zeros_like(best), best)
        tokens.append(torch.where(done, torch.full_like(words_now, end), words_now))
        alphas.append(alpha[:, 0].float())
        done |= words_now == end
        words = words_now.unsqueeze(1)
        if bool(done.all()):  # one sync per step lets a batch stop as soon as every caption ended
            break
    tok = torch.stack(tokens, 1).cpu()  # (B, T)
    alp = torch.stack(alphas, 1).cpu()  # (B, T, P)
    out = []
    for i in range(B):
        row = tok[i].tolist()
        n = row.index(end) if end in row else len(row)
        out.append(Caption(row[:n], float(scores[i]), alp[i, :n], end in row))
    return out


@torch.no_grad()
def beam_search(decoder: DecoderWithAttention, a: torch.Tensor, vocab: Vocab | dict[str, int], beam_size: int = 5,
                max_len: int = DEFAULT_MAX_LEN, length_penalty: float = 0.0,
                context: str = DEFAULT_HARD_CONTEXT) -> list[Caption]:
    """Beam search batched over images and beams: the B*K live hypotheses are one tensor batch.

    a: (B, P, D_enc). Score = sum of log-probabilities, divided by (tokens incl. <end>)**length_penalty.
    `context`: a hard-attention model's (DecodeConfig.hard_context).
    At each step the 2K best extensions of each image are ranked; an `<end>` among the best K
    finishes a hypothesis (kept while the others go on), the best K others continue. With K = 1
    this is exactly greedy decoding. An image leaves the batch when no live hypothesis can beat
    its best finished one; when none ever emits `<end>` within `max_len` tokens, the best
    unfinished hypothesis is returned.
    """
    # Only the lower bounds here: DecodeConfig.LIMITS bound what a user may ask for, a caller may search wider.
    for name, value in (("beam_size", beam_size), ("max_len", max_len)):
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}", EXIT_BAD_OPTION)
    B, K, dev = a.size(0), beam_size, a.device
    vocab = Vocab.of(vocab)
    start, end = vocab.start, vocab.end
    V = decoder.cfg.vocab_size
    a, a_proj, h0, c0 = decoder.prepare(a)
    P = a.size(1)
    # The K beams of an image all start from <start> and the same state: the first step runs once per
    # image, K = 1, and its output is shared by the K beams (expand: views, no copies).
    h, c = h0.unsqueeze(1), c0.unsqueeze(1)  # (B, 1, H)
    banned = banned_mask(V, vocab, dev)  # (V,)
    words = torch.full((B, 1), start, dtype=torch.long, device=dev)  # (B, 1)
    scores = torch.full((B, K), float("-inf"), device=dev)  # (B, K): only beam 0 is live at first
    scores[:, 0] = 0.0
    hist = torch.zeros(B, K, 0, dtype=torch.long, device=dev)  # (B, K, t) words so far
    hist_alpha = torch.zeros(B, K, 0, P, device=dev)  # (B, K, t, P) their attention maps
    # Best finished hypothesis of each image so far.
    best_score = torch.full((B,), float("-inf"), device=dev)  # (B,) normalised score
    best_tok = torch.zeros(B, max_len, dtype=torch.long, device=dev)  # (B, max_len)
    best_alpha = torch.zeros(B, max_len, P, device=dev)  # (B, max_len, P)
    best_len = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) words, <end> excluded
    active = torch.arange(B, device=dev)  # images still searching = rows of the state tensors
    positions = torch.arange(2 * K, device=dev)  # (2K,) rank of each candidate
    for t in range(1, max_len + 1):
        # (b, K, V), (b, K, H) x2, (b, K, P)
        logits, h, c, alpha = decoder.step(words, h, c, a, a_proj, context=context)
        if t == 1:
            logits, h, c, alpha = (x.expand(-1, K, *x.shape[2:]) for x in (logits, h, c, alpha))  # (b, 1, .) -> K
        b = logits.size(0)
        rows = torch.arange(b, device=dev).unsqueeze(1)  # (b, 1)
        logp = F.log_softmax(logits.float(), dim=-1) + banned  # (b, K, V)
        cand = (scores.unsqueeze(-1) + logp).view(b, K * V)  # (b, K*V)
        top, idx = cand.topk(2 * K, dim=1)  # (b, 2K), best first
        beam, word = idx // V, idx % V  # integer division: `/` gives floats on current PyTorch
        is_end = (word == end) & torch.isfinite(top)  # (b, 2K)
        # Finish: an <end> ranked among the K best extensions, if it beats the image's best so far.
        norm = t**-length_penalty if length_penalty else 1.0
        fin = torch.where(is_end & (positions < K), top * norm, torch.full_like(top, float("-inf")))  # (b, 2K)
        fbest, fpos = fin.max(dim=1)  # (b,)
        upd = (fbest > best_score[active]).nonzero().flatten()  # rows with a new best finished caption
        src_k = beam[upd, fpos[upd]]  # (u,)
        img = active[upd]  # (u,)
        best_score[img] = fbest[upd]
        best_tok[img, : t - 1] = hist[upd, src_k]
        best_alpha[img, : t - 1] = hist_alpha[upd, src_k]
        best_len[img] = t - 1
        # Continue with the K best extensions that are not <end> (at most K of the 2K are <end>).
        rank = torch.where(is_end, positions + 2 * K, positions)  # (b, 2K): <end> sorts last
        keep = rank.argsort(dim=1)[:, :K]  # (b, K)
        scores = top.gather(1, keep)  # (b, K)
        src = beam.gather(1, keep)  # (b, K) the hypothesis each one extends
        words = word.gather(1, keep)  # (b, K)
        h, c = h[rows, src], c[rows, src]  # (b, K, H)
        hist = torch.cat([hist[rows, src], words.unsqueeze(-1)], dim=2)  # (b, K, t)
        hist_alpha = torch.cat([hist_alpha[rows, src], alpha[rows, src].float().unsqueeze(2)], dim=2)
        if t == max_len:
            break
        # Scores only fall as words are added; a length penalty can lift them at most to
        # score / max_len**lp. Below the best finished score, an image's search is over.
        bound = scores[:, 0] * (max_len**-length_penalty if length_penalty else 1.0)  # (b,)
        running = bound > best_score[active]  # (b,)
        if not bool(running.any()):  # host syncs: here and the two nonzero() calls, not per beam or image
            break
        if not bool(running.all()):  # drop images whose search is over from the batch
            r = running.nonzero().flatten()
            active, scores, words, h, c = active[r], scores[r], words[r], h[r], c[r]
            hist, hist_alpha, a, a_proj = hist[r], hist_alpha[r], a[r], a_proj[r]
    # Images with no finished hypothesis return their best unfinished one (max_len words).
    unfinished = torch.isinf(best_score[active]) & (best_score[active] < 0)  # (b,)
    r = unfinished.nonzero().flatten()
    img = active[r]
    lp_norm = hist.size(2) ** -length_penalty if length_penalty else 1.0
    best_score[img] = scores[r, 0] * lp_norm
    best_tok[img, : hist.size(2)] = hist[r, 0]
    best_alpha[img, : hist.size(2)] = hist_alpha[r, 0]
    best_len[img] = hist.size(2)
    finished = torch.ones(B, dtype=torch.bool)
    finished[img.cpu()] = False
    tok, alp, lens, sc = best_tok.cpu(), best_alpha.cpu(), best_len.tolist(), best_score.tolist()
    return [Caption(tok[i, : lens[i]].tolist(), sc[i], alp[i, : lens[i]], bool(finished[i])) for i in range(B)]


def check_limit(name: str, value: int) -> None:
    """A decoding option (a DecodeConfig field's name) out of [1, DecodeConfig.LIMITS[name]] is one line (exit 2)."""
    high = DecodeConfig.LIMITS[name]
    if not 1 <= value <= high:
        raise UserError(f"--{name.replace('_', '-')} must be {'>= 1' if value < 1 else f'<= {high}'}, got {value}",
                        EXIT_BAD_OPTION)


def add_decode_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """DecodeConfig's options (--beam-size, --max-len, --length-penalty, --batch-size, --hard-context, --amp) for
    inference.py, evaluate.py and app.py. Typed with range-checking types, so a value out of range
    (DecodeConfig.LIMITS) is one argparse line (exit 2) before the checkpoint loads."""
    types_: dict[str, Callable] = {name: int_in(1, high) for name, high in DecodeConfig.LIMITS.items()}
    add_dataclass_options(parser, DecodeConfig, skip=skip, types_={**types_, "length_penalty": nonnegative_float},
                          choices={"amp": AMP_CHOICES, "hard_context": HARD_CONTEXTS})


# ----------------------------------------------------------------------------------------------
# Ensembles


class EnsembleDecoder(nn.Module):
    """M trained decoders as one decoder that greedy_decode and beam_search take unchanged: each step runs every
    member on its own state and returns the mean of their next-word log-probabilities (or, with mean "prob", the
    log of the mean of their probabilities) as the step's scores, and the mean of their attention maps.

    The members' states travel concatenated along the last dim, a (B, P, sum D_m), a_proj (B, P, sum A_m),
    h and c (B, K, sum H_m), so that beam search's gathers and its dropping of finished images act on all
    members at once. `a_slices[m]` is member m's part of the annotations Ensemble.annotations returns.
    """

    def __init__(self, decoders: list[DecoderWithAttention], a_slices: list[tuple[int, int]],
                 mean: str = "log-prob") -> None:
        super().__init__()
        if mean not in ENSEMBLE_MEANS:
            raise UserError(f"--ensemble-mean must be one of {', '.join(ENSEMBLE_MEANS)}, got {mean}",
                            EXIT_BAD_OPTION)
        self.members = nn.ModuleList(decoders)
        self.a_slices, self.mean = a_slices, mean
        self.cfg = decoders[0].cfg  # decoding reads its vocab_size, which every member shares
        self.dims_a = [d.encoder_dim for d in decoders]  # D_m (+ 2 with position "coords": prepare adds them)
        self.dims_att = [d.cfg.attention_dim for d in decoders]  # A_m
        self.dims_h = [d.cfg.decoder_dim for d in decoders]  # H_m

    def prepare(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """a: (B, P, sum D_u) from Ensemble.annotations -> a (B, P, sum D_m), a_proj (B, P, sum A_m),
        h0 (B, sum H_m), c0 (B, sum H_m): each member's DecoderWithAttention.prepare, concatenated."""
        parts = [m.prepare(a[..., lo:hi]) for m, (lo, hi) in zip(self.members, self.a_slices)]
        return tuple(torch.cat(x, dim=-1) for x in zip(*parts))  # type: ignore[return-value]

    def step(self, words: torch.Tensor, h: torch.Tensor, c: torch.Tensor, a: torch.Tensor, a_proj: torch.Tensor,
             keep: torch.Tensor | None = None, context: str = DEFAULT_HARD_CONTEXT) -> tuple[torch.Tensor, torch.Tensor,
                                                                                            torch.Tensor, torch.Tensor]:
        """DecoderWithAttention.step for the ensemble: words (B, K) -> scores (B, K, V) (log-probabilities,
        float32), h, c (B, K, sum H_m), alpha (B, K, P), the members' mean map; `context` is each hard member's.
        Dropout masks (`keep`) are for training a single decoder and are not taken."""
        if keep is not None:
            raise ValueError("an ensemble decodes only: no dropout mask")
        # Views along the last dim: the products read them with a leading-dimension stride, without copies.
        states = zip(self.members, h.split(self.dims_h, -1), c.split(self.dims_h, -1), a.split(self.dims_a, -1),
                     a_proj.split(self.dims_att, -1))
        logps, hs, cs, alphas = [], [], [], []
        for member, h_m, c_m, a_m, ap_m in states:
            logits, h_m, c_m, alpha = member.step(words, h_m, c_m, a_m, ap_m, context=context)  # (B, K, V), ...
            logps.append(F.log_softmax(logits.float(), dim=-1))
            hs.append(h_m)
            cs.append(c_m)
            alphas.append(alpha.float())
        logp = torch.stack(logps)  # (M, B, K, V)
        if self.mean == "log-prob":  # decoding's log_softmax renormalises the geometric mean
            scores = logp.mean(dim=0)  # (B, K, V)
        else:
            scores = logp.logsumexp(dim=0) - math.log(len(logps))  # (B, K, V), already normalised
        return scores, torch.cat(hs, -1), torch.cat(cs, -1), torch.stack(alphas).mean(dim=0)


def same_encoder(x: Encoder, y: Encoder) -> bool:
    """Whether two encoders compute the same annotations: the same network, grid and weights (as every frozen
    ImageNet encoder of one kind has), so an ensemble runs it once for both."""
    sx, sy = x.state_dict(), y.state_dict()
    return (x.dim == y.dim and x.pool.output_size == y.pool.output_size
            and (x.rescale is None) == (y.rescale is None) and sx.keys() == sy.keys()
            and all(sx[k].shape == sy[k].shape and torch.equal(sx[k], sy[k]) for k in sx))


class Ensemble(nn.Module):
    """Several trained captioners captioning as one (`--checkpoint A B ...` in inference.py and evaluate.py).

    They must share the vocabulary and the number of regions P. Members whose encoders compute the same
    annotations share one run of it: `annotations` returns each distinct encoder's output once, concatenated
    along the last dim, (B, P, sum D_u), and the decoder (an EnsembleDecoder) hands each member its slice.
    """

    def __init__(self, members: list[Captioner], mean: str = "log-prob") -> None:
        super().__init__()
        grids = {m.config.encoded_size for m in members}
        if len(grids) > 1:
            raise UserError("--checkpoint: an ensemble's models must attend over the same grid, got "
                            f"{' and '.join(f'{g} x {g}' for g in sorted(grids))} (their attention maps are "
                            "averaged region by region)")
        encoders: list[Encoder] = []
        slices, ends = [], [0]
        for m in members:
            u = next((i for i, e in enumerate(encoders) if same_encoder(e, m.encoder)), None)
            if u is None:
                encoders.append(m.encoder)
                ends.append(ends[-1] + m.encoder.dim)
                u = len(encoders) - 1
            slices.append((ends[u], ends[u + 1]))
        self.encoders = nn.ModuleList(encoders)
        self.decoder = EnsembleDecoder([m.decoder for m in members], slices, mean)

    def annotations(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, P, sum D_u), each distinct encoder once; (B, P, sum D_u) pass as is."""
        if x.dim() != 4:
            return x
        return torch.cat([e(x) for e in self.encoders], dim=-1)  # (B, P, sum D_u)


def add_ensemble_option(parser: argparse.ArgumentParser) -> None:
    """--ensemble-mean, for inference.py and evaluate.py, whose --checkpoint takes several files."""
    parser.add_argument("--ensemble-mean", choices=ENSEMBLE_MEANS, default="log-prob",
                        help="with several --checkpoint files: average their next-word log-probabilities or "
                             "probabilities")


@torch.no_grad()
def caption_batch(model: Captioner | Ensemble, images: torch.Tensor, vocab: Vocab | dict[str, int],
                  decode: DecodeConfig) -> tuple[list[Caption], list[Caption]]:
    """uint8 images (B, 3, S, S) -> (greedy captions, beam captions), on the model's device.

    `decode.batch_size` is not used: the batch is `images`. `decode.for_checkpoint(ckpt)` settles the length
    penalty a released model was scored with; left unset, it is 0. The encoder and the decoder's matrix products run
    in `decode.amp`'s precision (checkpoints.load_for_decoding settles auto for the device once); the scores that
    rank words and beams are float32."""
    device = next(model.parameters()).device
    with decode.autocast(device):
        a = model.annotations(to_model_input(images, device))  # (B, P, D)
        greedy = greedy_decode(model.decoder, a, vocab, decode.max_len, decode.hard_context)
        beam = beam_search(model.decoder, a, vocab, decode.beam_size, decode.max_len, decode.penalty,
                           decode.hard_context)
    return greedy, beam
