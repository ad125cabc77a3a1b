"""TensorBoard logging of a training run (train.py --tensorboard): event files in `<run>/tensorboard/`, for
`tensorboard --logdir model_files/<run>/tensorboard`. metrics.jsonl and curves.png are written as without it.

Every event is at the global step, epoch * steps_per_epoch + step (steps counted from 1), so that the training
and the validation curves share one x-axis and a resumed run continues where its events stopped:
- `train/<statistic>` every --log-every steps: the mean, over the steps since the last log, of each statistic
  the step reports (loss, ce, dsr; under --scst loss, reward, baseline, and ce with --scst-ce-weight);
- `lr/<group>` at the same steps: the learning rate of each parameter group (decoder, encoder);
- `epoch/<key>` at an epoch's last step: every number of the epoch's metrics.jsonl line (val_bleu4, ...);
- `val/captions` (text) and `val/attention` (image) at the same step: the greedy captions of the first
  SAMPLE_IMAGES val images with their references, and the first one's attention, word by word.

The tensorboard package is optional (requirements-tensorboard.txt): nothing here imports it until a run asks
for it, and `require_tensorboard` turns its absence into one line before the run writes anything.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from all_models import Captioner
from attention_maps import attention_picture
from cli import EXIT_BAD_OPTION, UserError
from decoding import Caption, greedy_decode
from pytorch_dataset_class import ImageDataset, Vocab, to_model_input

TENSORBOARD_DIR = "tensorboard"  # the event files' folder inside the run folder
SAMPLE_IMAGES = 5  # val images whose greedy captions are logged each epoch (the first of them: its attention)
INSTALL = "pip install -r requirements-tensorboard.txt"


def require_tensorboard() -> None:
    """A UserError (exit 2, as for an option this machine cannot honour, like --device cuda without CUDA) when
    the tensorboard package cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (raises ImportError without tensorboard)
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package: {INSTALL} (or train without it: "
                        "--no-tensorboard)", EXIT_BAD_OPTION) from None


@dataclass
class ValSamples:
    """The fixed val images whose captions are logged every epoch."""

    x: torch.Tensor  # what the model reads, as stored: uint8 images (N, 3, S, S) or float16 annotations (N, P, D)
    pictures: np.ndarray  # uint8 (N, 3, S, S): the images themselves, to draw the attention on
    filenames: list[str]
    references: list[list[list[str]]]  # each image's raw reference token lists


def val_samples(val: Dataset, val_h5: Path, references: list[list[list[str]]],
                n: int = SAMPLE_IMAGES) -> ValSamples:
    """The first n items of the validation set `val` (ImageDataset items, with cached annotations when training
    reads those), their pictures and file names from the split file `val_h5`."""
    n = min(n, len(val))
    if n == 0:  # nothing to caption: end_epoch logs the numbers alone
        return ValSamples(torch.empty(0), np.empty(0, np.uint8), [], [])
    plain = ImageDataset(val_h5)  # the images, also when `val` holds cached annotations
    return ValSamples(x=torch.stack([val[i][0] for i in range(n)]),
                      pictures=np.stack([plain[i][0].numpy() for i in range(n)]),
                      filenames=plain.filenames()[:n], references=references[:n])


class TensorBoardLog:
    """The event files of one training run, written by rank 0 only. run_start.start_run makes it
    (run_folder.open_tensorboard), Run.log_step logs every --log-every steps, Run.end_epoch once per epoch; train.py
    closes it when training ends, however it ends (a `with` block). Logging a step reads Python numbers the step
    has already computed: no host sync."""

    def __init__(self, log_dir: Path, steps_per_epoch: int, epoch: int, step: int, samples: ValSamples,
                 vocab: Vocab, max_decode_len: int, autocast: AbstractContextManager) -> None:
        """Start logging at `step` of `epoch` (both counted as RunState counts them: 0, 0 for a new run)."""
        from torch.utils.tensorboard import SummaryWriter  # optional: require_tensorboard checked that it is there

        self.steps_per_epoch, self.samples, self.vocab = steps_per_epoch, samples, vocab
        self.max_decode_len, self.autocast = max_decode_len, autocast
        self._mark: dict[str, float] = {}
        # purge_step: TensorBoard hides the events at or after the first step this process logs that an earlier
        # process wrote into this folder (a run killed after its last checkpoint, a resume from an older one, an
        # --overwrite'd run), so a resumed run's steps continue the old ones without overlapping them.
        self.writer = SummaryWriter(str(log_dir), purge_step=self.global_step(epoch, step + 1))

    def global_step(self, epoch: int, step: int) -> int:
        """Step `step` (from 1) of epoch `epoch` (from 0) -> the run's step count."""
        return epoch * self.steps_per_epoch + step

    def start_window(self, stats: dict[str, float]) -> None:
        """The running sums of the epoch (run.EpochSums.totals) where the next logged means start."""
        self._mark = dict(stats)

    def train_step(self, epoch: int, step: int, stats: dict[str, float], optimizer: torch.optim.Optimizer) -> None:
        """The means of the step statistics since the last log, from the epoch's running sums (run.EpochSums.totals:
        each a statistic times the step's captions, and "n" the captions), and the learning rates."""
        at = self.global_step(epoch, step)
        n = max(stats["n"] - self._mark.get("n", 0), 1)
        for key, total in stats.items():
            if key not in ("n", "seconds"):
                self.writer.add_scalar(f"train/{key}", (total - self._mark.get(key, 0.0)) / n, at)
        for i, group in enumerate(optimizer.param_groups):
            self.writer.add_scalar(f"lr/{group.get('name', i)}", group["lr"], at)
        self._mark = dict(stats)

    def end_epoch(self, metrics: dict, model: Captioner) -> None:
        """The epoch's metrics.jsonl line (its numbers), the sample images' greedy captions and the first one's
        attention, at the epoch's last step; then everything is flushed to disk."""
        epoch = metrics["epoch"]
        at = self.global_step(epoch, 0)
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, at)
        s = self.samples
        captions = self._decode(model)
        words = [self.vocab.decode(c.tokens) for c in captions]
        self.writer.add_text("val/captions", captions_table(s.filenames, words, s.references), at)
        if captions:
            title = f"epoch {epoch}, {s.filenames[0]}: {' '.join(words[0])}"
            picture = attention_picture(s.pictures[0], words[0], captions[0].alphas[: len(words[0])], title)
            self.writer.add_image("val/attention", np.asarray(picture), at, dataformats="HWC")  # (H, W, 3) uint8
        self.writer.flush()  # an epoch's results reach the disk (and a watching TensorBoard) now

    @torch.no_grad()
    def _decode(self, model: Captioner) -> list[Caption]:
        """Greedy captions of the sample images, as validate() decodes them (eval mode; no RNG is drawn)."""
        if len(self.samples.x) == 0:
            return []
        was_training = model.training
        model.eval()
        try:
            with self.autocast:
                a = model.annotations(to_model_input(self.samples.x, next(model.parameters()).device))  # (N, P, D)
                return greedy_decode(model.decoder, a, self.vocab, self.max_decode_len)
        finally:
            model.train(was_training)

    def close(self) -> None:
        self.writer.close()  # flushes what is queued

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def captions_table(filenames: list[str], captions: list[list[str]], references: list[list[list[str]]]) -> str:
    """A markdown table (TensorBoard's text tab renders it): image, greedy caption, its references."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|") or "(empty)"

    rows = ["| image | greedy caption | references |", "| --- | --- | --- |"]
    rows += [f"| {cell(name)} | {cell(' '.join(words))} | {cell('; '.join(' '.join(r) for r in refs))} |"
             for name, words, refs in zip(filenames, captions, references)]
    return "\n".join(rows)
