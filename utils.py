"""Small pieces every script shares: user errors, the argument parser, devices, atomic writes.

A user mistake (a missing file, a bad option) is raised as `UserError` and printed by `run_cli`
as one line on stderr with a non-zero exit code (2 for bad options, 1 for bad input), never as a
traceback. Files are written under a temporary name in the same folder and renamed when complete,
so a killed process never leaves a half-written file under its final name.

A temporary file is a hidden dotfile `.<final name>.<pid>.<random>.tmp`. A process killed with
SIGKILL (or a machine that lost power) leaves it behind; `remove_stale_temps(folder)` deletes those
whose process is gone, and the scripts call it on the folders they write before they start.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import re
import sys
import tempfile
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


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(): UserError -> one line on stderr and its exit code."""
    prog = Path(sys.argv[0]).name
    try:
        main()
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(err.code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def _number(cast: Callable[[str], float], kind: str, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: `cast` the text, then check it; errors say what was expected."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value
    return parse


positive_int = _number(int, "an integer", lambda v: v >= 1, ">= 1")
nonnegative_int = _number(int, "an integer", lambda v: v >= 0, ">= 0")
nonnegative_float = _number(float, "a number", lambda v: v >= 0, ">= 0")
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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (use --device cpu or auto)",
                        EXIT_BAD_OPTION)
    if name == "mps" and not has_mps:
        raise UserError("--device mps: no MPS device is available here (use --device cpu or auto)",
                        EXIT_BAD_OPTION)
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps", EXIT_BAD_OPTION)
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
