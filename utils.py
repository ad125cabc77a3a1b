"""Small pieces every script shares: user errors, the argument parser, devices, atomic writes.

A user mistake (a missing file, a bad option) is raised as `UserError` and printed by `run_cli`
as one line on stderr with a non-zero exit code (2 for bad options, 1 for bad input), never as a
traceback. Files are written under a temporary name in the same folder and renamed when complete,
so a killed process never leaves a half-written file under its final name.

A temporary file is a hidden dotfile `.<final name>.<pid>.<random>.tmp`. A process killed with
SIGKILL (or a machine that lost power) leaves it behind; `remove_stale_temps(folder)` deletes those
whose process is gone, and the scripts call it on the folders they write before they start. A folder
that one process owns (a training run's) holds `.lock` with that process's pid (`folder_lock`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXIT_BAD_INPUT = 1
EXIT_BAD_OPTION = 2


class UserError(Exception):
    """A mistake the user can fix. `run_cli` prints it as one line and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with defaults in every help text and one-line errors (exit code 2)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints the whole usage block first; one line is easier to read in a log.
        self.exit(EXIT_BAD_OPTION, f"{self.prog}: error: {message} (see --help)\n")


def field_help(cls: type) -> dict[str, str]:
    """The comment after each field of the dataclass `cls`, read from its source: the options' help."""
    src = inspect.getsource(cls)
    return dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.+)$", src, flags=re.MULTILINE))


def _optional(base: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        return None if text.lower() in ("none", "all") else base(text)
    parse.__name__ = base.__name__  # argparse names the type in its "invalid value" message
    return parse


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, *, show_defaults: bool = True,
                          choices: dict[str, tuple] | None = None, types_: dict[str, Callable] | None = None,
                          skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass `cls` (`batch_size` -> `--batch-size`, a bool ->
    `--x/--no-x`, `int | None` accepts `none`), with the field's comment as its help. With
    show_defaults=False no option has a default, so parsing returns only the options given."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw: dict = {"help": helps.get(f.name, "")}
        kw["default"] = f.default if show_defaults else argparse.SUPPRESS
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if types_ and f.name in types_:
            kw["type"] = types_[f.name]
        elif isinstance(hint, types.UnionType):  # `int | None`
            kw["type"] = _optional(next(a for a in typing.get_args(hint) if a is not type(None)))
        else:
            kw["type"] = hint
        if choices and f.name in choices:
            kw["choices"] = choices[f.name]
        parser.add_argument(flag, **kw)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}


def _is_a(value: object, kind: type) -> bool:
    """isinstance as a config file means it: bool is no integer, and an integer is a number."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def field_type_problem(cls: type, values: dict) -> str | None:
    """`name must be <type>, got <value>` for the first of `values` (field name -> value) whose type is not the
    one its field of the dataclass `cls` declares (int, float, bool, str, X | None); None when all are. Values
    read from a file (a checkpoint's configs) are checked so before anything compares or computes with them."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None:
            continue
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not any(_is_a(value, k) for k in kinds):
            words = " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kinds)
            return f"{name} must be {words}, got {short_repr(value)}"
    return None


def cut(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters: an error line stays one readable line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters: an error line quotes a value from a file, which may be huge."""
    return cut(repr(value), limit)


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(): UserError -> one line on stderr and its exit code."""
    prog = Path(sys.argv[0]).name
    try:
        main()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(err.code)
    except KeyboardInterrupt as err:  # Terminated too: a second SIGTERM during training
        terminated = isinstance(err, Terminated)
        print(f"{prog}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if terminated else signal.SIGINT))


def _number(cast: Callable[[str], float], kind: str, ok: Callable[[float], bool],
            rule: str | Callable[[float], str]) -> Callable[[str], float]:
    """An argparse type: `cast` the text, then check it; errors say what was expected (`rule`, or what
    rule(value) says)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule(value) if callable(rule) else rule}, got {value}")
        return value
    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`; an error names the bound it crossed."""
    return _number(int, "an integer", lambda v: low <= v <= high, lambda v: f">= {low}" if v < low else f"<= {high}")


MAX_WORKERS = 32  # DataLoader processes: each holds a copy of the dataset's state; 1000 exhausted 24 GiB
MAX_THREADS = 1024  # torch threads: more than any machine's cores; 10**9 would fail to start them
positive_int = _number(int, "an integer", lambda v: v >= 1, ">= 1")
nonnegative_int = _number(int, "an integer", lambda v: v >= 0, ">= 0")
workers_int = int_in(0, MAX_WORKERS)
threads_int = int_in(1, MAX_THREADS)
nonnegative_float = _number(float, "a number", lambda v: 0 <= v < float("inf"), "a finite number >= 0")
fraction_type = _number(float, "a number", lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu. Asking for a device that is absent is a UserError."""
    import torch  # here, not at the top: a script's option errors should not wait for torch to load

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    cuda = re.fullmatch(r"cuda(?::(\d{1,6}))?", name)
    if name not in ("cpu", "mps") and not cuda:
        raise UserError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps", EXIT_BAD_OPTION)
    if cuda and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (use --device cpu or auto)",
                        EXIT_BAD_OPTION)
    if cuda and cuda[1] is not None and int(cuda[1]) >= torch.cuda.device_count():
        # torch would accept the name and fail at the first tensor moved there, with a traceback
        n = torch.cuda.device_count()
        raise UserError(f"--device {name}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                        f"(cuda:0 to cuda:{n - 1})", EXIT_BAD_OPTION)
    if name == "mps" and not has_mps:
        raise UserError("--device mps: no MPS device is available here (use --device cpu or auto)",
                        EXIT_BAD_OPTION)
    return torch.device(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the same folder so the final `os.replace` is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets remove_stale_temps tell a dead writer's leftovers from a live one's file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file 0600; give the final file the usual permissions (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        _fsync(tmp_path)  # the bytes are on disk before the name points at them (power loss, not only kill -9)
        os.replace(tmp_path, path)
        _fsync(path.parent)  # and so is the rename
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a folder on Windows: nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on folders
        pass
    finally:
        os.close(fd)


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_path` left in `folder` when its process was killed.

    Only files named `.<name>.<pid>.<random>.tmp` whose pid is no longer running are removed, so a
    run writing into the same folder at the same time keeps its files. (A pid is only meaningful on
    this machine: a folder shared over the network with a writer elsewhere keeps its temp files.)
    Returns the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_NAME.match(p.name)
        if m and p.is_file() and not _process_alive(int(m["pid"])):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:  # another process cleaned it up first
                pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def require_dir(path: str | os.PathLike, what: str, option: str) -> Path:
    """Return `path` as a Path, or raise a UserError naming the option when it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{option} {path}: {what} folder not found")
    return path


def check_output_file(out: str | os.PathLike | None, option: str,
                      inputs: dict[str, str | os.PathLike | None] | None = None) -> None:
    """Before the work, not after it, and creating nothing: a UserError when the output file `out` (None: not
    given) is one of `inputs` (option -> path; None: not given), which writing it would destroy (exit 2), is a
    folder (exit 2), or lies where nothing can be written (exit 1)."""
    if out is None:
        return
    out = Path(out)
    for name, path in (inputs or {}).items():
        if path is not None and (out.resolve() == Path(path).resolve()
                                 or (out.exists() and Path(path).exists() and os.path.samefile(out, path))):
            raise UserError(f"{option} {out} is the {name} file: writing there would destroy that input; choose "
                            "another path", EXIT_BAD_OPTION)
    if out.is_dir():
        raise UserError(f"{option} {out}: a folder, not a file", EXIT_BAD_OPTION)
    folder = out.parent.absolute()
    while not folder.exists():  # the folders still to create (atomic_path creates them) go in the nearest one
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: cannot write there")


# ----------------------------------------------------------------------------------------------
# Training runs: seeds and RNG states, Ctrl-C, the curves picture


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG that training draws from, as plain tensors and numbers (weights_only-loadable)."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    cuda = list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    """The inverse of rng_state()."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


def rng_state_problem(state: object) -> str | None:
    """What keeps set_rng_state(state) from working (a checkpoint's saved RNGs), or None. It is tried on
    this process's CPU RNGs, which are put back; CUDA's states need only be a list of byte tensors."""
    import torch

    if not isinstance(state, dict) or not state:
        return f"not a dict of RNG states but {short_repr(state)}"
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                                for t in cuda)):
        return "its cuda states are not a list of byte tensors"
    saved = {**rng_state(), "cuda": None}
    try:
        set_rng_state({**state, "cuda": None})
    except Exception as err:  # whatever torch, numpy or random raise about a malformed state
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'malformed'}"
    finally:
        set_rng_state(saved)
    return None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill, a job scheduler's time limit, docker stop


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C in a terminal, and SIGTERM from a scheduler or systemd, reach every
    process of the group; a worker that died of one would make the main process fail instead of saving and
    stopping cleanly. So a worker ignores SIGINT, and SIGTERM unless the main process sent it: the main process
    ends its workers through the loader's queues, but at exit multiprocessing ends leftover ones with SIGTERM
    and then waits for them, which a worker ignoring every SIGTERM would turn into a hang."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: SIGTERM keeps its default, a group SIGTERM ends the workers
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the block

    def watch() -> None:  # sigwaitinfo says who sent the signal, which a handler cannot
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class Terminated(KeyboardInterrupt):
    """A second SIGTERM during training: quit at once, like a second Ctrl-C (run_cli exits with 143)."""


class StopFlag:
    """The first SIGINT or SIGTERM asks the training loop to stop after the current step (it then saves
    last.pt); a second one of either kind raises KeyboardInterrupt (Terminated for SIGTERM) at once.
    `signum` is the first signal's number. Only installed in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signum = signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\ntrain.py: {what}: stopping after this step and saving last.pt (Ctrl-C or SIGTERM again quits "
              "without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)


# ----------------------------------------------------------------------------------------------
# A folder owned by one process: the run folder of a training run


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
    if owner_host != host or _process_alive(pid):
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


def writable_dir(path: str | os.PathLike, option: str, hint: str = "") -> Path:
    """Create the folder `path` if needed; a UserError naming `option` when it cannot be written (a file is
    there, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        what = "a file, not a folder" if path.is_file() else "cannot write there"
        raise UserError(f"{option} {path}: {what}{f' ({hint})' if hint else ''}")
    return path


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Loss and val BLEU-4 per epoch of a training run's history as a PNG, replaced atomically."""
    import matplotlib

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def make_autocast(device: torch.device, amp: str) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler]:
    """(autocast context, GradScaler) for `--amp`; only CUDA uses mixed precision, fp16 needs the scaler."""
    import torch

    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext(), torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU has no bfloat16 support (use --amp fp16 or off)", EXIT_BAD_OPTION)
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)


# ----------------------------------------------------------------------------------------------
# torchrun: one process per device, all stepping together


def distributed() -> bool:
    """True inside a process group (train.py under torchrun)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). torchrun sets RANK; without it this is a single process."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    device = pick_device(device_name)
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"--device {device_name}: torchrun runs on cuda (nccl) or cpu (gloo)", EXIT_BAD_OPTION)
    # Rank 0 validates and builds feature caches while the others wait: allow that to take long.
    dist.init_process_group(backend, timeout=timedelta(hours=3))
    return dist.get_rank(), dist.get_world_size(), device


class RankSync:
    """Under torchrun all ranks must stop at the same step: once per step, before the backward pass, one
    all_reduce tells every rank whether any has a NaN/inf loss and whether any was asked to stop."""

    def __init__(self, stop: StopFlag, device: torch.device) -> None:
        self.flag, self.device, self.stop = stop, device, False

    def any_bad(self, bad: bool) -> bool:
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(bad), float(self.flag.requested)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.stop = bool(t[1])
        return bool(t[0])


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums of `values` over all ranks (the values themselves in a single process)."""
    if not distributed():
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
