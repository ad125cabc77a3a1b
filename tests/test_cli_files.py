"""cli.py, files.py and the run helpers of run_folder.py and runtime.py: the run folder's lock, the stop signals,
devices, option types, output paths, field types and saved RNG states."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import files
import pytorch_dataset_class
import run_folder
import runtime
from cli import UserError
from train import TrainConfig


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------
# The folder lock


def test_lock_holds_the_pid_refuses_a_second_owner_and_goes_away(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with run_folder.folder_lock(folder, "run folder") as lock:
        assert lock == folder / ".lock"
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
        # this process is alive: a second owner is refused, naming the pid and the lock file
        with pytest.raises(UserError, match=rf"run folder is in use by another process \(pid {os.getpid()}, "
                                            rf"lock file {lock}\)"):
            with run_folder.folder_lock(folder, "run folder"):
                pass
        assert lock.read_text().split()[0] == str(os.getpid())  # the refused one left the owner's lock alone
    assert not lock.exists()


def test_lock_is_removed_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with run_folder.folder_lock(tmp_path):
            raise RuntimeError("training failed")
    assert not (tmp_path / ".lock").exists()


def test_stale_lock_is_taken_over_with_one_line(tmp_path: Path, capsys) -> None:
    pid = dead_pid()
    (tmp_path / ".lock").write_text(f"{pid} {socket.gethostname()}\n")
    with run_folder.folder_lock(tmp_path) as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"taking over the stale lock {lock} of pid {pid}, which is no longer running" in err[0]
    assert not lock.exists()


def test_lock_of_another_host_counts_as_held(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text(f"{dead_pid()} some-other-machine\n")
    with pytest.raises(UserError, match="on some-other-machine"):
        with run_folder.folder_lock(tmp_path):
            pass
    assert (tmp_path / ".lock").read_text().endswith("some-other-machine\n")


def test_unreadable_lock_is_refused_not_taken(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("garbage\n")
    with pytest.raises(UserError, match="an unreadable lock file; remove it"):
        with run_folder.folder_lock(tmp_path):
            pass
    assert (tmp_path / ".lock").read_text() == "garbage\n"


def test_lock_in_a_folder_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="cannot create the run folder"):
        with run_folder.folder_lock(tmp_path / "a_file" / "run", "run folder"):
            pass


# ----------------------------------------------------------------------------------------------
# Stop signals


@pytest.mark.parametrize("first, second, raised", [
    (signal.SIGTERM, signal.SIGTERM, cli.Terminated),
    (signal.SIGINT, signal.SIGTERM, cli.Terminated),
    (signal.SIGTERM, signal.SIGINT, KeyboardInterrupt),
])
def test_stop_flag_first_signal_asks_second_quits(first, second, raised, capsys) -> None:
    before = {s: signal.getsignal(s) for s in runtime.STOP_SIGNALS}
    with runtime.StopFlag() as stop:
        assert not stop.requested
        signal.raise_signal(first)
        assert stop.requested and stop.signum == first
        assert "stopping after this step and saving last.pt" in capsys.readouterr().err
        with pytest.raises(raised):
            signal.raise_signal(second)
    assert {s: signal.getsignal(s) for s in runtime.STOP_SIGNALS} == before


def _worker(ready) -> None:
    pytorch_dataset_class.ignore_stop_signals(0)
    ready.send(True)
    time.sleep(60)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="needs sigwaitinfo (Linux)")
def test_workers_ignore_stop_signals_of_others_but_not_their_parents() -> None:
    """A DataLoader worker survives SIGINT and SIGTERM sent to the whole group (by a terminal or a scheduler:
    the main process saves and ends it), yet ends on the SIGTERM of its own main process, which multiprocessing
    sends at exit and then waits for: ignoring that one would hang the exit."""
    ctx = multiprocessing.get_context("fork")
    ready, child_end = ctx.Pipe()
    worker = ctx.Process(target=_worker, args=(child_end,), daemon=True)
    worker.start()
    try:
        assert ready.poll(10) and ready.recv()
        for name in ("INT", "TERM"):  # sent by another process, as a shell's kill or a scheduler does
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
            worker.join(1.0)
            assert worker.is_alive(), f"the worker died of another process's SIG{name}"
        worker.terminate()  # SIGTERM from the parent
        worker.join(10)
        assert not worker.is_alive() and worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


@pytest.mark.parametrize("exc, code, word", [(KeyboardInterrupt, 130, "interrupted"),
                                             (cli.Terminated, 143, "terminated")])
def test_run_cli_exit_status_of_a_quitting_signal(exc, code, word, capsys) -> None:
    def main() -> None:
        raise exc

    with pytest.raises(SystemExit) as ended:
        cli.run_cli(main)
    assert ended.value.code == code and capsys.readouterr().err.strip().endswith(f": {word}")


# ----------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize("name, message", [
    ("cuda:x", "expected auto, cpu, cuda, cuda:N or mps"),
    ("cuda:-1", "expected auto, cpu, cuda, cuda:N or mps"),
    ("cuda:2", "this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
    ("cuda:1000000000000", "expected auto"),
    ("tpu", "expected auto"),
])
def test_a_cuda_device_that_is_not_there_is_exit_2(monkeypatch, name: str, message: str) -> None:
    """With two GPUs (pretended), cuda:2 and malformed names are refused in one line; torch alone would accept
    cuda:2 and fail at the first tensor moved there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=f"--device {name}: .*{message}".replace("(", r"\(").replace(")", r"\)")) \
            as err:
        cli.pick_device(name)
    assert err.value.code == 2
    assert cli.pick_device("cuda:1") == torch.device("cuda:1")


# ----------------------------------------------------------------------------------------------
# Option types, output paths


@pytest.mark.parametrize("text, message", [("33", "must be <= 32, got 33"), ("-1", "must be >= 0, got -1"),
                                           ("1e3", "'1e3' is not an integer"), ("4" * 25, "must be <= 32")])
def test_int_in_refuses_what_is_out_of_range(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        cli.workers_int(text)
    assert cli.workers_int("32") == 32 and cli.threads_int("1024") == 1024


def test_writable_dir_says_a_file_is_no_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"--out-dir {blocker}: a file, not a folder"):
        files.writable_dir(blocker, "--out-dir")
    with pytest.raises(UserError, match=f"--out-dir {blocker / 'sub'}: cannot write there"):
        files.writable_dir(blocker / "sub", "--out-dir")
    assert blocker.read_text() == "x"
    assert files.writable_dir(tmp_path / "new" / "dir", "--out-dir").is_dir()


def test_an_output_that_is_an_input_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(ckpt)
    for out in (ckpt, tmp_path / "link.pt", tmp_path / "." / "best.pt"):
        with pytest.raises(UserError, match=f"--out {out} is the --checkpoint file") as err:
            files.check_output_file(out, "--out", {"--checkpoint": ckpt, "--scores": None})
        assert err.value.code == 2
    files.check_output_file(tmp_path / "release.pt", "--out", {"--checkpoint": ckpt})
    with pytest.raises(UserError, match=f"--out {tmp_path}: a folder, not a file"):
        files.check_output_file(tmp_path, "--out")
    with pytest.raises(UserError, match=f"--out {ckpt / 'x' / 'y.pt'}: cannot write there"):
        files.check_output_file(ckpt / "x" / "y.pt", "--out")
    files.check_output_file(tmp_path / "new" / "dir" / "release.pt", "--out")
    assert not (tmp_path / "new").exists()  # nothing created
    assert ckpt.read_bytes() == b"weights"


# ----------------------------------------------------------------------------------------------
# Precision


def test_amp_help_says_what_pick_amp_does(monkeypatch) -> None:
    """--amp's help is derived from the policy pick_amp follows, for each purpose: bf16 on a CPU with native bf16
    where pick_amp picks it, and only there."""
    monkeypatch.setattr(cli, "cpu_native_bf16", lambda: "AMX")
    for purpose in cli.AMP_PURPOSES:
        bf16 = cli.pick_amp(torch.device("cpu"), "auto", purpose)[0] is torch.bfloat16
        assert ("native bf16" in cli.amp_help(purpose)) == bf16
    assert cli.AMP_HELP == cli.amp_help("train")  # bench.py's --amp: the training step


def test_a_computed_help_replaces_the_field_comment() -> None:
    from decoding import DecodeConfig

    helps = cli.field_help(DecodeConfig)
    assert helps["amp"] == cli.amp_help("decode") and helps["beam_size"].startswith("beam size")


# ----------------------------------------------------------------------------------------------
# Values read from files


@pytest.mark.parametrize("values, problem", [
    ({"epochs": 3.0}, "epochs must be an integer, got 3.0"),
    ({"epochs": True}, "epochs must be an integer, got True"),
    ({"dropout": "0.5"}, "dropout must be a number, got '0.5'"),
    ({"compile": 1}, "compile must be true or false, got 1"),
    ({"run": None}, "run must be a string, got None"),
    ({"val_max_images": "all"}, "val_max_images must be an integer or none, got 'all'"),
    ({"seed": list(range(100))}, "seed must be an integer, got [0, 1, 2,"),
])
def test_field_type_problem(values: dict, problem: str) -> None:
    assert cli.field_type_problem(TrainConfig, values).startswith(problem)


def test_field_type_problem_accepts_the_declared_types() -> None:
    assert cli.field_type_problem(TrainConfig, {"epochs": 3, "dropout": 1, "compile": False, "val_max_images": None,
                                                  "unknown_key": object()}) is None


def test_rng_state_problem_tries_a_state_and_leaves_the_rngs_alone() -> None:
    good = runtime.rng_state()
    assert runtime.rng_state_problem(good) is None
    for bad in ({}, [], {**good, "torch": "x"}, {**good, "numpy": {}}, {**good, "python": None},
                {**good, "cuda": ["x"]}):
        torch.manual_seed(7)
        random.seed(7)
        expected = torch.rand(1).item(), random.random()
        torch.manual_seed(7)
        random.seed(7)
        assert runtime.rng_state_problem(bad)
        assert (torch.rand(1).item(), random.random()) == expected, bad
