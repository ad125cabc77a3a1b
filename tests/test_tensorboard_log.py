"""tensorboard_log.py (train.py --tensorboard) on the tiny shapes set: event files that TensorBoard's own reader
loads, holding the training and validation numbers, the val captions and the attention picture; a resumed run
continues their steps; metrics.jsonl and curves.png stay as without it; without the tensorboard package it is one
line."""

from __future__ import annotations

import io
import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import one_line, run_script, sigint_after_step, tiny_train_args, tiny_train_config
from PIL import Image

import train
from attention_maps import attention_picture
from checkpoints import load_checkpoint, model_from_checkpoint
from decoding import greedy_decode
from pytorch_dataset_class import ImageDataset, Vocab, to_model_input
from tensorboard_log import SAMPLE_IMAGES, TENSORBOARD_DIR

STEPS = 15  # steps per epoch of the tiny runs: 48 images x 5 captions, 16 a step
LOG_EVERY = 5


@pytest.fixture
def read_events():
    """A function: run folder -> tensorboard's own EventAccumulator over its event files, everything kept."""
    acc = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                              reason="needs the tensorboard package (pip install -r requirements-tensorboard.txt)")

    def read(run_dir: Path):
        events = acc.EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0,
                                                                                    "tensors": 0})
        return events.Reload()

    return read


def steps(events, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def open_writers() -> int:
    """Event-file writers not closed yet: each has a thread (tensorboard's _AsyncWriterThread) until closed."""
    return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())


def test_event_files_hold_the_runs_numbers_captions_and_attention(tiny_shapes: Path, tmp_path: Path,
                                                                   read_events) -> None:
    options = dict(epochs=2, log_every=LOG_EVERY)
    train.train(tiny_train_config(tiny_shapes, tmp_path, run="plain", **options), progress=False)
    train.train(tiny_train_config(tiny_shapes, tmp_path, run="tb", tensorboard=True, **options), progress=False)
    plain, tb = tmp_path / "plain", tmp_path / "tb"
    assert open_writers() == 0

    # metrics.jsonl and curves.png are what they are without --tensorboard: logging changes no training number
    without, with_tb = metrics(plain), metrics(tb)
    assert [m.keys() for m in with_tb] == [m.keys() for m in without]
    timings = ("seconds", "images_per_s")
    assert [{k: v for k, v in m.items() if k not in timings} for m in with_tb] == \
           [{k: v for k, v in m.items() if k not in timings} for m in without]
    assert (tb / "curves.png").read_bytes() == (plain / "curves.png").read_bytes()
    assert not (plain / TENSORBOARD_DIR).exists()

    events = read_events(tb)
    # every --log-every steps (global step = epoch * 15 + step): the step statistics' means and the rate
    logged = [LOG_EVERY * i for i in range(1, 2 * STEPS // LOG_EVERY + 1)]
    for tag in ("train/loss", "train/ce", "train/dsr", "lr/decoder"):
        assert steps(events, tag) == logged, tag
    assert all(e.value == pytest.approx(4e-4) for e in events.Scalars("lr/decoder"))
    # the windows split the epoch's loss: their mean (equal windows of 80 captions) is the epoch's train_loss
    for epoch, m in enumerate(with_tb):
        window = [e.value for e in events.Scalars("train/loss") if epoch * STEPS < e.step <= (epoch + 1) * STEPS]
        assert np.mean(window) == pytest.approx(m["train_loss"], rel=1e-5)
    # every number of each metrics.jsonl line, at the epoch's last step
    numbers = {k for k, v in with_tb[0].items() if type(v) in (int, float) and k != "epoch"}
    assert {"val_loss", "val_ce", "val_top5", "val_bleu4", "val_cider", "images_per_s"} <= numbers
    assert {t for t in events.Tags()["scalars"] if t.startswith("epoch/")} == {f"epoch/{k}" for k in numbers}
    for k in numbers:
        got = events.Scalars(f"epoch/{k}")
        assert [e.step for e in got] == [STEPS, 2 * STEPS], k
        assert [e.value for e in got] == pytest.approx([m[k] for m in with_tb], rel=1e-6, abs=1e-9), k

    # the first val images' greedy captions, with their references, as a markdown table each epoch
    val = ImageDataset(tiny_shapes / "val.h5")
    texts = events.Tensors("val/captions/text_summary")
    assert [e.step for e in texts] == [STEPS, 2 * STEPS]
    table = texts[-1].tensor_proto.string_val[0].decode().splitlines()
    assert table[0] == "| image | greedy caption | references |" and len(table) == 2 + SAMPLE_IMAGES
    for row, name, refs in zip(table[2:], val.filenames(), val.references()):
        assert row.startswith(f"| {name} | ") and row.endswith(" | " + "; ".join(" ".join(r) for r in refs) + " |")

    # the attention picture: the first val image under its greedy caption, by the epoch's weights (last.pt's)
    images = events.Images("val/attention")
    assert [e.step for e in images] == [STEPS, 2 * STEPS]
    model, word_map = model_from_checkpoint(load_checkpoint(tb / "last.pt"))
    model.eval()
    x, *_ = val[0]
    (caption,) = greedy_decode(model.decoder, model.annotations(to_model_input(x[None], "cpu")), word_map, 12)
    words = Vocab(word_map).decode(caption.tokens)
    assert f"| {' '.join(words)} |" in table[2]
    want = attention_picture(x.numpy(), words, caption.alphas[: len(words)],
                             f"epoch 2, {val.filenames()[0]}: {' '.join(words)}")
    got = Image.open(io.BytesIO(images[-1].encoded_image_string))
    assert got.size == want.size and np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


def test_scst_logs_its_reward(trained: Path, tiny_shapes: Path, tmp_path: Path, read_events) -> None:
    kw = dict(scst=True, init_from=str(trained / "last.pt"), scst_samples=3, max_decode_len=8, log_every=1)
    train.train(tiny_train_config(tiny_shapes, tmp_path, run="s", tensorboard=True, **kw), progress=False)
    events, (m,) = read_events(tmp_path / "s"), metrics(tmp_path / "s")
    every_step = [1, 2, 3]  # 48 images, 16 a step
    assert {t for t in events.Tags()["scalars"] if not t.startswith("epoch/")} == \
           {"train/loss", "train/reward", "train/baseline", "lr/decoder"}
    for tag in ("train/loss", "train/reward", "train/baseline", "lr/decoder"):
        assert steps(events, tag) == every_step, tag
    for key in ("loss", "reward", "baseline"):
        assert np.mean([e.value for e in events.Scalars(f"train/{key}")]) == pytest.approx(m[f"train_{key}"], rel=1e-5)
    assert [e.value for e in events.Scalars("epoch/val_cider")] == pytest.approx([m["val_cider"]], rel=1e-6)


def test_a_resumed_run_continues_the_steps(tiny_shapes: Path, tmp_path: Path, monkeypatch, read_events) -> None:
    """Ctrl-C in epoch 2 (step 5), then --resume: each step is logged once. A resume from an older checkpoint
    (as after a SIGKILL) logs again the steps after it, and TensorBoard shows only the new ones."""
    cfg = dict(epochs=2, log_every=LOG_EVERY, tensorboard=True, run="r")
    run_dir = tmp_path / "r"
    with sigint_after_step(monkeypatch, STEPS + 5), pytest.raises(train.Interrupted, match="epoch 2 after step 5/15"):
        train.train(tiny_train_config(tiny_shapes, tmp_path, **cfg), progress=False)
    # the writer was flushed and closed on the way out: step 20 is on disk
    assert open_writers() == 0
    events = read_events(run_dir)
    assert steps(events, "train/loss") == [5, 10, 15, 20] and steps(events, "epoch/val_bleu4") == [STEPS]

    shutil.copy(run_dir / "last.pt", run_dir / "stopped.pt")
    train.train(tiny_train_config(tiny_shapes, tmp_path, resume=str(run_dir / "last.pt"), **cfg), progress=False)
    events = read_events(run_dir)
    assert steps(events, "train/loss") == [5, 10, 15, 20, 25, 30]
    assert steps(events, "epoch/val_bleu4") == [STEPS, 2 * STEPS]
    assert [e.step for e in events.Images("val/attention")] == [STEPS, 2 * STEPS]
    first = {e.step: e.wall_time for e in events.Scalars("train/loss")}

    # resumed again from step 20: steps 25 and 30 come from this third process only
    train.train(tiny_train_config(tiny_shapes, tmp_path, resume=str(run_dir / "stopped.pt"), **cfg), progress=False)
    events = read_events(run_dir)
    assert len(list((run_dir / TENSORBOARD_DIR).iterdir())) == 3  # one event file per process
    again = events.Scalars("train/loss")
    assert [e.step for e in again] == [5, 10, 15, 20, 25, 30]
    assert [e.wall_time == first[e.step] for e in again] == [True] * 4 + [False] * 2
    assert steps(events, "epoch/val_bleu4") == [STEPS, 2 * STEPS]
    assert [m["epoch"] for m in metrics(run_dir)] == [1, 2]


def test_without_the_tensorboard_package_it_is_one_line(tiny_shapes: Path, tmp_path: Path, monkeypatch) -> None:
    """Before anything is written: the run folder is not even made."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails, as when not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # so torch imports it again
    out = tmp_path / "out"
    r = run_script("train.py", *tiny_train_args(tiny_shapes, out, "--tensorboard"), mode="in_process")
    one_line(r, 2, "--tensorboard needs the tensorboard package: pip install -r requirements-tensorboard.txt")
    assert not out.exists()
