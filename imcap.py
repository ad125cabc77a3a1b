"""Caption photos from Python: load a model once, then call it on photos.

    import imcap
    captioner = imcap.load()                       # the released model, or imcap.load("model_files/<run>/best.pt")
    result = captioner("docs/photos/chelsea.jpg")  # a photo's path or a PIL image; a list of them gives a list
    print(result.greedy)                           # the greedy caption as text
    print(result.beam, result.beam_score)          # the beam-search caption and its score
    result.attention                               # the beam caption's attention, one map per word: (T, rows, cols)

inference.py and app.py caption through this module: a photo gets the same captions from Python, from the command
line and from the web page. Several checkpoints, `imcap.load([a, b])`, caption as one ensemble
(decoding.Ensemble). Problems (a missing checkpoint, an unreadable photo, a bad option) raise cli.UserError, one
line that says what to change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image

from checkpoints import RELEASED_MODEL, Loaded, load_ensemble
from cli import EXIT_BAD_OPTION, UserError, pick_device
from decoding import ENSEMBLE_MEANS, Caption, DecodeConfig, caption_batch
from pytorch_dataset_class import preprocess_image

# A photo: its path, a PIL image, or an open binary file (the web page's uploads).
ImageInput = str | os.PathLike | Image.Image | BinaryIO


@dataclass(frozen=True)
class Result:
    """The captions of one photo."""

    greedy: str  # the greedy caption: the most likely word at each step
    beam: str  # the beam-search caption
    greedy_words: list[str]
    beam_words: list[str]
    beam_score: float  # the beam caption's sum of log-probabilities (<end> included) / length**length_penalty
    beam_size: int
    beam_finished: bool  # False when the beam caption reached max_len without <end>
    # (T, rows, cols), T = len(beam_words): each word's map sums to 1; a hard-attention model's is one-hot at the
    # region it attends (the most likely)
    attention: torch.Tensor = field(repr=False)
    image: Path | None = None  # the photo's path; None for a PIL image or a file object


class Captioner:
    """A loaded model that captions photos; `load` makes one. It holds the nn.Module (`model`: an
    all_models.Captioner, or a decoding.Ensemble of several) with what decoding needs beside it."""

    def __init__(self, loaded: Loaded, checkpoints: list[Path]) -> None:
        self.model = loaded.model  # in eval mode, on `device`
        self.vocab = loaded.vocab  # the checkpoint's words: decoding's special tokens, decode() for captions
        self.image_size = loaded.image_size  # photos are resized to image_size x image_size, as in training
        self.decode = loaded.decode  # beam size, max_len, the settled length penalty and precision, batch size
        self.precision = loaded.precision  # what decode.amp computes in on this device, and why
        self.checkpoints = checkpoints
        self.device = next(self.model.parameters()).device

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """A photo -> uint8 (3, S, S) at the checkpoint's image size: the preprocessing of the training data."""
        return torch.from_numpy(preprocess_image(image, self.image_size))  # (3, S, S)

    def batch(self, images: torch.Tensor, beam_size: int | None = None,
              sources: Sequence[Path | None] | None = None) -> list[Result]:
        """uint8 images (B, 3, S, S) from `preprocess` -> B Results, decoded as one batch (batched decoding gives
        each image the captions it gets alone). `beam_size` replaces the loaded one; `sources` are the Results'
        `image` paths."""
        decode = self.decode if beam_size is None else replace(self.decode, beam_size=beam_size)
        greedy, beam = caption_batch(self.model, images, self.vocab, decode)
        sources = sources if sources is not None else [None] * len(images)
        return [self._result(g, b, decode.beam_size, s) for g, b, s in zip(greedy, beam, sources)]

    def __call__(self, images: ImageInput | Sequence[ImageInput], beam_size: int | None = None
                 ) -> Result | list[Result]:
        """Caption a photo (-> a Result) or a list of photos (-> a list of Results, decoded decode.batch_size at a
        time). A photo is a path, a PIL image or an open binary file; an unreadable one is a UserError naming it."""
        if not isinstance(images, (list, tuple)):
            return self([images], beam_size)[0]
        results: list[Result] = []
        for i in range(0, len(images), self.decode.batch_size):
            chunk = images[i: i + self.decode.batch_size]
            batch = torch.stack([self.preprocess(x) for x in chunk])  # (b, 3, S, S)
            sources = [Path(x) if isinstance(x, (str, os.PathLike)) else None for x in chunk]
            results += self.batch(batch, beam_size, sources)
        return results

    def _result(self, greedy: Caption, beam: Caption, beam_size: int, source: Path | None) -> Result:
        greedy_words = self.vocab.decode(greedy.tokens)
        beam_words = self.vocab.decode(beam.tokens)
        alphas = beam.alphas[: len(beam_words)].float().cpu()  # (T, P)
        side = math.isqrt(alphas.size(1))  # the encoder's grid is square: P = side * side
        return Result(greedy=" ".join(greedy_words), beam=" ".join(beam_words), greedy_words=greedy_words,
                      beam_words=beam_words, beam_score=beam.score, beam_size=beam_size, beam_finished=beam.finished,
                      attention=alphas.view(len(alphas), side, side), image=source)  # (T, rows, cols)


def load(checkpoint: str | os.PathLike | Sequence[str | os.PathLike] | None = None, device: str | torch.device = "auto",
         beam_size: int = 5, length_penalty: float | None = None, max_len: int | None = None,
         batch_size: int | None = None, amp: str = "auto", ensemble_mean: str = "log-prob",
         hard_context: str | None = None) -> Captioner:
    """Load a model to caption photos with.

    :param checkpoint: a checkpoint train.py or release.py wrote; None is the released Flickr8k model; a list of
        several captions with their ensemble (they must share the word map and the image size)
    :param device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    :param beam_size, length_penalty, max_len, batch_size, amp, hard_context: decoding.DecodeConfig's fields; None
        takes its default (length_penalty: the one the checkpoint was released with, else 0)
    :param ensemble_mean: with several checkpoints, average their next-word "log-prob"s or "prob"s
    """
    options = {"beam_size": beam_size, "length_penalty": length_penalty, "max_len": max_len, "batch_size": batch_size,
               "amp": amp, "hard_context": hard_context}
    decode = DecodeConfig(**{k: v for k, v in options.items() if v is not None})  # checks each option's bounds
    if ensemble_mean not in ENSEMBLE_MEANS:
        raise UserError(f"ensemble_mean must be one of {', '.join(ENSEMBLE_MEANS)}, got {ensemble_mean!r}",
                        EXIT_BAD_OPTION)
    if checkpoint is None:
        paths = [RELEASED_MODEL]
    elif isinstance(checkpoint, (str, os.PathLike)):
        paths = [Path(checkpoint)]
    else:
        paths = [Path(p) for p in checkpoint]
    if not paths:
        raise UserError("no checkpoint given: pass a checkpoint's path, or None for the released model",
                        EXIT_BAD_OPTION)
    device = device if isinstance(device, torch.device) else pick_device(device)
    return Captioner(load_ensemble(paths, device, decode, mean=ensemble_mean), paths)
