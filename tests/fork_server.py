"""The fork server behind helpers.run_script: `python tests/fork_server.py`, run from the repository root.

A fresh interpreter costs ~6 s of torch import on a 2-core machine, and the tests run about 70 command
lines, so this process imports the heavy third-party modules (torch, h5py, PIL, ...) once, prints
"ready", then reads one JSON request a line from stdin: {"script", "argv", "stdout", "stderr", "timeout"}.
For each it forks a child that imports the repository's modules afresh and runs the script with
`runpy.run_path(script, run_name="__main__")`, exactly the code `python script.py` runs, then its atexit
handlers, then os._exit (skipping 1.5 s of module teardown that prints nothing). The child's stdin is
/dev/null and its stdout and stderr go to the files named in the request (stdout null: a pipe whose reader has
gone, as in `script | head -1` once head has ended). "fsize": N puts a limit of N bytes on each file the child
writes (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG, as on a full disk). The reply is one JSON line,
{"rc": exit status}, or {"rc": null} when the child ran past its timeout and was killed.

Whoever starts it checks that the imports print nothing (an import-time warning would be an extra line in
every real run).
"""

import atexit
import json
import os
import resource
import runpy
import signal
import sys
import time

sys.path[0] = os.getcwd()  # as for `python script.py` in the repository root: the scripts' folder, not tests/

import h5py  # noqa: E402, F401  the heavy imports the scripts share
import nltk.translate.bleu_score  # noqa: E402, F401
import numpy  # noqa: E402, F401
import PIL.Image  # noqa: E402, F401
import torch  # noqa: E402, F401
import torchvision  # noqa: E402, F401
import tqdm  # noqa: E402, F401


def run_script(req: dict) -> None:
    """What `python <script> <argv...>` does, in this forked child."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for n, key in ((1, "stdout"), (2, "stderr")):
        if req[key] is None:
            read_end, write_end = os.pipe()
            os.close(read_end)  # the reader has gone: a write gets EPIPE (Python ignores SIGPIPE)
            os.dup2(write_end, n)
        else:
            os.dup2(os.open(req[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), n)
    if req.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing write()
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
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


def serve() -> None:
    print("ready", flush=True)
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


if __name__ == "__main__":
    serve()
