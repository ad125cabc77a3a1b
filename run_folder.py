"""A training run's folder (`<out_dir>/<run>/`): claimed by one run, locked while it trains, and what the run
writes there besides its checkpoints: metrics.jsonl, curves.png and, with --tensorboard, TensorBoard's event files.

A folder that holds one of RUN_FILES holds a run: a new run never replaces those files without --overwrite. While
a run trains, `<run>/.lock` holds its pid and host, and a second train.py on the same folder is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from torch.utils.data import DataLoader

from cli import EXIT_BAD_OPTION, UserError
from files import atomic_path, atomic_write_text, check_output_kinds, process_alive, writing
from pytorch_dataset_class import Vocab
from tensorboard_log import TENSORBOARD_DIR, TensorBoardLog, val_samples

RUN_FILES = ("best.pt", "last.pt", "config.json", "metrics.jsonl")  # a folder holding one of these holds a run
PICTURES = ("curves.png",)  # a run's other output, replaced with its files


def check_run_paths(run_dir: Path, tensorboard: bool) -> None:
    """Before anything is written (the run folder's lock included): a UserError of one line when a path the run
    writes exists as the wrong kind: a folder named like one of its files, a file where the run folder or (with
    --tensorboard) the folder of its event files goes."""
    folders = [run_dir, *([run_dir / TENSORBOARD_DIR] if tensorboard else [])]
    check_output_kinds([run_dir / name for name in (*RUN_FILES, *PICTURES)], folders,
                       hint="; train.py writes the run's files there: move it away, or write the run elsewhere "
                            "(--run NAME)")


def claim_run_dir(run_dir: Path, *, resume: str = "", overwrite: bool = False, named: bool = False) -> None:
    """Refuse to write a new run into a folder that holds another run's files, unless `overwrite`; then they
    are removed, so that none of them passes for the new run's. `resume` (the checkpoint --resume names) continues
    the run in its own folder.

    The refusal never advises deleting a run the user did not name: --overwrite is offered only for a folder
    `named` with --run, and never to a resumed run (which would delete one run to continue another)."""
    if resume and Path(resume).resolve().parent == run_dir.resolve():
        return
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if not overwrite:
        files = ", ".join(found)
        if resume:
            raise UserError(f"{run_dir} already holds another run ({files}); resume {resume} in its own folder "
                            "(leave out --run and --out-dir) or in a new one (--run NAME)", EXIT_BAD_OPTION)
        last = run_dir / "last.pt"
        go_on = f"continue it with --resume {last}, or " if "last.pt" in found else ""
        replace = ", or delete its files and start over there with --overwrite" if named else ""
        raise UserError(f"{run_dir} already holds a run ({files}); {go_on}start a new one with --run NAME{replace}",
                        EXIT_BAD_OPTION)
    for name in RUN_FILES + PICTURES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)  # --tensorboard's event files
    print(f"--overwrite: removed the files of the run that was in {run_dir} ({', '.join(found)})", flush=True)


# ----------------------------------------------------------------------------------------------
# The lock


LOCK_NAME = ".lock"


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when it is gone, or not written yet."""
    try:
        pid, host = lock.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _refuse_or_clear(lock: Path, what: str, host: str) -> None:
    """Someone else's lock: a UserError while its process runs; removed when the process is gone."""
    owner = _lock_owner(lock)
    if owner is None:  # created an instant ago and not written yet, or just removed: look again
        time.sleep(0.01)
        return
    pid, owner_host = owner
    if owner_host != host or process_alive(pid):
        where = "" if owner_host == host else f" on {owner_host}"
        raise UserError(f"{lock.parent}: the {what} is in use by another process (pid {pid}{where}, lock file "
                        f"{lock}); wait for it to end, or remove {lock} if no process uses the folder")
    print(f"{Path(sys.argv[0]).name}: taking over the stale lock {lock} of pid {pid}, which is no longer running",
          file=sys.stderr, flush=True)
    if _lock_owner(lock) == owner:  # not taken over by another process meanwhile
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Own `folder` while the block runs: `folder/.lock` holds this process's pid and host.

    The lock is created with O_CREAT | O_EXCL, so of two processes only one gets it; the other gets a
    UserError naming the owner. A lock whose process is gone (killed by SIGKILL, a machine that lost power)
    is stale: it is taken over, with one line on stderr. The lock of a process on another host cannot be
    checked and counts as held. The lock is removed when the block ends, however it ends.
    """
    folder = Path(folder)
    lock = folder / LOCK_NAME
    host = socket.gethostname()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{folder}: cannot create the {what} ({err.strerror or err})") from None
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_or_clear(lock, what, host)
            continue
        except OSError as err:
            raise UserError(f"{folder}: cannot write in the {what} ({err.strerror or err})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
        break
    else:
        raise UserError(f"{lock}: an unreadable lock file; remove it if no process uses {folder}")
    try:
        yield lock
    finally:
        if _lock_owner(lock) == (os.getpid(), host):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


# ----------------------------------------------------------------------------------------------
# What a run writes: metrics.jsonl, curves.png, TensorBoard


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl, one line per epoch of `history`: rewritten whole and atomically each epoch, not appended, so
    that a full disk or a kill never leaves it truncated or empty (it is a few KB even after hundreds of epochs)."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Loss and val BLEU-4 per epoch of a training run's history as a PNG, replaced atomically."""
    import matplotlib  # here: only a training run draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss (teacher-forced)")
    if all("train_ce" in h for h in history):  # not under --scst, whose training loss is the policy's
        ax1.plot(epochs, [h["train_ce"] for h in history], "--", label="train cross-entropy")
    ax1.plot(epochs, [h["val_ce"] for h in history], "--", label="val cross-entropy")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_bleu4"] for h in history], "o-", color="C2")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val BLEU-4 (greedy)")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp, writing(path):
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def open_tensorboard(run_dir: Path, val_loader: DataLoader, val_h5: Path, references: list[list[list[str]]],
                     vocab: Vocab, *, steps_per_epoch: int, epoch: int, step: int, max_decode_len: int,
                     autocast: AbstractContextManager) -> TensorBoardLog:
    """The event files of the run in `run_dir/tensorboard/`, from `step` of `epoch` on (both counted as RunState
    counts them), with the first images of the val loader's set as the captions it shows each epoch."""
    return TensorBoardLog(run_dir / TENSORBOARD_DIR, steps_per_epoch, epoch, step,
                          val_samples(val_loader.dataset, val_h5, references), vocab, max_decode_len, autocast)
