"""run_folder.py: the run folder's lock (held, refused, taken over when stale, removed) and a new run's claim on
the folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import run_folder
from cli import UserError
from run_folder import claim_run_dir
from tensorboard_log import TENSORBOARD_DIR


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
# TensorBoard


def test_overwrite_removes_the_old_runs_event_files(tmp_path: Path) -> None:
    """A new run never shows another run's curves."""
    run_dir = tmp_path / "r"
    (run_dir / TENSORBOARD_DIR).mkdir(parents=True)
    (run_dir / TENSORBOARD_DIR / "events.out.tfevents.1.host.1.0").write_bytes(b"old")
    (run_dir / "config.json").write_text("{}")
    claim_run_dir(run_dir, overwrite=True)
    assert list(run_dir.iterdir()) == []
