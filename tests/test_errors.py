"""The same user mistake on several scripts: a bad or untrusted checkpoint, bad data, an unwritable output, an
option out of range, an absent device. Each ends with one stderr line naming what is wrong and an exit status
(2 for a bad option, 1 for bad input), never a traceback; a malicious checkpoint's payload never runs."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PHOTOS, ROOT, one_line, run_script, script_env, sha1, tiny_train_args
from PIL import Image

import evaluate
import inference
from checkpoints import load_checkpoint
from cli import EXIT_BAD_OPTION, run_cli
from pytorch_dataset_class import Vocab

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
def test_bad_checkpoint_is_one_line(checkpoints, tiny_shapes: Path, good_image: Path, tmp_path: Path,
                                    script: str, kind: str, needle: str) -> None:
    """Missing, truncated, not a checkpoint, or crafted to run code when unpickled: refused with one line,
    exit 1, and the payload never ran (weights_only=True)."""
    option, argv = checkpoint_cli(script, checkpoints[kind], tiny_shapes, good_image, tmp_path)
    r = run_script(script, *argv)
    one_line(r, 1, f"{option} {checkpoints[kind]}", needle)
    assert not checkpoints["marker"].exists(), "the malicious checkpoint's payload ran"


def test_malicious_checkpoint_in_a_fresh_interpreter(checkpoints, good_image: Path) -> None:
    """The one case that matters most, also as a plain `python inference.py` (no fork server)."""
    r = run_script("inference.py", "--checkpoint", checkpoints["evil_pt"], "--workers", "0", good_image,
                   mode="fresh")
    one_line(r, 1, f"--checkpoint {checkpoints['evil_pt']}", "refused: unpickling it would import posix.system")
    assert not checkpoints["marker"].exists(), "the malicious checkpoint's payload ran"


@pytest.mark.parametrize("script", ["inference.py", "evaluate.py"])
def test_checkpoint_whose_weights_do_not_fit_its_config(checkpoints, tiny_shapes: Path, good_image: Path,
                                                        tmp_path: Path, script: str) -> None:
    option, argv = checkpoint_cli(script, checkpoints["foreign_config"], tiny_shapes, good_image, tmp_path)
    one_line(run_script(script, *argv), 1, f"{option} {checkpoints['foreign_config']}",
             "do not fit its model config", "size mismatch")


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
def test_checkpoint_of_another_vocabulary_is_refused(trained: Path, datasets, tmp_path: Path, script: str) -> None:
    """evaluate.py --checkpoint and train.py --resume refuse a checkpoint trained with another vocabulary than
    the --data folder's: one line naming both, exit 1."""
    if script == "evaluate.py":
        r = run_script("evaluate.py", "--checkpoint", trained / "best.pt", "--data", datasets["other_vocab"],
                       "--workers", "0")
        one_line(r, 1, f"--checkpoint {trained / 'best.pt'}", f"--data {datasets['other_vocab']}",
                 "word map", "is not the data's")
    else:
        r = run_script("train.py", "--resume", trained / "last.pt", "--data", datasets["other_vocab"], "--out-dir",
                       tmp_path)
        one_line(r, 1, f"--resume {trained / 'last.pt'}", "trained with another vocabulary",
                 f"--data {datasets['other_vocab']}")


# ----------------------------------------------------------------------------------------------
# Data and outputs


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
@pytest.mark.parametrize("kind, needles", [
    ("missing", ["--data", "folder not found"]),
    ("no_h5", ["--data", ".h5"]),
    ("truncated", ["truncated"]),
    ("edited_word_map", ["--data", "word_map.json (sha1", "is not the word map"]),
])
def test_bad_data_is_one_line(trained: Path, datasets, tmp_path: Path, script: str, kind: str,
                              needles: list[str]) -> None:
    """A missing data folder or HDF5 file, a truncated HDF5, a word map the HDF5 was not built with: one line,
    exit 1."""
    data = datasets[kind]
    if script == "evaluate.py":
        r = run_script(script, "--checkpoint", trained / "best.pt", "--data", data, "--workers", "0", "--out-dir",
                       tmp_path)
    else:
        r = run_script(script, *tiny_train_args(data, tmp_path))
    names = [data / ("test.h5" if script == "evaluate.py" else "train.h5")] if kind == "truncated" else [data]
    one_line(r, 1, *names, *needles)


@pytest.mark.parametrize("script", ["evaluate.py", "inference.py", "make_dataset.py"])
def test_unwritable_outputs_are_one_line(trained: Path, tiny_shapes: Path, good_image: Path, tmp_path: Path,
                                         script: str) -> None:
    """An output path inside a file: --out-dir (evaluate), --attention-map (inference), --output-dir (make_dataset)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    if script == "evaluate.py":
        r = run_script("evaluate.py", "--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--workers", "0",
                       "--out-dir", blocker / "results")
        one_line(r, 1, f"--out-dir {blocker / 'results'}", "cannot write")
    elif script == "inference.py":
        r = run_script("inference.py", "--checkpoint", trained / "best.pt", "--workers", "0", "--attention-map",
                       blocker / "map.png", good_image)
        one_line(r, 1, f"--attention-map {blocker / 'map.png'}", "cannot write")
    else:
        r = run_script("make_dataset.py", "--dataset", "shapes", "--shapes-train", "4", "--shapes-val", "2",
                       "--shapes-test", "2", "--image-size", "16", "--workers", "1", "--raw-dir", tmp_path / "raw",
                       "--output-dir", blocker / "out")
        one_line(r, 1, f"--output-dir {blocker / 'out'}", "cannot write")


# ----------------------------------------------------------------------------------------------
# Options out of range, devices that are not there


OUT_OF_RANGE = [  # (script, option, value, what the error line says besides the option)
    ("inference.py", "--beam-size", "0", ["must be >= 1"]),
    ("inference.py", "--max-len", "0", ["must be >= 1"]),
    ("inference.py", "--batch-size", "0", ["must be >= 1"]),
    ("evaluate.py", "--beam-sizes", "0", ["must be >= 1"]),
    ("evaluate.py", "--max-len", "0", ["must be >= 1"]),
    ("evaluate.py", "--batch-size", "0", ["must be >= 1"]),
    ("train.py", "--batch-size", "0", ["must be >= 1"]),
    ("make_dataset.py", "--fraction", "0", []),
    ("make_dataset.py", "--fraction", "1.5", []),
    ("make_dataset.py", "--fraction", "-0.5", []),
]


@pytest.mark.parametrize("script, option, value, needles", OUT_OF_RANGE, ids=["-".join(c[:3]) for c in OUT_OF_RANGE])
def test_option_out_of_range_is_exit_2(trained: Path, tiny_shapes: Path, good_image: Path, tmp_path: Path,
                                       script: str, option: str, value: str, needles: list[str]) -> None:
    """An option out of its range: one line naming the option, exit 2; train.py's line is exactly
    `train.py: error: --batch-size must be >= 1, got 0`."""
    if script in ("inference.py", "evaluate.py"):
        args = [good_image] if script == "inference.py" else ["--data", tiny_shapes]
        r = run_script(script, "--checkpoint", trained / "best.pt", *args, option, value)
    elif script == "train.py":
        r = run_script(script, *tiny_train_args(tiny_shapes, tmp_path, option, value))
    else:
        r = run_script(script, option, value)
    line = one_line(r, 2, option, *needles)
    if script == "train.py":
        assert line == "train.py: error: --batch-size must be >= 1, got 0"


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("device", ["cuda", "mps"])
@pytest.mark.parametrize("script", ["inference.py", "evaluate.py", "train.py"])
def test_absent_device_is_exit_2(trained: Path, tiny_shapes: Path, good_image: Path, tmp_path: Path,
                                 script: str, device: str) -> None:
    if script == "inference.py":
        argv = ["--checkpoint", trained / "best.pt", good_image]
    elif script == "evaluate.py":
        argv = ["--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--out-dir", tmp_path]
    else:
        argv = tiny_train_args(tiny_shapes, tmp_path)
    one_line(run_script(script, *argv, "--device", device), 2, f"--device {device}", "no ")


# ==============================================================================================
# Data and outputs (make_dataset.py, inference.py, the HDF5 files): options out of range, damaged files


DATA_OPTIONS = [  # (script, option, value, what the error line says besides the option)
    ("make_dataset.py", "--workers", "1000", "must be <= 32, got 1000"),
    ("make_dataset.py", "--workers", "-1", "must be >= 0, got -1"),
    ("make_dataset.py", "--image-size", "8", "must be >= 16, got 8"),
    ("make_dataset.py", "--image-size", "100000", "must be <= 4096, got 100000"),
    ("make_dataset.py", "--image-size", "64.5", "'64.5' is not an integer"),
    ("make_dataset.py", "--max-len", "0", "must be >= 1, got 0"),
    ("make_dataset.py", "--max-len", "1000000000000", "must be <= 256, got 1000000000000"),
    ("make_dataset.py", "--captions-per-image", "0", "must be >= 1, got 0"),
    ("make_dataset.py", "--captions-per-image", "1000000", "must be <= 100, got 1000000"),
    ("make_dataset.py", "--min-word-freq", "0", "must be >= 1, got 0"),
    ("make_dataset.py", "--seed", "1234567890123456789012345", "must be <= 4294967295, got 1234567890123456789012345"),
    ("make_dataset.py", "--seed", "-1", "must be >= 0, got -1"),
    ("make_dataset.py", "--shapes-train", "0", "must be >= 1, got 0"),
    ("make_dataset.py", "--shapes-test", "10000000000", "must be <= 1000000, got 10000000000"),
    ("make_dataset.py", "--fraction", "nan", "must be in (0, 1], got nan"),
    ("inference.py", "--beam-size", "1000000", "must be <= 100, got 1000000"),
    ("inference.py", "--max-len", "1000000000000", "must be <= 1000, got 1000000000000"),
    ("inference.py", "--batch-size", "1000000000", "must be <= 512, got 1000000000"),
    ("inference.py", "--workers", "1000", "must be <= 32, got 1000"),
    ("evaluate.py", "--max-len", "1000000000000", "must be <= 1000, got 1000000000000"),
]


@pytest.mark.parametrize("script, option, value, needle", DATA_OPTIONS, ids=["-".join(c[:3]) for c in DATA_OPTIONS])
def test_data_option_out_of_range_is_exit_2(tmp_path: Path, script: str, option: str, value: str,
                                            needle: str) -> None:
    """Every numeric option of make_dataset.py and inference.py (and the decoding options evaluate.py shares) is
    range-checked, absurd values included: one argparse line naming the option, exit 2, before any work."""
    if script == "make_dataset.py":
        args = ["--raw-dir", tmp_path / "raw", "--output-dir", tmp_path / "out"]
    else:  # argparse refuses before the (absent) checkpoint, images or data are looked at
        args = ["--checkpoint", tmp_path / "none.pt", *([tmp_path / "x.png"] if script == "inference.py" else
                                                         ["--data", tmp_path])]
    one_line(run_script(script, *args, option, value), 2, f"argument {option}: {needle}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script", [inference, evaluate])
@pytest.mark.parametrize("value, message", [
    ("-1", "argument --length-penalty: must be a finite number >= 0, got -1.0"),
    ("inf", "argument --length-penalty: must be a finite number >= 0, got inf")])
def test_a_bad_length_penalty_is_one_line_exit_2(script, value, message, tmp_path, capsys, monkeypatch):
    # Refused before anything is read: the checkpoint and the data need not exist.
    argv = ["photo.jpg"] if script is inference else ["--data", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", "--checkpoint", "missing.pt", *argv,
                                      "--length-penalty", value])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == EXIT_BAD_OPTION and message in line


@pytest.fixture(scope="module")
def damaged(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of tiny_shapes with 16 bytes zeroed in every split file: inside a stored image ("data"), or inside
    the object header of the captions dataset ("metadata")."""
    import shutil

    from test_pytorch_dataset_class import damage

    out = {}
    for where in ("data", "metadata"):
        folder = Path(shutil.copytree(tiny_shapes, tmp_path_factory.mktemp("damaged") / where))
        for split in ("train", "val", "test"):
            damage(folder / f"{split}.h5", where, "images" if where == "data" else "captions")
        out[where] = folder
    return out


@pytest.mark.parametrize("script, workers", [("evaluate.py", "0"), ("train.py", "0"), ("train.py", "1")])
@pytest.mark.parametrize("where", ["data", "metadata"])
def test_damaged_data_file_is_one_line_not_a_hang(trained: Path, damaged: dict[str, Path], tmp_path: Path,
                                                  script: str, workers: str, where: str) -> None:
    """A few bytes zeroed inside an HDF5 file make_dataset.py wrote (in an image, or in the metadata): evaluate.py
    and train.py stop within seconds with one line naming the file, also when a DataLoader worker reads it."""
    data = damaged[where]
    if script == "evaluate.py":
        args = ["--checkpoint", trained / "best.pt", "--data", data, "--out-dir", tmp_path, "--workers", workers]
    else:
        args = tiny_train_args(data, tmp_path, "--epochs", "1", "--workers", workers)
    r = run_script(script, *args, timeout=60)
    one_line(r, 1, data / ("test.h5" if script == "evaluate.py" else "train.h5"), "checksum mismatch",
             "rebuild it with make_dataset.py")


# ==============================================================================================
# Runs, checkpoints and options
# ----------------------------------------------------------------------------------------------
# Every numeric option is range-checked, absurd values included: one line, exit 2, nothing written


def _huge(digits: int) -> str:
    return "9" * digits


ABSURD = [  # (script, option, value, what the error line says besides the option)
    ("train.py", "--seed", _huge(25), "must be <= 9223372036854775807"),
    ("train.py", "--seed", "-1", "must be >= 0"),
    ("train.py", "--workers", "1000", "must be <= 32"),
    ("train.py", "--batch-size", str(10**9), "must be <= 65536"),
    ("train.py", "--epochs", _huge(25), "must be <= 1000000"),
    ("train.py", "--max-decode-len", str(10**9), "must be <= 1000"),
    ("train.py", "--encoded-size", str(10**6), "must be <= 64"),
    ("train.py", "--embed-dim", str(10**9), "must be <= 16384"),
    ("train.py", "--decoder-lr", "1e308", "must be a positive number below 1e30"),
    ("train.py", "--encoder-lr", "nan", "must be a positive number below 1e30"),
    ("train.py", "--grad-clip", "inf", "must be a finite number >= 0"),
    ("train.py", "--alpha-c", "nan", "must be >= 0"),
    ("train.py", "--dropout", "-0.1", "must be in [0, 1)"),
    ("train.py", "--log-every", "0", "must be >= 1"),
    ("train.py", "--val-max-images", "0", "must be >= 1 or none"),
    ("check_device.py", "--workers", "1000", "must be <= 32"),
    ("check_device.py", "--seed", _huge(25), "must be <= 9223372036854775807"),
    ("evaluate.py", "--beam-sizes", str(10**9), "must be <= 100"),
    ("evaluate.py", "--workers", "1000", "must be <= 32"),
    ("app.py", "--threads", str(10**9), "must be <= 1024"),
    ("app.py", "--max-upload-mb", str(10**9), "must be <= 2000"),
    ("app.py", "--port", "70000", "must be <= 65535"),
    ("bench.py", "--threads", str(10**9), "must be <= 1024"),
]


@pytest.mark.parametrize("script, option, value, needle", ABSURD, ids=[f"{c[0]}{c[1]}={c[2][:12]}" for c in ABSURD])
def test_absurd_option_is_one_line_and_writes_nothing(trained: Path, tiny_shapes: Path, tmp_path: Path, script: str,
                                                      option: str, value: str, needle: str) -> None:
    """A 25-digit --seed, --workers 1000, a learning rate of 1e308, ...: one line naming the option, exit 2, and
    for train.py no run folder (config.json used to be written before the seed failed)."""
    out = tmp_path / "out"
    if script in ("train.py", "check_device.py"):
        argv = [*tiny_train_args(tiny_shapes, out, option, value), *(["cpu"] if script == "check_device.py" else [])]
    elif script == "evaluate.py":
        argv = ["--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--out-dir", out, option, value]
    elif script == "app.py":
        argv = ["--checkpoint", trained / "best.pt", option, value]
    else:
        argv = ["--checkpoint", "none", "--output", out / "bench.json", option, value]
    one_line(run_script(script, *argv, mode="in_process"), 2, option, needle)
    assert not out.exists()


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "inference.py", "check_device.py", "bench.py", "app.py"])
@pytest.mark.parametrize("device, needle", [("cuda:x", "expected auto, cpu, cuda, cuda:N or mps"),
                                            ("cuda:99", "CUDA device")])
def test_a_cuda_device_that_is_not_there_is_one_line(trained: Path, tiny_shapes: Path, good_image: Path,
                                                     tmp_path: Path, script: str, device: str, needle: str) -> None:
    """--device cuda:99 (beyond the GPUs here, or no GPU at all) and a malformed cuda:x: one line, exit 2."""
    if script == "train.py":
        argv = [*tiny_train_args(tiny_shapes, tmp_path), "--device", device]
    elif script == "check_device.py":
        argv = [*tiny_train_args(tiny_shapes, tmp_path), device]
    elif script == "evaluate.py":
        argv = ["--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--out-dir", tmp_path, "--device", device]
    elif script == "inference.py":
        argv = ["--checkpoint", trained / "best.pt", good_image, "--device", device]
    elif script == "app.py":
        argv = ["--checkpoint", trained / "best.pt", "--port", "0", "--device", device]
    else:
        argv = ["--checkpoint", "none", "--output", tmp_path / "bench.json", "--device", device]
    one_line(run_script(script, *argv, mode="in_process"), 2, device, needle)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_out_dir_that_is_a_file_is_one_line(trained: Path, tiny_shapes: Path, tmp_path: Path, script: str) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    if script == "train.py":
        argv = tiny_train_args(tiny_shapes, blocker)
    else:
        argv = ["--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--workers", "0", "--out-dir", blocker]
    one_line(run_script(script, *argv, mode="in_process"), 1, f"--out-dir {blocker}: a file, not a folder")
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("script", ["release.py", "bench.py"])
def test_an_output_onto_the_checkpoint_is_refused(trained: Path, tmp_path: Path, script: str) -> None:
    """release.py --out and bench.py --output naming the checkpoint they read: refused, the checkpoint intact."""
    ckpt = tmp_path / "best.pt"
    shutil.copy(trained / "best.pt", ckpt)
    before = ckpt.read_bytes()
    option = "--out" if script == "release.py" else "--output"
    one_line(run_script(script, "--checkpoint", ckpt, option, ckpt, mode="in_process"), 2,
             f"{option} {ckpt} is the --checkpoint file")
    assert ckpt.read_bytes() == before


# ----------------------------------------------------------------------------------------------
# A crafted checkpoint: one line naming the file, before a model is built, in every script that reads one


def _crafted(good: dict, kind: str) -> dict:
    ck = copy.deepcopy(good)
    if kind == "float_grid":
        ck["model_config"]["encoded_size"] = 4.0
    elif kind == "no_end":
        del ck["word_map"][Vocab.END]
    elif kind == "huge_grid":
        ck["model_config"]["encoded_size"] = 100_000
    elif kind == "huge_image":
        ck["image_size"] = 10**6
    else:  # within every bound, but a model of this size would take ~12 GB: the weights say it is not that
        ck["model_config"].update(embed_dim=16384, attention_dim=16384, decoder_dim=16384)
    return ck


CRAFTED = {"float_grid": "its model option encoded_size must be an integer, got 4.0",
           "no_end": "its word_map lacks <end>",
           "huge_grid": "its model option encoded_size must be in [1, 64], got 100000",
           "huge_image": "its image_size must be an integer in [1, 4096], got 1000000",
           "huge_model": "the weights do not fit its model config (size mismatch for"}


@pytest.mark.parametrize("script", ["inference.py", "evaluate.py", "train.py", "release.py", "app.py"])
@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_checkpoint_is_one_line_in_every_script(trained: Path, tiny_shapes: Path, good_image: Path,
                                                        tmp_path: Path, script: str, kind: str) -> None:
    if script == "app.py":
        pytest.importorskip("uvicorn")
    path = tmp_path / "crafted.pt"
    torch.save(_crafted(load_checkpoint(trained / "last.pt"), kind), path)
    option, argv = checkpoint_cli(script, path, tiny_shapes, good_image, tmp_path / "out") \
        if script in ("inference.py", "evaluate.py", "train.py") else ("--checkpoint", ["--checkpoint", path])
    if script == "release.py":
        argv += ["--out", tmp_path / "out" / "release.pt"]
    elif script == "app.py":
        argv += ["--port", "0", "--device", "cpu"]
    one_line(run_script(script, *argv, mode="in_process"), 1, f"{option} {path}: ", CRAFTED[kind])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# A full disk: every script that writes ends in one line naming the file, keeps the files that were there and
# leaves no temporary file. The disk is a limit on each file's size (RLIMIT_FSIZE): a write past it fails with
# EFBIG ("file too large (size limit)") as one past a full disk fails with ENOSPC, and no root is needed.


def files_of(folder: Path) -> dict[str, str]:
    """Every file of a folder, hidden ones too (a temporary file left behind) -> the sha1 of its bytes."""
    return {p.name: sha1(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def shapes_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw shapes data (a Karpathy JSON and 32 px images) whose train split outgrows a 1 MB disk (300 images:
    more than make_dataset's shared block of 256 images, which fits)."""
    from shapes import generate_shapes

    raw = tmp_path_factory.mktemp("shapes_raw")
    generate_shapes(raw, 300, 8, 8, image_size=32, seed=0, workers=1, progress=False)
    return raw


def full_disk_run(script: str, trained: Path, tiny_shapes: Path, good_image: Path, shapes_raw: Path,
                  tmp_path: Path) -> tuple[Path, Path, list]:
    """(the folder whose files must survive, the file the line names, the command line), after a first run with
    room that wrote the files a second one must not lose."""
    if script == "make_dataset.py":
        out = tmp_path / "out"
        argv = ["--dataset", "flickr8k", "--karpathy-json", shapes_raw / "dataset_shapes.json", "--image-dir",
                shapes_raw / "images", "--output-dir", out, "--image-size", "32", "--workers", "0",
                "--min-word-freq", "1"]
        assert run_script(script, *argv, "--fraction", "0.1").rc == 0
        return out, out / "train.h5", argv
    if script == "evaluate.py":
        out = tmp_path / "out"
        argv = ["--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--workers", "0", "--out-dir", out,
                "--beam-sizes", "1"]
        assert run_script(script, *argv, "--max-images", "2").rc == 0
        return out, out / "references_test.json", argv
    if script == "train.py":  # a second epoch of a copied run: its checkpoints do not fit
        run_dir = tmp_path / "r"
        shutil.copytree(trained, run_dir)
        return run_dir, run_dir, ["--resume", run_dir / "last.pt", "--epochs", "2"]
    if script == "train.py --cache-features":  # the feature cache beside a copy of the data
        data = tmp_path / "data"
        shutil.copytree(tiny_shapes, data)
        return data, data, tiny_train_args(data, tmp_path / "runs", "--cache-features", "--epochs", "1")
    if script == "inference.py":  # an attention map over the one of an earlier run
        out = tmp_path / "maps"
        argv = ["--checkpoint", trained / "best.pt", "--workers", "0", "--attention-map", out / "map.png", PHOTOS[0]]
        assert run_script(script, *argv).rc == 0
        return out, out / "map.png", argv
    out = tmp_path / "rel"  # release.py over an earlier release
    argv = ["--checkpoint", trained / "best.pt", "--out", out / "release.pt"]
    assert run_script(script, *argv).rc == 0
    return out, out / "release.pt", argv


@pytest.mark.parametrize("script, fsize", [("make_dataset.py", 1_000_000), ("evaluate.py", 2000),
                                           ("train.py", 20_000), ("train.py --cache-features", 20_000),
                                           ("inference.py", 2000), ("release.py", 20_000)])
def test_a_full_disk_is_one_line_and_loses_nothing(trained: Path, tiny_shapes: Path, good_image: Path,
                                                   shapes_raw: Path, tmp_path: Path, script: str, fsize: int) -> None:
    folder, named, argv = full_disk_run(script, trained, tiny_shapes, good_image, shapes_raw, tmp_path)
    before = files_of(folder)
    r = run_script(script.split()[0], *argv, fsize=fsize)
    if script == "evaluate.py":  # the tokenizer's Java fails first on this disk, and says so: it has a fallback
        r.err = "".join(line for line in r.err.splitlines(True) if not line.startswith("java failed (OSError"))
    one_line(r, 1, "file too large (size limit) while writing ", named)
    after = files_of(folder)
    if script == "train.py":  # the resumed run rewrites its config.json (its --epochs), and nothing else
        after["config.json"] = before["config.json"]
    assert after == before, "a file was lost, changed or left behind"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 400 KB file system (tmpfs), where a write past the end fails with ENOSPC; root only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("script", ["make_dataset.py", "release.py"])
def test_a_really_full_disk_says_no_space_left(trained: Path, shapes_raw: Path, small_disk: Path,
                                               script: str) -> None:
    """ENOSPC on a full file system: HDF5 wrote its chunks at close and then crashed the process (exit 139 after
    two tracebacks), torch.save said "unexpected pos"; now one line, and nothing left on the disk."""
    if script == "make_dataset.py":
        argv = ["--dataset", "flickr8k", "--karpathy-json", shapes_raw / "dataset_shapes.json", "--image-dir",
                shapes_raw / "images", "--output-dir", small_disk / "out", "--image-size", "32", "--workers", "0"]
        named = small_disk / "out"
    else:
        argv, named = ["--checkpoint", trained / "best.pt", "--out", small_disk / "release.pt"], small_disk
        (small_disk / "filler").write_bytes(b"\0" * 380_000)  # the disk is almost full already
    one_line(run_script(script, *argv), 1, "no space left on device while writing ", named)
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] in ([], ["filler"])


# ----------------------------------------------------------------------------------------------
# A closed pipe (`script ... | head -1`): the script ends quietly, as cat and grep do, with exit status 141


@pytest.mark.parametrize("script", ["inference.py", "inference.py --json", "evaluate.py", "make_dataset.py",
                                    "release.py"])
def test_a_closed_stdout_ends_quietly(trained: Path, tiny_shapes: Path, good_image: Path, tmp_path: Path,
                                      script: str) -> None:
    """Each script that prints its results, its stdout a pipe whose reader has gone."""
    if script.startswith("inference.py"):
        argv = ["--checkpoint", trained / "best.pt", "--workers", "0", *script.split()[1:], good_image, good_image]
    elif script == "evaluate.py":
        argv = ["--checkpoint", trained / "best.pt", "--data", tiny_shapes, "--workers", "0", "--beam-sizes", "1",
                "--max-images", "2", "--out-dir", tmp_path]
    elif script == "make_dataset.py":
        argv = ["--shapes-train", "4", "--shapes-val", "2", "--shapes-test", "2", "--image-size", "16",
                "--workers", "0", "--raw-dir", tmp_path / "raw", "--output-dir", tmp_path / "out"]
    else:
        argv = ["--checkpoint", trained / "best.pt", "--out", tmp_path / "release.pt"]
    r = run_script(script.split()[0], *argv, closed_stdout=True)
    assert r.rc == 141 and r.err == "", str(r)  # nothing on stderr: no BrokenPipeError traceback, no error line


def test_a_closed_stdout_in_a_real_pipe(trained: Path, good_image: Path) -> None:
    """`python inference.py ... | head -1`, in a fresh interpreter: the reader has gone before the first line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(trained / "best.pt"), "--workers", "0",
                           str(good_image)], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True,
                          timeout=120, env=script_env())
    os.close(write_end)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
