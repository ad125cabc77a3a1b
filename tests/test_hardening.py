"""Hardening: a user mistake is one stderr line and an exit code, never a traceback; kills leave loadable files.

Every command line here runs a script as a user would: `<script>.py ARGS` in its own process, with its
own stdout, stderr and exit code (2 for a bad option, 1 for bad input). A fresh interpreter costs ~6 s
of torch import on this 2-core machine, and there are about 70 command lines, so most of them are
forked from one "fork server" that has imported the heavy third-party modules (torch, h5py, PIL, ...)
once; each child then imports the repository's modules afresh and runs the script with
`runpy.run_path(script, run_name="__main__")`, exactly the code `python script.py` runs, then its
atexit handlers, then os._exit (skipping 1.5 s of module teardown that prints nothing). The server
checks that those imports print nothing (an import-time warning would be an extra line in every real
run). The malicious checkpoint is also run in a fresh interpreter, and the kill tests use fresh
`python script.py` processes and real signals.

Files are written under hidden temporary names `.<name>.<pid>.<random>.tmp` and renamed when complete
(utils.atomic_path); a SIGKILLed run leaves its temporary file behind, and make_dataset.py deletes
those of dead processes when it starts, and so does train.py in its run folder.

Covered elsewhere, not repeated here:
- Ctrl-C (SIGINT) during training saves last.pt and says how to resume:
  tests/test_train.py::test_sigint_saves_last_and_resumes
- a NaN/inf loss stops training naming the epoch and step, last.pt untouched:
  tests/test_train.py::test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint
- `train.py --batch-size 0` in a real process: tests/test_train.py::test_bad_option_in_a_real_process
- `make_dataset.py --fraction 0 / 1.5 / -0.5`, missing --karpathy-json / --image-dir (real processes):
  tests/test_data.py::test_fraction_out_of_range_is_exit_2, test_missing_json_or_image_dir_is_one_line_exit_1
- make_dataset skips missing, zero-byte and truncated images and names them:
  tests/test_data.py::test_bad_images_skipped_and_named

The 12000 x 12000 decision: images up to 200 megapixels are captioned, silently (no Pillow
DecompressionBombWarning line); a PNG that size decodes at full size (~576 MB, ~3 s), a JPEG in draft
mode. Larger images are skipped as unreadable with one line naming them (pytorch_dataset_class.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from all_models import load_checkpoint
from pytorch_dataset_class import ImageDataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_TRAIN = ["--encoder", "smallcnn", "--encoder-weights", "none", "--fine-tune-encoder", "--encoded-size", "4",
              "--embed-dim", "16", "--attention-dim", "16", "--decoder-dim", "16", "--workers", "0",
              "--batch-size", "16", "--max-decode-len", "12", "--val-max-images", "8"]
SPLIT_FILES = ("word_map.json", "train.h5", "val.h5", "test.h5")
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")  # utils.atomic_path's temporary files

# ----------------------------------------------------------------------------------------------
# Running the scripts

SERVER = r"""
import atexit, json, os, runpy, signal, sys, time
sys.path.insert(0, os.getcwd())
import h5py, numpy, torch, torchvision, tqdm  # noqa: F401  the heavy imports the scripts share
import PIL.Image  # noqa: F401
import nltk.translate.bleu_score  # noqa: F401
print("ready", flush=True)


def run_script(req):
    # What `python <script> <argv...>` does, in this forked child.
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for n, key in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(req[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), n)
    sys.argv = [req["script"], *req["argv"]]
    code = 0
    try:
        runpy.run_path(req["script"], run_name="__main__")
    except SystemExit as e:  # the interpreter's rules for the exit status
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback a real run would print
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip tearing down torch's modules (1.5 s of garbage collection): nothing observable happens there.
    os._exit(code)


for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        run_script(req)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rc = None
            break
        time.sleep(0.005)
    print(json.dumps({"rc": rc}), flush=True)
"""


@dataclass
class Result:
    argv: list[str]
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)}\nexit {self.rc}\n--- stdout\n{self.out[-2000:]}\n"
                f"--- stderr\n{self.err[-3000:]}")


class ForkServer:
    """Runs `script ARGS` in a child forked from a process that has imported torch & co once."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.n = workdir, 0
        self.server_err = workdir / "server.err"
        with open(self.server_err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=ENV, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout.readline() == "ready\n", self.server_err.read_text()
        printed = self.server_err.read_text()
        assert printed == "", "importing torch & co prints something: " + printed

    def run(self, script: str, *args: str | Path, timeout: float = 120) -> Result:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        argv = [str(a) for a in args]
        self.proc.stdin.write(json.dumps({"script": script, "argv": argv, "stdout": str(out), "stderr": str(err),
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        result = Result([script, *argv], reply["rc"], out.read_text(), err.read_text())
        assert result.rc is not None, f"timed out after {timeout} s\n{result}"
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # an idle server: skip its 1.5 s of interpreter teardown
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory):
    server = ForkServer(tmp_path_factory.mktemp("cli"))
    yield server.run
    server.close()


def one_line(r: Result, code: int, *needles: str | Path) -> str:
    """The run ended with exactly one stderr line holding every needle, exit `code`, no traceback."""
    lines = r.err.strip().splitlines()
    assert r.rc == code and len(lines) == 1 and "Traceback" not in r.err, str(r)
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in the error line\n{r}"
    return lines[0]


def popen(script: str, *args: str | Path, log: Path) -> subprocess.Popen:
    """A fresh `python script ARGS` in its own process group, output to files (a full pipe would block it)."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, stdout=out, stderr=err,
                                start_new_session=True)


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
# Shared inputs


@pytest.fixture(scope="module")
def trained(cli, tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny checkpoint trained by `train.py` for 1 epoch on tiny_shapes; returns its run folder."""
    out = tmp_path_factory.mktemp("trained")
    r = cli("train.py", "--data", tiny_shapes, *TINY_TRAIN, "--epochs", "1", "--out-dir", out, "--run", "r")
    assert r.rc == 0, str(r)
    return out / "r"


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


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path] | dict[str, Path]]:
    root = tmp_path_factory.mktemp("images")
    return {"odd": make_odd_images(root / "odd"), "bad": make_bad_images(root / "bad")}


@pytest.fixture(scope="module")
def good_image(images) -> Path:
    return images["odd"][0]


MARKER_NAME = "pwned"


class Payload:
    """Unpickling this runs `touch <marker>` (os.system): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def checkpoints(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bad checkpoints of every kind, and the marker file the malicious ones would create."""
    d = tmp_path_factory.mktemp("checkpoints")
    marker = d / MARKER_NAME
    good = trained / "last.pt"
    ck = {"missing": d / "missing.pt", "truncated": d / "truncated.pt", "empty": d / "empty.pt", "jpeg": d / "photo.pt",
          "text": d / "notes.pt", "tensor": d / "tensor.pt", "evil_pt": d / "evil.pt", "evil_pickle": d / "evil.pkl",
          "marker": marker}
    data = good.read_bytes()
    ck["empty"].write_bytes(b"")
    ck["truncated"].write_bytes(data[: len(data) // 2])
    Image.new("RGB", (8, 8)).save(ck["jpeg"], format="JPEG")
    ck["text"].write_text("model weights\n")
    torch.save(torch.zeros(3), ck["tensor"])
    # A checkpoint-shaped dict (torch.save's zip format) with a payload inside, and a raw pickle.
    bait = {"format_version": 1, "model_config": {}, "model_state": {}, "word_map": {}, "extra": Payload(marker)}
    torch.save(bait, ck["evil_pt"])
    ck["evil_pickle"].write_bytes(pickle.dumps(bait))
    # The payloads are real: a plain unpickler runs them.
    for path in (ck["evil_pt"], ck["evil_pickle"]):
        torch.load(path, weights_only=False) if path.suffix == ".pt" else pickle.loads(path.read_bytes())
        assert marker.exists(), path
        marker.unlink()
    # A checkpoint whose model config does not fit its weights (someone edited it).
    edited = load_checkpoint(good)
    edited["model_config"]["embed_dim"] = 32
    torch.save(edited, ck.setdefault("foreign_config", d / "foreign_config.pt"))
    return ck


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


@pytest.fixture(scope="module")
def datasets(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Variants of tiny_shapes: another vocabulary, an edited word map, truncated HDF5, another image size."""
    d = tmp_path_factory.mktemp("datasets")
    other = copy_data(tiny_shapes, d / "other_vocab")  # consistent, but not the vocabulary of `trained`
    rewrite_word_map(other)
    edited = copy_data(tiny_shapes, d / "edited_word_map")  # word_map.json no longer what the HDF5 says
    rewrite_word_map(edited, update_h5=False)
    truncated = copy_data(tiny_shapes, d / "truncated")
    for split in ("train", "test"):
        data = (truncated / f"{split}.h5").read_bytes()
        (truncated / f"{split}.h5").write_bytes(data[: len(data) // 2])
    size64 = copy_data(tiny_shapes, d / "size64")
    with h5py.File(size64 / "test.h5", "r+") as f:
        f.attrs["image_size"] = 64
    no_h5 = copy_data(tiny_shapes, d / "no_h5")
    for split in ("train", "test"):
        (no_h5 / f"{split}.h5").unlink()
    return {"other_vocab": other, "edited_word_map": edited, "truncated": truncated, "size64": size64,
            "no_h5": no_h5, "missing": d / "no_such_folder"}


# ----------------------------------------------------------------------------------------------
# inference.py: images


def test_inference_captions_every_kind_of_image(cli, trained: Path, images) -> None:
    """1x1, 12000 x 12000 (no DecompressionBombWarning), 16-bit, CMYK, RGBA and palette: all captioned, exit 0."""
    odd = images["odd"]
    r = cli("inference.py", "--checkpoint", trained / "best.pt", "--json", "--beam-size", "2", "--max-len", "6",
            "--workers", "0", *odd)
    assert r.rc == 0, str(r)
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in odd]
    assert all(row["beam_size"] == 2 for row in rows)
    # stderr: the summary line only (no Pillow warning, no torch warning)
    (line,) = r.err.strip().splitlines()
    assert line.startswith(f"captioned {len(odd)} of {len(odd)} images"), str(r)


def test_inference_skips_each_bad_image_with_one_warning(cli, trained: Path, images, good_image: Path) -> None:
    """A good image among bad ones: it is captioned (exit 0); each bad one gets one warning line naming it."""
    bad = list(images["bad"].values())
    r = cli("inference.py", "--checkpoint", trained / "best.pt", "--json", "--max-len", "6", "--workers", "0",
            good_image, *bad)
    assert r.rc == 0 and "Traceback" not in r.err, str(r)
    (row,) = [json.loads(line) for line in r.out.splitlines()]
    assert row["image"] == str(good_image)
    lines = r.err.strip().splitlines()
    assert len(lines) == len(bad) + 1, str(r)
    for path, line in zip(bad, lines):
        assert line.startswith("inference.py: warning: skipped ") and str(path) in line, line
    assert "too_big.png: image too large" in lines[-2]
    assert lines[-1].startswith(f"captioned 1 of {len(bad) + 1} images") and f"{len(bad)} unreadable" in lines[-1]


@pytest.mark.parametrize("kind", ["missing", "no_images", "empty", "truncated", "text_jpg", "text_txt", "too_big"])
def test_inference_unusable_input_is_one_line(cli, trained: Path, images, tmp_path: Path, kind: str) -> None:
    """A missing path, a folder without images, or a single unreadable image: one error line, exit 1."""
    if kind == "missing":
        target, needle = tmp_path / "nothere.jpg", "no such file or folder"
    elif kind == "no_images":
        target = tmp_path / "folder"
        target.mkdir()
        (target / "readme.txt").write_text("no images here\n")
        needle = "folder holds no images"
    else:
        target = images["bad"][kind]
        needle = "image too large" if kind == "too_big" else "cannot read image"
    r = cli("inference.py", "--checkpoint", trained / "best.pt", "--workers", "0", target)
    one_line(r, 1, target, needle)
    assert r.out == ""


# ----------------------------------------------------------------------------------------------
# Checkpoints: inference.py, evaluate.py, train.py --resume


def checkpoint_cli(script: str, ckpt: Path, tiny_shapes: Path, good_image: Path, out: Path) -> tuple[str, list]:
    """(the option naming the checkpoint, a command line of `script` using `ckpt`)."""
    if script == "inference.py":
        return "--checkpoint", ["--checkpoint", ckpt, "--workers", "0", good_image]
    if script == "evaluate.py":
        return "--checkpoint", ["--checkpoint", ckpt, "--data", tiny_shapes, "--workers", "0", "--out-dir", out]
    return "--resume", ["--resume", ckpt, "--out-dir", out]


@pytest.mark.parametrize("script", ["inference.py", "evaluate.py", "train.py"])
@pytest.mark.parametrize("kind, needle", [
    ("missing", "file not found"),
    ("truncated", "truncated or corrupt"),
    ("jpeg", "refused: not a plain-data PyTorch checkpoint"),
    ("empty", "not a readable checkpoint, truncated or corrupt (EOFError)"),
    ("text", "refused: not a plain-data PyTorch checkpoint"),
    ("tensor", "not an imcap checkpoint"),
    ("evil_pt", "refused: unpickling it would import posix.system"),
    ("evil_pickle", "refused"),
])
def test_bad_checkpoint_is_one_line(cli, checkpoints, tiny_shapes: Path, good_image: Path, tmp_path: Path,
                                    script: str, kind: str, needle: str) -> None:
    """Missing, truncated, not a checkpoint, or crafted to run code when unpickled: refused with one line,
    exit 1, and the payload never ran (weights_only=True)."""
    option, argv = checkpoint_cli(script, checkpoints[kind], tiny_shapes, good_image, tmp_path)
    r = cli(script, *argv)
    one_line(r, 1, f"{option} {checkpoints[kind]}", needle)
    assert not checkpoints["marker"].exists(), "the malicious checkpoint's payload ran"


def test_malicious_checkpoint_in_a_fresh_interpreter(checkpoints, good_image: Path, tmp_path: Path) -> None:
    """The one case that matters most, also as a plain `python inference.py` (no fork server)."""
    r = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(checkpoints["evil_pt"]), "--workers", "0",
                        str(good_image)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    one_line(Result(r.args, r.returncode, r.stdout, r.stderr), 1, f"--checkpoint {checkpoints['evil_pt']}",
             "refused: unpickling it would import posix.system")
    assert not checkpoints["marker"].exists(), "the malicious checkpoint's payload ran"


@pytest.mark.parametrize("script", ["inference.py", "evaluate.py"])
def test_checkpoint_whose_weights_do_not_fit_its_config(cli, checkpoints, tiny_shapes: Path, good_image: Path,
                                                        tmp_path: Path, script: str) -> None:
    option, argv = checkpoint_cli(script, checkpoints["foreign_config"], tiny_shapes, good_image, tmp_path)
    one_line(cli(script, *argv), 1, f"{option} {checkpoints['foreign_config']}", "do not fit its model config",
             "size mismatch")


def test_evaluate_refuses_a_checkpoint_of_another_vocabulary(cli, trained: Path, datasets) -> None:
    r = cli("evaluate.py", "--checkpoint", trained / "best.pt", "--data", datasets["other_vocab"], "--workers", "0")
    one_line(r, 1, f"--checkpoint {trained / 'best.pt'}", f"--data {datasets['other_vocab']}",
             "word map", "is not the data's")


def test_evaluate_refuses_a_checkpoint_of_another_image_size(cli, trained: Path, datasets) -> None:
    r = cli("evaluate.py", "--checkpoint", trained / "best.pt", "--data", datasets["size64"], "--workers", "0")
    one_line(r, 1, "was trained on 32 px images", "holds 64 px images")


def test_resume_refuses_another_vocabulary(cli, trained: Path, datasets, tmp_path: Path) -> None:
    r = cli("train.py", "--resume", trained / "last.pt", "--data", datasets["other_vocab"], "--out-dir", tmp_path)
    one_line(r, 1, f"--resume {trained / 'last.pt'}", "trained with another vocabulary",
             f"--data {datasets['other_vocab']}")


def test_resume_refuses_another_model_config(cli, trained: Path, tmp_path: Path) -> None:
    r = cli("train.py", "--resume", trained / "last.pt", "--embed-dim", "32", "--out-dir", tmp_path)
    one_line(r, 2, f"--resume {trained / 'last.pt'}", "embed_dim 16 (checkpoint) vs 32 (options)")


# ----------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
@pytest.mark.parametrize("kind, needles", [
    ("missing", ["--data", "folder not found"]),
    ("no_h5", ["--data", ".h5"]),
    ("truncated", ["truncated"]),
    ("edited_word_map", ["--data", "word_map.json (sha1", "is not the word map"]),
])
def test_bad_data_is_one_line(cli, trained: Path, datasets, tmp_path: Path, script: str, kind: str,
                              needles: list[str]) -> None:
    """A missing data folder or HDF5 file, a truncated HDF5, a word map the HDF5 was not built with: one line,
    exit 1."""
    data = datasets[kind]
    if script == "evaluate.py":
        r = cli(script, "--checkpoint", trained / "best.pt", "--data", data, "--workers", "0", "--out-dir", tmp_path)
    else:
        r = cli(script, "--data", data, *TINY_TRAIN, "--out-dir", tmp_path)
    names = [data / ("test.h5" if script == "evaluate.py" else "train.h5")] if kind == "truncated" else [data]
    one_line(r, 1, *names, *needles)


def test_unwritable_outputs_are_one_line(cli, trained: Path, tiny_shapes: Path, good_image: Path,
                                         tmp_path: Path) -> None:
    """An output path inside a file: --out-dir (evaluate), --attention-map (inference), --output-dir (make_dataset)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    r = cli("evaluate.py", "--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--workers", "0",
            "--out-dir", blocker / "results")
    one_line(r, 1, f"--out-dir {blocker / 'results'}", "cannot write")
    r = cli("inference.py", "--checkpoint", trained / "best.pt", "--workers", "0", "--attention-map",
            blocker / "map.png", good_image)
    one_line(r, 1, f"--attention-map {blocker / 'map.png'}", "cannot write")
    r = cli("make_dataset.py", "--dataset", "shapes", "--shapes-train", "4", "--shapes-val", "2", "--shapes-test", "2",
            "--image-size", "16", "--workers", "1", "--raw-dir", tmp_path / "raw", "--output-dir", blocker / "out")
    one_line(r, 1, f"--output-dir {blocker / 'out'}", "cannot write")


def write_karpathy(root: Path, files: dict[str, list[str]]) -> Path:
    """A Karpathy split JSON naming `files` per split (two one-word captions each)."""
    images = [{"filename": name, "split": split, "sentences": [{"tokens": ["a", "thing"]}, {"tokens": ["a", "b"]}]}
              for split, names in files.items() for name in names]
    path = root / "dataset_test.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_make_dataset_keeps_odd_images_and_names_unusable_ones(cli, tmp_path: Path) -> None:
    """Through the command line: 1x1, 16-bit, CMYK, RGBA and palette images are kept; a non-image file
    named .jpg is skipped and named in the summary; nothing else reaches stderr. (Missing, zero-byte and
    truncated images: tests/test_data.py::test_bad_images_skipped_and_named; the 12000 x 12000 image
    goes through the same preprocess_image in test_inference_captions_every_kind_of_image.)"""
    image_dir = tmp_path / "images"
    odd = [p.name for p in make_odd_images(image_dir, big=False)]
    plain = []
    for i in range(16):
        Image.new("RGB", (24, 16), (10 * i, 100, 200)).save(image_dir / f"plain_{i}.jpg")
        plain.append(f"plain_{i}.jpg")
    (image_dir / "text.jpg").write_text("not an image\n")
    json_path = write_karpathy(tmp_path, {"train": odd + plain[:14] + ["text.jpg"], "val": plain[14:15],
                                          "test": plain[15:]})
    out = tmp_path / "out"
    r = cli("make_dataset.py", "--dataset", "flickr8k", "--karpathy-json", json_path, "--image-dir", image_dir,
            "--output-dir", out, "--image-size", "16", "--min-word-freq", "1", "--workers", "1")
    assert r.rc == 0 and r.err.strip() == "", str(r)  # no progress bars (not a terminal), no warnings
    assert "images: train 19, val 1, test 1" in r.out and "skipped 1 unusable images" in r.out, str(r)
    assert f"{image_dir / 'text.jpg'}: cannot read image" in r.out
    assert ImageDataset(out / "train.h5").filenames()[:len(odd)] == odd


@pytest.mark.parametrize("kind", ["no_images", "truncated_json"])
def test_make_dataset_bad_input_is_one_line(cli, tmp_path: Path, kind: str) -> None:
    """A folder with no images (every file missing) or a truncated Karpathy JSON: one line, exit 1."""
    names = [f"img_{i}.jpg" for i in range(20)]
    json_path = write_karpathy(tmp_path, {"train": names, "val": names[:2], "test": names[:2]})
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    if kind == "truncated_json":
        for name in names:
            Image.new("RGB", (8, 8)).save(image_dir / name)
        json_path.write_text(json_path.read_text()[:100])
    r = cli("make_dataset.py", "--dataset", "flickr8k", "--karpathy-json", json_path, "--image-dir", image_dir,
            "--output-dir", tmp_path / "out", "--workers", "1")
    if kind == "no_images":
        one_line(r, 1, f"--image-dir {image_dir}", image_dir / "img_0.jpg", "image not found")
    else:
        one_line(r, 1, json_path, "not a Karpathy split JSON")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------
# Options out of range, devices that are not there


@pytest.mark.parametrize("script, option, value", [
    ("inference.py", "--beam-size", "0"),
    ("inference.py", "--max-len", "0"),
    ("inference.py", "--batch-size", "0"),
    ("evaluate.py", "--beam-sizes", "0"),
    ("evaluate.py", "--max-len", "0"),
    ("evaluate.py", "--batch-size", "0"),
    # train.py --batch-size 0: tests/test_train.py::test_bad_option_in_a_real_process;
    # make_dataset.py --fraction 0 / 1.5: tests/test_data.py::test_fraction_out_of_range_is_exit_2
])
def test_option_out_of_range_is_exit_2(cli, trained: Path, tiny_shapes: Path, good_image: Path, script: str,
                                       option: str, value: str) -> None:
    args = [good_image] if script == "inference.py" else ["--data", tiny_shapes]
    r = cli(script, "--checkpoint", trained / "best.pt", *args, option, value)
    one_line(r, 2, option, "must be >= 1")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("device", ["cuda", "mps"])
@pytest.mark.parametrize("script", ["inference.py", "evaluate.py", "train.py"])
def test_absent_device_is_exit_2(cli, trained: Path, tiny_shapes: Path, good_image: Path, tmp_path: Path,
                                 script: str, device: str) -> None:
    if script == "inference.py":
        argv = ["--checkpoint", trained / "best.pt", good_image]
    elif script == "evaluate.py":
        argv = ["--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--out-dir", tmp_path]
    else:
        argv = ["--data", tiny_shapes, *TINY_TRAIN, "--out-dir", tmp_path]
    one_line(cli(script, *argv, "--device", device), 2, f"--device {device}", "no ")


# ----------------------------------------------------------------------------------------------
# SIGKILL


@pytest.fixture(scope="module")
def killed_training(cli, tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """train.py killed with SIGKILL twice, then resumed to the end.

    1. a fresh run, killed the moment last.pt appears (best.pt of the same epoch is being written);
    2. `--resume last.pt`, killed while a checkpoint is half-written (its temporary file exists and grows);
    3. `--resume last.pt` to the end.
    """
    out = tmp_path_factory.mktemp("killed")
    run_dir = out / "k"
    state: dict = {"run_dir": run_dir}
    first = popen("train.py", "--data", tiny_shapes, *TINY_TRAIN, "--epochs", "3", "--out-dir", out, "--run", "k",
                  log=out / "first")
    assert kill_when(first, (run_dir / "last.pt").exists), (out / "first.err").read_text()[-3000:]
    state["after_first"] = snapshot(run_dir)

    second = popen("train.py", "--resume", run_dir / "last.pt", log=out / "second")

    def half_written() -> bool:
        return any(size(p) > 0 for p in temps(run_dir, second.pid, ("last.pt", "best.pt")))

    state["second_killed_mid_write"] = kill_when(second, half_written)
    state["second_err"] = (out / "second.err").read_text()
    state["after_second"] = snapshot(run_dir)
    state["second_temps"] = temps(run_dir, second.pid)
    state["third"] = cli("train.py", "--resume", run_dir / "last.pt")
    state["after_third"] = snapshot(run_dir)
    return state


def snapshot(run_dir: Path) -> dict:
    """The run folder's file names, and what last.pt and best.pt hold (both read with load_checkpoint)."""
    snap: dict = {"files": sorted(p.name for p in run_dir.iterdir())}
    for name in ("last", "best"):
        path = run_dir / f"{name}.pt"
        ck = load_checkpoint(path) if path.exists() else None  # a half-written file would raise here
        snap[name] = None if ck is None else {"epoch": ck["epoch"], "best_epoch": ck.get("best_epoch"),
                                              "history": [h["epoch"] for h in ck["history"]]}
    return snap


FINAL_RUN_FILES = {"last.pt", "best.pt", "config.json", "metrics.jsonl", "curves.png"}


def test_sigkill_during_training_leaves_loadable_checkpoints_and_resume_finishes(killed_training) -> None:
    s = killed_training
    first, second, third = s["after_first"], s["after_second"], s["after_third"]
    # 1. killed right after last.pt appeared: last.pt is whole (epoch 1); best.pt is absent or whole
    assert first["last"]["epoch"] == 1 and first["best"] in (None, first["last"])
    # 2. killed while a checkpoint was half-written: that file is a hidden temporary; the final names
    # load (snapshot() read them with all_models.load_checkpoint) and hold complete epochs
    assert s["second_killed_mid_write"] and s["second_temps"], \
        "the resumed run was not caught writing a checkpoint\n" + s["second_err"][-3000:]
    last = second["last"]
    assert last["epoch"] in (1, 2) and last["history"] == list(range(1, last["epoch"] + 1))
    for snap in (first, second):
        assert {n for n in snap["files"] if not n.startswith(".")} <= FINAL_RUN_FILES, snap["files"]
        assert all(TEMP_NAME.match(n) for n in snap["files"] if n.startswith(".")), snap["files"]
    # 3. --resume goes on from there to the end
    assert s["third"].rc == 0, str(s["third"])
    assert third["last"]["epoch"] == 3 and third["last"]["history"] == [1, 2, 3]


def test_best_pt_is_never_behind_last_pt(killed_training) -> None:
    """Whenever last.pt exists, best.pt holds the epoch last.pt calls the best (or a later one)."""
    for when in ("after_first", "after_second", "after_third"):
        snap = killed_training[when]
        assert snap["best"] is not None, f"{when}: no best.pt, but last.pt says epoch {snap['last']['best_epoch']}"
        assert snap["best"]["epoch"] >= snap["last"]["best_epoch"], when


def test_training_removes_the_temporary_files_of_a_killed_run(killed_training) -> None:
    assert killed_training["third"].rc == 0
    left = temps(killed_training["run_dir"])
    assert not left, f"stale temporary files: {sorted(p.name for p in left)}"


def test_sigkill_make_dataset_leaves_no_half_written_file_and_rerun_completes(cli, tmp_path: Path) -> None:
    out, raw = tmp_path / "out", tmp_path / "raw"
    args = ["--dataset", "shapes", "--shapes-train", "600", "--shapes-val", "20", "--shapes-test", "20",
            "--image-size", "32", "--workers", "1", "--min-word-freq", "1", "--raw-dir", raw, "--output-dir", out]

    def mid_way(proc: subprocess.Popen) -> bool:  # the train split is being written: about 100 images in
        return out.is_dir() and any(size(p) > 300_000 for p in temps(out, proc.pid, ("train.h5",)))

    # 1. killed mid-way into a fresh folder: no file under a final name
    first = popen("make_dataset.py", *args, log=tmp_path / "first")
    assert kill_when(first, lambda: mid_way(first)), (tmp_path / "first.err").read_text()[-3000:]
    assert not any((out / name).exists() for name in SPLIT_FILES), sorted(p.name for p in out.iterdir())
    assert temps(out, first.pid), "killed before it wrote anything: not mid-way"
    assert all(TEMP_NAME.match(p.name) for p in out.iterdir())  # hidden temporaries only
    # 2. the rerun completes and deletes the killed run's temporary files
    r = cli("make_dataset.py", *args)
    assert r.rc == 0, str(r)
    assert "removed" in r.out and "temporary files a killed run had left" in r.out, r.out
    assert sorted(p.name for p in out.iterdir()) == sorted(SPLIT_FILES)
    before = {name: sha1(out / name) for name in SPLIT_FILES}
    # 3. a run over those complete files, killed mid-way, leaves them as they were, and readable
    third = popen("make_dataset.py", *args[:-2], "--seed", "1", "--output-dir", out, log=tmp_path / "third")
    assert kill_when(third, lambda: mid_way(third)), (tmp_path / "third.err").read_text()[-3000:]
    assert {name: sha1(out / name) for name in SPLIT_FILES} == before
    for split, n in (("train", 600), ("val", 20), ("test", 20)):
        ds = ImageDataset(out / f"{split}.h5")
        assert len(ds) == n and ds.attrs["word_map_sha1"] == before["word_map.json"]
