"""Helpers shared by the tests: running a script, tiny training options, small inputs (data, images, checkpoints).

Plain functions and constants, imported as `from helpers import ...` (pytest puts tests/ on sys.path);
the fixtures built from them are in conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILES = ("word_map.json", "train.h5", "val.h5", "test.h5")  # what make_dataset.py writes
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")  # utils.atomic_path's temporary files
PHOTOS = sorted((ROOT / "docs" / "photos").glob("*.jpg"))  # scikit-image's public-domain / CC0 sample photos


_ENVIRON = dict(os.environ)  # as pytest started: a test's monkeypatched variables never reach the fork server


def script_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment scripts run in: one OpenMP thread (two shared cores), unbuffered output."""
    return {**_ENVIRON, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


# ----------------------------------------------------------------------------------------------
# Running a script


@dataclass
class Result:
    """One finished run of a script: its command line, exit status, stdout and stderr."""

    argv: list[str]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)}\nexit {self.rc}\n--- stdout\n{self.out[-2000:]}\n"
                f"--- stderr\n{self.err[-3000:]}")


class ForkServer:
    """Runs `script ARGS` in a child forked from tests/fork_server.py, which has imported torch & co once."""

    def __init__(self) -> None:
        self.workdir, self.n = Path(tempfile.mkdtemp(prefix="imcap-fork-server-")), 0
        self.server_err = self.workdir / "server.err"
        with open(self.server_err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_server.py"))], cwd=ROOT,
                                         env=script_env(), text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        assert self.proc.stdout.readline() == "ready\n", self.server_err.read_text()
        printed = self.server_err.read_text()
        assert printed == "", "importing torch & co prints something: " + printed

    def run(self, script: str, argv: list[str], timeout: float, fsize: int | None = None,
            closed_stdout: bool = False) -> Result:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        self.proc.stdin.write(json.dumps({"script": script, "argv": argv, "stdout": None if closed_stdout else str(out),
                                          "stderr": str(err), "timeout": timeout, "fsize": fsize}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        result = Result([script, *argv], reply["rc"], "" if closed_stdout else out.read_text(), err.read_text())
        assert result.rc is not None, f"timed out after {timeout} s\n{result}"
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # an idle server: skip its 1.5 s of interpreter teardown
        self.proc.wait(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)


_fork_server: ForkServer | None = None


def stop_fork_server() -> None:
    """Stop the fork server if one was started (conftest does this when the session ends)."""
    global _fork_server
    if _fork_server is not None:
        _fork_server.close()
        _fork_server = None


def _run_in_process(script: str, argv: list[str]) -> Result:
    """The script's main() through utils.run_cli, in this process, with sys.argv and stdout/stderr its own."""
    from cli import run_cli

    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    saved, sys.argv = sys.argv, [script, *argv]
    rc = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(module.main)
    except SystemExit as e:  # the interpreter's rules for the exit status
        if isinstance(e.code, int):
            rc = e.code
        elif e.code is not None:
            print(e.code, file=err)
            rc = 1
    finally:
        sys.argv = saved
    return Result([script, *argv], rc, out.getvalue(), err.getvalue())


def run_script(script: str, *args: str | Path, mode: Literal["fork", "fresh", "in_process"] = "fork",
               timeout: float = 120, env: dict[str, str] | None = None, cwd: Path | None = None,
               launcher: tuple[str, ...] = (), fsize: int | None = None, closed_stdout: bool = False) -> Result:
    """`python script ARGS`, as a user runs it in the repository root; returns its exit status and output.

    mode "fork" (the default) runs it in a child of the fork server (tests/fork_server.py: its own process,
    stdout, stderr and exit status, without paying the torch import again); "fresh" in a new interpreter,
    the only mode that takes `env` (added to the usual environment), `cwd` or a `launcher` before the script
    (such as `-m torch.distributed.run ...`); "in_process" calls the script's main() through utils.run_cli in
    this process, in its current folder (fastest; the test's monkeypatches apply). Only "fork" takes `fsize` (a
    limit in bytes on each file the script writes: a small disk that fills) and `closed_stdout` (stdout a pipe
    whose reader has gone: `script | head -1`).
    """
    argv = [str(a) for a in args]
    if mode != "fresh":
        assert env is None and cwd is None and not launcher, "env, cwd and launcher need mode='fresh'"
    if mode != "fork":
        assert fsize is None and not closed_stdout, "fsize and closed_stdout need mode='fork'"
    if mode == "in_process":
        return _run_in_process(script, argv)
    if mode == "fork":
        global _fork_server
        if _fork_server is None:
            _fork_server = ForkServer()
        return _fork_server.run(script, argv, timeout, fsize, closed_stdout)
    cmd = [sys.executable, *launcher, script, *argv]
    proc = subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env=script_env(env))
    return Result(cmd[1:], proc.returncode, proc.stdout, proc.stderr)


def start_script(script: str, *args: str | Path, log: Path | None = None,
                 stderr_to_stdout: bool = False) -> subprocess.Popen:
    """A fresh `python script ARGS` in the background, in its own process group (so that a signal to the group
    reaches its workers too); its output goes to log.out and log.err, or without `log` to text pipes (a full
    pipe blocks the script: read it)."""
    cmd = [sys.executable, script, *map(str, args)]
    if log is None:
        return subprocess.Popen(cmd, cwd=ROOT, env=script_env(), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if stderr_to_stdout else subprocess.PIPE,
                                start_new_session=True)
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=out, stderr=err, start_new_session=True)


def one_line(r: Result, code: int, *needles: str | Path) -> str:
    """The run ended with exactly one stderr line holding every needle, exit `code`, no traceback."""
    lines = r.err.strip().splitlines()
    assert r.rc == code and len(lines) == 1 and "Traceback" not in r.err, str(r)
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in the error line\n{r}"
    return lines[0]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120, poll: float = 0.001) -> bool:
    """SIGKILL the process (and its group) as soon as ready() is true; False if it ended first."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return True
            if proc.poll() is not None:
                return False
            time.sleep(poll)
        raise AssertionError(f"nothing to kill on within {timeout} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def temps(folder: Path, pid: int | None = None, names: tuple[str, ...] | None = None) -> list[Path]:
    """atomic_path's temporary files in `folder` (of process `pid`, for final names `names`)."""
    found = []
    for p in folder.iterdir():
        m = TEMP_NAME.match(p.name)
        if m and (pid is None or int(m["pid"]) == pid) and (names is None or m["name"] in names):
            found.append(p)
    return found


def size(path: Path) -> int:
    """Bytes in `path`; 0 when it is gone (a temporary file renamed meanwhile)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Tiny training: the one set of options, as a command line and as a TrainConfig

TINY_MODEL = dict(encoder="smallcnn", encoder_weights="none", encoded_size=4, embed_dim=16, attention_dim=16,
                  decoder_dim=32)
TINY_RUN = dict(batch_size=16, workers=0, max_decode_len=12, val_max_images=8)


def tiny_train_args(data: Path, out: Path, *extra: str | Path) -> list[str]:
    """train.py's command line for the tiny smallcnn model on `data`, runs under `out`, then `extra`; an option in
    `extra` replaces the tiny one (train.py refuses an option given twice)."""
    extra_ = [str(e) for e in extra]
    args = ["--data", str(data), "--out-dir", str(out)]
    for k, v in {**TINY_RUN, **TINY_MODEL}.items():
        if (flag := "--" + k.replace("_", "-")) not in extra_:
            args += [flag, str(v)]
    return args + extra_


def tiny_train_config(data: Path, out: Path, **kw):
    """The same as a train.TrainConfig (1 epoch, seed 3 unless `kw` says otherwise)."""
    import train

    base = dict(data=str(data), out_dir=str(out), **TINY_MODEL, **TINY_RUN, epochs=1, seed=3)
    return train.TrainConfig(**{**base, **kw})


@contextlib.contextmanager
def sigint_after_step(monkeypatch, n: int):
    """A real SIGINT (Ctrl-C) right after the n-th optimizer step of the training run inside (run.optimize, which
    Run.optimize calls); the real step again afterwards. Yields the list that counts the steps taken."""
    import run

    real_step, calls = run.optimize, []

    def step_then_sigint(*args, **kw):
        out = real_step(*args, **kw)
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(run, "optimize", step_then_sigint)
    try:
        yield calls
    finally:
        monkeypatch.setattr(run, "optimize", real_step)


# ----------------------------------------------------------------------------------------------
# Data


def write_karpathy(root: Path, entries: list[dict], make_images: bool = True) -> tuple[Path, Path]:
    """Write a small Karpathy JSON and (unless told not to) a 24 x 16 JPEG per entry.

    Each entry: {"split", "captions": [token lists], optional "filename"}. Returns (json, image dir).
    """
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i, e in enumerate(entries):
        filename = e.get("filename", f"img_{i:03d}.jpg")
        if make_images:
            Image.new("RGB", (24, 16), (10 * (i % 25), 100, 200)).save(image_dir / filename)
        images.append({"filename": filename, "imgid": i, "split": e["split"],
                       "sentences": [{"tokens": t, "raw": " ".join(t)} for t in e["captions"]]})
    json_path = root / "dataset_test.json"
    json_path.write_text(json.dumps({"dataset": "test", "images": images}))
    return json_path, image_dir


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_word_map(data: Path, extra_word: str = "zebra", update_h5: bool = True) -> None:
    """Add a word to data/word_map.json; with update_h5 the split files say they were built with it."""
    wm = json.loads((data / "word_map.json").read_text())
    text = json.dumps({**wm, extra_word: len(wm)}, indent=1)
    (data / "word_map.json").write_text(text)
    if update_h5:
        for split in ("train", "val", "test"):
            with h5py.File(data / f"{split}.h5", "r+") as f:
                f.attrs["word_map_sha1"] = hashlib.sha1(text.encode()).hexdigest()
                f.attrs["vocab_size"] = len(wm) + 1


# ----------------------------------------------------------------------------------------------
# Images
#
# Images up to 200 megapixels are captioned, silently (no Pillow DecompressionBombWarning line): a PNG of
# 12000 x 12000 decodes at full size (~576 MB, ~3 s), a JPEG in draft mode. Larger images are skipped as
# unreadable with one line naming them (pytorch_dataset_class.py).


def solid_png(path: Path, w: int, h: int, rgb: tuple[int, int, int], rows: int | None = None) -> Path:
    """A solid-colour RGB PNG written row by row (a 12000 x 12000 one is 2 MB and never held in memory).

    rows < h writes only that many rows of pixel data: Pillow reads the header (and its size checks)
    without decoding, so a huge image can be made for nothing.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(1)
    parts = [comp.compress(b"\x00" + bytes(rgb) * w)]  # filter None
    same = b"\x02" + bytes(3 * w)  # filter Up: the row above again
    parts += [comp.compress(same) for _ in range((h if rows is None else rows) - 1)]
    parts.append(comp.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def make_odd_images(folder: Path, big: bool = True) -> list[Path]:
    """Images that must be captioned normally: 1x1, (12000 x 12000), 16-bit, CMYK, RGBA, palette."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    Image.new("RGB", (1, 1), (200, 30, 30)).save(p := folder / "one_pixel.png")
    paths.append(p)
    if big:
        paths.append(solid_png(folder / "huge_12000.png", 12000, 12000, (40, 160, 90)))
    grey16 = (np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    Image.fromarray(grey16).save(p := folder / "grey16.png")
    paths.append(p)
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(p := folder / "cmyk.jpg")
    paths.append(p)
    Image.new("RGBA", (40, 30), (0, 0, 255, 100)).save(p := folder / "rgba.png")
    paths.append(p)
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(p := folder / "palette.png", transparency=bytes([255, 128]))  # alpha per palette entry
    paths.append(p)
    with Image.open(folder / "grey16.png") as im:
        assert im.mode in ("I;16", "I")
    with Image.open(folder / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(folder / "palette.png") as im:
        assert im.mode == "P" and isinstance(im.info["transparency"], bytes)
    return paths


def make_bad_images(folder: Path) -> dict[str, Path]:
    """Files that are not usable images: zero bytes, a truncated JPEG, text as .jpg and .txt, > 200 MP."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {"empty": folder / "empty.jpg", "truncated": folder / "truncated.jpg", "text_jpg": folder / "text.jpg",
           "text_txt": folder / "notes.txt", "too_big": folder / "too_big.png"}
    bad["empty"].write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    bad["truncated"].write_bytes(data[: len(data) // 2])
    (folder / "whole.jpg").unlink()
    bad["text_jpg"].write_text("this is a text file, renamed .jpg\n")
    bad["text_txt"].write_text("this is a text file\n")
    solid_png(bad["too_big"], 20000, 20000, (0, 0, 0), rows=1)  # 400 MP > MAX_IMAGE_PIXELS: header only
    return bad


def photo_batch(size: int = 224) -> torch.Tensor:
    """The repository's sample photos as uint8 (N, 3, S, S), through the training data's preprocessing."""
    from pytorch_dataset_class import preprocess_image

    return torch.stack([torch.from_numpy(preprocess_image(p, size)) for p in PHOTOS])


# ----------------------------------------------------------------------------------------------
# Checkpoints

SHAPES_WORDS = ("a small large red green blue yellow circle square triangle to the left right of above below there "
                "is").split()


def shapes_word_map() -> dict[str, int]:
    return {w: i for i, w in enumerate(["<pad>", "<start>", "<end>", "<unk>"] + SHAPES_WORDS)}


def make_checkpoint(path: Path, word_map: dict[str, int], image_size: int = 32, seed: int = 0,
                    word_map_sha1: str = "0" * 40) -> Path:
    """A tiny random Captioner saved as the contract's checkpoint dict (train-only keys: placeholders).

    Decoder weights are drawn from N(0, 0.5) and the <end> logit lowered a little, so captions are
    a few words long and depend on the image (a freshly initialised decoder says nearly nothing).
    """
    from all_models import Captioner, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(word_map), encoder="smallcnn", encoded_size=4, embed_dim=16, attention_dim=16,
                      decoder_dim=16, dropout=0.0)
    model = Captioner(cfg)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_(0.0, 0.5)
        model.decoder.fc.bias[word_map["<end>"]] -= 1.0
    ckpt = {"format_version": 1, "model_config": asdict(cfg), "model_state": model.state_dict(),
            "word_map": word_map, "word_map_sha1": word_map_sha1, "image_size": image_size, "dataset": "shapes",
            "train_config": {}, "optimizer_state": {}, "scheduler_state": {}, "scaler_state": None, "epoch": 1,
            "best_score": 0.0, "epochs_since_improvement": 0, "rng_state": {}, "history": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def with_stored_penalty(checkpoint: Path, out: Path, value: object) -> Path:
    """A copy of `checkpoint` that stores `value` as its length penalty, as release.py does."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["decode"] = {"length_penalty": value}
    torch.save(ckpt, out)
    return out


def tiny_lite0_checkpoint(path: Path, word_map: dict[str, int], seed: int = 0) -> Path:
    """A small decoder on EfficientNet-Lite0 saved as release.py saves models: no encoder weights."""
    from all_models import Captioner, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(word_map), encoder="efficientnet_lite0", encoded_size=7, embed_dim=16,
                      attention_dim=16, decoder_dim=16, dropout=0.0)
    model = Captioner(cfg)
    state = {k: v.half() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    torch.save({"format_version": 1, "model_config": asdict(cfg), "model_state": state, "word_map": word_map,
                "word_map_sha1": "0" * 40, "image_size": 224, "dataset": "flickr8k",
                "train_config": {"encoder_weights": "imagenet"}}, path)
    return path
