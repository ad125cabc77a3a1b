"""run_start.py: a crafted training state in the checkpoint --resume reads is refused in one line before anything
is built, called directly and on train.py's command line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import one_line, run_script

import train
from cli import UserError
from run_start import load_resume

# ----------------------------------------------------------------------------------------------
# A crafted training state: one line before anything is built


def _set(key: str, value):
    def edit(ck: dict) -> None:
        ck[key] = value
    return edit


def _set_in(key: str, sub: str, value):
    def edit(ck: dict) -> None:
        ck[key][sub] = value
    return edit


def _bad_exp_avg(ck: dict) -> None:
    state = ck["optimizer_state"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(3)


BAD_RESUME_STATES = [  # (id, edit of a real last.pt, what the error line says)
    ("train_config-empty", _set("train_config", {}), "its train_config is not a non-empty dict but {}"),
    ("train_config-list", _set("train_config", [1]), "its train_config must be a dict, got [1]"),
    ("train_config-str-epochs", _set_in("train_config", "epochs", "ten"),
     "its train_config: epochs must be an integer, got 'ten'"),
    ("train_config-float-batch", _set_in("train_config", "batch_size", 16.0),
     "its train_config: batch_size must be an integer, got 16.0"),
    ("train_config-none-run", _set_in("train_config", "run", None), "its train_config: run must be a string"),
    ("epoch-negative", _set("epoch", -1), "its epoch must be an integer >= 0, got -1"),
    ("epoch-float", _set("epoch", 1.0), "its epoch must be an integer >= 0, got 1.0"),
    ("epoch-none", _set("epoch", None), "its epoch must be an integer >= 0, got None"),
    ("step-str", _set("step_in_epoch", "3"), "its step_in_epoch must be an integer >= 0, got '3'"),
    ("best_score-str", _set("best_score", "high"), "its best_score must be a number, got 'high'"),
    ("best_score-nan", _set("best_score", float("nan")), "its best_score must be a number, got nan"),
    ("history-ints", _set("history", [1]), "its history must be a list of per-epoch metrics"),
    ("history-incomplete", _set("history", [{"epoch": 1}]), "its history must be a list of per-epoch metrics"),
    ("partial-str", _set("partial_epoch", {"loss": "x"}), "its partial_epoch must be the running sums"),
    ("rng-empty", _set("rng_state", {}), "its rng_state cannot be restored (not a dict of RNG states but {})"),
    ("rng-torch-str", _set_in("rng_state", "torch", "x"), "its rng_state cannot be restored (TypeError"),
    ("rng-numpy-empty", _set_in("rng_state", "numpy", {}), "its rng_state cannot be restored (KeyError"),
    ("optimizer-empty", _set("optimizer_state", {}), "its optimizer or scheduler state does not fit its model"),
    ("optimizer-str", _set("optimizer_state", "adam"), "its optimizer or scheduler state does not fit its model"),
    ("optimizer-groups", _set_in("optimizer_state", "param_groups", []),
     "its optimizer or scheduler state does not fit its model (ValueError"),
    ("optimizer-exp_avg", _bad_exp_avg, "its optimizer_state's exp_avg of a "),
    ("scheduler-list", _set("scheduler_state", [1]), "its scheduler_state must be a dict, got [1]"),
    ("scheduler-mode", _set_in("scheduler_state", "mode", "sideways"),
     "its optimizer or scheduler state does not fit its model (ValueError"),
    ("scheduler-best", _set_in("scheduler_state", "best", "x"), "its optimizer or scheduler state does not fit"),
    ("scaler-str", _set("scaler_state", "x"), "its scaler_state must be a dict, got 'x'"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in BAD_RESUME_STATES], ids=[c[0] for c in BAD_RESUME_STATES])
def test_crafted_training_state_is_refused_in_one_line(last_ckpt: dict, tmp_path: Path, edit, message: str) -> None:
    ck = copy.deepcopy(last_ckpt)
    edit(ck)
    path = tmp_path / "last.pt"
    torch.save(ck, path)
    with pytest.raises(UserError) as err:
        load_resume(path, train.TrainConfig)
    line = str(err.value)
    assert line.startswith(f"--resume {path}: ") and message in line and "\n" not in line, line
    assert err.value.code == 1


@pytest.mark.parametrize("case", ["train_config-empty", "rng-empty", "optimizer-groups", "epoch-float"])
def test_crafted_training_state_on_the_command_line(last_ckpt: dict, tmp_path: Path, case: str) -> None:
    """The command line: one line, exit 1, before anything is built or written (no run folder appears)."""
    _, edit, message = next(c for c in BAD_RESUME_STATES if c[0] == case)
    ck = copy.deepcopy(last_ckpt)
    edit(ck)
    torch.save(ck, path := tmp_path / "crafted.pt")
    out = tmp_path / "out"
    one_line(run_script("train.py", "--resume", path, "--out-dir", out, mode="in_process"), 1, f"--resume {path}: ",
             message)
    assert not out.exists()
