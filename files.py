"""Files a script writes: atomic writes, leftovers of killed writers, and output paths checked up front.

Files are written under a temporary name in the same folder and renamed when complete, so a killed
process never leaves a half-written file under its final name. A temporary file is a hidden dotfile
`.<final name>.<pid>.<random>.tmp`. A process killed with SIGKILL (or a machine that lost power)
leaves it behind; `remove_stale_temps(folder)` deletes those whose process is gone, and the scripts
call it on the folders they write before they start.

A full disk (or quota, or a file-size limit) while writing is a UserError of one line, "no space left on
device while writing PATH"; the temporary file is removed and the file that was there before stays as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cli import EXIT_BAD_INPUT, EXIT_BAD_OPTION, NO_ROOM, UserError, no_room


def no_room_error(err: OSError, path: str | os.PathLike) -> UserError:
    """The one line for a write of `path` that found no room (exit 1)."""
    return UserError(f"{NO_ROOM[err.errno]} while writing {path}")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Around the code that writes `path` (or its temporary file): a write that finds no room becomes one
    UserError line naming `path`. Keep it narrow: an OSError raised inside is taken to concern `path`."""
    try:
        yield
    except OSError as err:
        if no_room(err):
            raise no_room_error(err, path) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the same folder so the final `os.replace` is atomic; it is removed however the
    block ends. No room for the temporary file, its fsync or the rename is one UserError line naming `path`;
    the block's own writes say so with `writing(path)` (atomic_write_texts) or atomic_file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets remove_stale_temps tell a dead writer's leftovers from a live one's file.
    with writing(path):  # a folder with no room for another entry
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file 0600; give the final file the usual permissions (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        with writing(path):
            fsync(tmp_path, strict=True)  # the bytes are on disk before the name points at them (power loss too)
            os.replace(tmp_path, path)
        fsync(path.parent)  # and so is the rename
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class GuardedFile(io.FileIO):
    """A file opened for writing whose failed writes are remembered in `error`, not raised.

    For writers that hide or mishandle an OSError: HDF5 crashes the process (a segfault) when it closes a file
    whose write failed, and torch.save turns it into a RuntimeError without the errno. Every write after the
    first failure is skipped, so the writer finishes (and closes) cleanly; `check()` raises the remembered error,
    and atomic_file calls it. Call it in a long loop too, to stop at the first failure rather than at the end.
    """

    def __init__(self, path: str | os.PathLike, final: str | os.PathLike) -> None:
        super().__init__(path, "w+b")
        self.final = Path(final)
        self.error: OSError | None = None

    def write(self, data) -> int:  # type: ignore[override]
        if self.error is None:
            try:
                return super().write(data)
            except OSError as err:
                self.error = err
        return len(memoryview(data))

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as err:
                self.error = err
        return self.tell() if size is None else size

    def check(self) -> None:
        """Raise the first failed write: one line when it found no room, else the OSError itself."""
        if self.error is not None:
            if no_room(self.error):
                raise no_room_error(self.error, self.final) from None
            raise self.error


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[GuardedFile]:
    """atomic_path, as an open GuardedFile (binary, read and write) rather than a path: for torch.save and
    h5py.File, which are handed the file object. Renamed onto `path` only when no write failed."""
    with atomic_path(path) as tmp, GuardedFile(tmp, path) as f:
        try:
            yield f
        except UserError:
            raise  # already one line (another file's full disk): a later failed write of this one would hide it
        except Exception:
            f.check()  # the failed write explains the writer's error (torch's RuntimeError, h5py's)
            raise
        f.check()


def fsync(path: Path, strict: bool = False) -> None:
    """Flush `path` to disk. strict: a file's fsync that finds no room raises (a network file system may only
    say so here); otherwise errors pass (some file systems cannot fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a folder on Windows: nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if strict and no_room(err):
            raise
    finally:
        os.close(fd)


TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def process_alive(pid: int) -> bool:
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
        m = TEMP_NAME.match(p.name)
        if m and p.is_file() and not process_alive(int(m["pid"])):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:  # another process cleaned it up first
                pass
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    atomic_write_texts({path: text})


def atomic_write_texts(texts: dict[str | os.PathLike, str]) -> None:
    """Write several text files (path -> text) atomically and together: all of them are written under temporary
    names first, and renamed only when every one is complete; a failure (a full disk) leaves all as they were."""
    with contextlib.ExitStack() as stack:
        for path, text in texts.items():
            tmp = stack.enter_context(atomic_path(path))
            with writing(path):
                tmp.write_text(text)


def require_dir(path: str | os.PathLike, what: str, option: str) -> Path:
    """Return `path` as a Path, or raise a UserError naming the option when it is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{option} {path}: {what} folder not found")
    return path


def nearest_existing(folder: Path) -> Path:
    """`folder`, or the nearest folder above it that exists: where the folders still to create (atomic_path creates
    them) go."""
    while not folder.exists():
        folder = folder.parent
    return folder


def wrong_kind(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why `path` cannot be written as a file (or, `folder`, as a folder) because something of the other kind is in
    the way: a folder where the file goes, a file where the folder goes, or a file where a folder above it goes.
    None when nothing is in the way; creates nothing."""
    path = Path(path)
    try:
        if folder and path.exists() and not path.is_dir():
            return "a file, not a folder"
        if not folder and path.is_dir():
            return "a folder, not a file"
        above = nearest_existing(path.absolute().parent)
    except OSError as err:  # a folder above it that this user may not read
        return f"cannot write there ({err.strerror or err})"
    return None if above.is_dir() else f"cannot write there ({above} is a file, not a folder)"


def check_output_kinds(files: Iterable[str | os.PathLike] = (), folders: Iterable[str | os.PathLike] = (), *,
                       label: str = "", hint: str = "", code: int = EXIT_BAD_INPUT) -> None:
    """Before anything is written, and creating nothing: a UserError of one line, `label PATH: why` then `hint`,
    for the first path that a script will write as a file (`files`) or as a folder (`folders`) and that exists as
    the wrong kind (wrong_kind). Every script checks the paths it writes with it (or check_output_file) before its
    work, so that a folder named like an output never fails the write at the end, or half-way through a run."""
    for path, folder in [*((p, False) for p in files), *((p, True) for p in folders)]:
        why = wrong_kind(path, folder)
        if why:
            raise UserError(f"{label}{path}: {why}{hint}", code)


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
    folder = nearest_existing(out.parent.absolute())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: cannot write there")


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

