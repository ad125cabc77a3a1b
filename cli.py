"""What every script's command line shares: user errors, the parser, argument types, the device.

A user mistake (a missing file, a bad option) is raised as `UserError` and printed by `run_cli` as one
line on stderr with a non-zero exit code (2 for bad options, 1 for bad input), never as a traceback. So is a
full disk (exit 1). A closed stdout (`inference.py ... | head -1`) ends the script quietly, as it ends cat or
grep: nothing on stderr, exit status 141 (128 + SIGPIPE, what a shell reports for them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import inspect
import os
import re
import select
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXIT_BAD_INPUT = 1
EXIT_BAD_OPTION = 2
EXIT_CLOSED_PIPE = 128 + 13  # 128 + SIGPIPE: the status a shell reports for `cat` whose reader went away

# The errors of a write that found no room, as the one line says them.
NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large (size limit)"}


def no_room(err: BaseException | None) -> bool:
    """Whether `err` is a write that found no room: a full disk, a quota, a file-size limit."""
    return isinstance(err, OSError) and err.errno in NO_ROOM


class UserError(Exception):
    """A mistake the user can fix. `run_cli` prints it as one line and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with defaults in every help text and one-line errors (exit code 2). An option given twice is refused
    (argparse would keep the last value without a word), unless its action collects (append, count, extend); `--`
    ends the options in an intermixed parse too (argparse's own drops the positionals after it)."""

    # actions whose every occurrence counts (giving them twice is what they mean), and those that exit at once
    _REPEATABLE = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction, argparse._HelpAction,
                   argparse._VersionAction)

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def _keep_typed(self, args) -> None:
        self.typed = [str(a) for a in (sys.argv[1:] if args is None else args)]  # what was typed, for error()
        if repeated := self._repeated_option():
            self.error(repeated)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if not getattr(self, "_intermixed", False):
            self._keep_typed(args)
        elif self._after_dashes is not None and all(a.nargs != argparse.SUPPRESS
                                                    for a in self._get_positional_actions()):
            # the intermixed parse's second pass (the positionals are active again): those typed after `--` join them
            args = [*args, "--", *self._after_dashes]
        return super().parse_known_args(args, namespace)

    def parse_known_intermixed_args(self, args=None, namespace=None):  # type: ignore[override]
        self._keep_typed(args)
        typed = self.typed
        # argparse's first pass would swallow `--` and let the second take `-x.jpg` after it for an option: the
        # words after `--` are kept out of the first pass and given to the second as positionals
        cut_at = typed.index("--") if "--" in typed else None
        self._after_dashes = None if cut_at is None else typed[cut_at + 1:]
        self._intermixed = True
        try:
            return super().parse_known_intermixed_args(typed[:cut_at], namespace)
        finally:
            self._intermixed, self._after_dashes = False, None

    def _option_of(self, arg: str) -> tuple[argparse.Action, str] | None:
        """The option `arg` gives (`--name`, `--name=value`, an unambiguous abbreviation, `-xVALUE`) and its full
        spelling, or None."""
        if not arg.startswith("-") or arg == "-" or self._negative_number_matcher.match(arg):
            return None
        known = self._option_string_actions
        name = arg.split("=", 1)[0]
        if name in known:
            return known[name], name
        if arg.startswith("--"):
            hits = {known[k]: k for k in known if k.startswith(name)} if self.allow_abbrev else {}
            return next(iter(hits.items())) if len(hits) == 1 else None
        return (known[arg[:2]], arg[:2]) if arg[:2] in known else None  # a short option with its value attached

    def _repeated_option(self) -> str | None:
        """What to say of the first option typed twice (before `--`) whose action keeps only one value; None if none."""
        seen: dict[argparse.Action, str] = {}
        for arg in self.typed:
            if arg == "--":
                break
            option = self._option_of(arg)
            if option is None or isinstance(option[0], self._REPEATABLE):
                continue
            action, name = option
            if action not in seen:
                seen[action] = name
                continue
            first = seen[action]
            spelled = f" (as {first} and {name})" if name != first else ""
            several = f", with all its values after it ({first} A B)" if action.nargs in ("+", "*") else ""
            return f"{first} is given twice{spelled}: give it once{several}"
        return None

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints the whole usage block first; one line is easier to read in a log.
        dashed = self._unknown_option()
        if dashed and message.startswith(("the following arguments are required", "unrecognized arguments")):
            # argparse took it for an option and complains about something else ("required: images")
            message = (f"{dashed}: no such option; a file name that starts with '-' goes after '--' "
                       f"(... -- {dashed}) or as ./{dashed}")
        self.exit(EXIT_BAD_OPTION, f"{self.prog}: error: {message} (see --help)\n")

    def _unknown_option(self) -> str | None:
        """The first argument before '--' that looks like an option but is none of this parser's."""
        for arg in getattr(self, "typed", []):
            if arg == "--":
                return None
            if not arg.startswith("-") or arg == "-" or self._negative_number_matcher.match(arg):
                continue
            name = arg.split("=", 1)[0]
            known = self._option_string_actions
            if name not in known and not (self.allow_abbrev and name.startswith("--")
                                          and any(k.startswith(name) for k in known)):
                return printable(arg)
        return None


def field_help(cls: type) -> dict[str, str]:
    """The comment after each field of the dataclass `cls`, read from its source: the options' help; a field whose
    help is computed (`field(metadata={"help": ...})`) has that instead."""
    src = inspect.getsource(cls)
    helps = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.+)$", src, flags=re.MULTILINE))
    return {**helps, **{f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}}


def _optional(base: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        return None if text.lower() in ("none", "all") else base(text)
    parse.__name__ = base.__name__  # argparse names the type in its "invalid value" message
    return parse


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, *, show_defaults: bool = True,
                          choices: dict[str, tuple] | None = None, types_: dict[str, Callable] | None = None,
                          skip: tuple[str, ...] = (), aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    """One option per field of the dataclass `cls` (`batch_size` -> `--batch-size`, a bool ->
    `--x/--no-x`, `int | None` accepts `none`), with the field's comment as its help; `aliases` gives a field
    more spellings. With show_defaults=False no option has a default, so parsing returns only the options given."""
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
        parser.add_argument(flag, *(aliases or {}).get(f.name, ()), **kw)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM where a script cannot stop cleanly after a step (a second one during training, one while a run is
    prepared): quit at once, like Ctrl-C, unwinding so that temporary files are removed (run_cli exits with 143
    and prints the message, or "terminated")."""


@contextlib.contextmanager
def sigterm_unwinds(message: str) -> Iterator[None]:
    """While the block runs, SIGTERM raises Terminated(message) in the main thread instead of killing the process
    where it stands: `finally` blocks run, so atomic writes remove their temporary files and locks are released."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != pid:  # a forked child that kept this handler: end as SIGTERM would have ended it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated(message)

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def printable(text: str) -> str:
    """`text` as one printable line: control characters (a newline in a file name) escaped, and lone surrogates
    (a file name that is not valid UTF-8, from os.listdir or argv) shown as \\udcff, safe on any UTF-8 stream."""
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR), as opposed to another broken pipe."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor: assume stdout
        return True


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(): UserError -> one line on stderr and its exit code; a full disk -> one line (exit 1); a
    closed stdout -> quiet, exit 141."""
    prog = Path(sys.argv[0]).name
    try:
        main()
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not in the interpreter's exit
    except UserError as err:
        print(f"{prog}: error: {printable(str(err))}", file=sys.stderr)  # one line, whatever a file name holds
        sys.exit(err.code)
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # Python's recommended way (the signal module's "Note on SIGPIPE"): point stdout at devnull, so that the
        # interpreter's last flush does not fail again, and end quietly, as cat and grep do.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_CLOSED_PIPE)
    except OSError as err:
        if not no_room(err):
            raise
        # what files.atomic_path and its helpers did not catch (they name the file they were writing)
        where = f" while writing {err.filename}" if err.filename else ""
        print(f"{prog}: error: {NO_ROOM[err.errno]}{where}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt as err:  # Terminated too: a second SIGTERM during training
        terminated = isinstance(err, Terminated)
        print(f"{prog}: {err if str(err) else 'terminated' if terminated else 'interrupted'}", file=sys.stderr)
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


# ----------------------------------------------------------------------------------------------
# Precision: --amp, in every script that computes


AMP_CHOICES = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class AutoAmp:
    """What `--amp auto` computes in for one purpose: bf16 where it was measured faster, float32 elsewhere (fp16
    instead of bf16 on a GPU without bf16; float32 on mps)."""

    work: str  # the work, as --help names it
    cuda: bool  # bf16 on CUDA
    cpu: bool  # bf16 on a CPU with native bf16 (AMX, AVX512-BF16, Arm's BF16 instructions)
    why: str  # why float32 where bf16 is not used


# The precision policy, the one place it is written: measured with bench.py --only precision and train.py epochs on
# an AMX CPU and a GPU (docs/performance.md, "Precision").
AUTO_AMP = {
    # real Flickr8k batches trained 9-12% slower under bf16 autocast than in float32 on the CPU, even with AMX
    "train": AutoAmp("the training step", cuda=True, cpu=False, why="bf16 trained slower"),
    # EfficientNet-Lite0: 1.6-1.9x faster under bf16 on a CPU with native bf16, 0.44x on a GPU
    "encode": AutoAmp("the feature cache's encoder", cuda=False, cpu=True,
                      why="the CNN ran slower under bf16 on the GPU"),
    "decode": AutoAmp("decoding", cuda=False, cpu=False, why="bf16 decodes no faster"),  # on either machine
}
AMP_PURPOSES = tuple(AUTO_AMP)


def amp_help(*purposes: str) -> str:
    """--amp's help for a script whose work is `purposes` (AMP_PURPOSES), said from AUTO_AMP."""
    autos = []
    for purpose in purposes:
        auto = AUTO_AMP[purpose]
        where = [w for w, bf16 in (("on CUDA", auto.cuda), ("on CPUs with native bf16", auto.cpu)) if bf16]
        text = f"bf16 {' and '.join(where)}, else float32" if where else f"float32: {auto.why}"
        autos.append(text if len(purposes) == 1 else f"{auto.work}: {text}")
    return f"precision: auto ({'; '.join(autos)}), bf16, fp16 (CUDA) or off (float32, exact)"



@functools.cache
def cpu_native_bf16() -> str | None:
    """What gives this CPU native bfloat16 arithmetic (AVX512-BF16, AMX, Arm's BF16 instructions), or None. Where
    bf16 is emulated, matrix products run slower in bf16 than in float32, so --amp auto keeps float32 there."""
    import platform

    import torch

    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        if sys.platform == "darwin":  # Apple M2 and later
            import subprocess

            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
            return "Arm BF16" if out.stdout.strip() == "1" else None
        try:
            with open("/proc/cpuinfo") as f:  # Graviton 3 and other Armv8.6 cores list "bf16"
                return "Arm BF16" if re.search(r"^Features\s*:.*\bbf16\b", f.read(), re.MULTILINE) else None
        except OSError:
            return None
    return None


def pick_amp(device: torch.device, amp: str, purpose: str = "train") -> tuple[torch.dtype | None, str]:
    """(the dtype autocast computes in for `--amp` on `device`, None for float32; a few words saying which and why,
    for the one line each script prints about it). A choice the device cannot run is a UserError (exit 2).

    `auto` follows AUTO_AMP[purpose]: "train" is the training step, "encode" the feature cache's CNN, "decode"
    captions of trained models.
    """
    import torch

    if amp not in AMP_CHOICES:
        raise UserError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp}", EXIT_BAD_OPTION)
    if amp == "off":
        return None, "float32 (--amp off)"
    auto = AUTO_AMP[purpose]
    if amp == "auto" and not (auto.cuda or auto.cpu):
        return None, f"float32 ({auto.why}; --amp bf16 forces it)"
    if device.type == "mps":
        return None, "float32 (mps)"
    if device.type == "cuda":
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError("--amp bf16: this GPU has no bfloat16 support (use --amp fp16, auto or off)",
                            EXIT_BAD_OPTION)
        if amp == "auto" and not auto.cuda:
            return None, f"float32 ({auto.why}; --amp bf16 forces it)"
        if amp == "auto":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return (torch.bfloat16, "bf16 autocast") if amp == "bf16" else (torch.float16, "fp16 autocast")
    if amp == "fp16":
        raise UserError("--amp fp16 needs a CUDA device (on the CPU use --amp bf16, auto or off)", EXIT_BAD_OPTION)
    native = cpu_native_bf16()
    if amp == "auto" and native is None:
        return None, "float32 (this CPU has no native bf16; --amp bf16 forces it)"
    if amp == "auto" and not auto.cpu:
        return None, f"float32 (the CPU has {native}, but {auto.why}; --amp bf16 forces it)"
    return torch.bfloat16, f"bf16 autocast ({f'the CPU has {native}' if native else 'emulated on this CPU: slow'})"


def autocast(device: torch.device, dtype: torch.dtype | None):  # -> a context manager
    """torch.autocast for `dtype` on `device`; a no-op for float32 (dtype None)."""
    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
