"""runtime.py: the stop signals (StopFlag; DataLoader workers ignore the ones sent to the group) and the saved RNG
states."""

from __future__ import annotations

import multiprocessing
import random
import signal
import subprocess
import time

import pytest
import torch

import cli
import pytorch_dataset_class
import runtime

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
