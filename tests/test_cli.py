"""cli.py: the exit status of a quitting signal, devices, option types, the --amp help and the options' help read
from the config fields, and the type checks of values read from files."""

from __future__ import annotations

import argparse

import pytest
import torch

import cli
from cli import UserError
from train import TrainConfig

# ----------------------------------------------------------------------------------------------
# Quitting signals


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


# ----------------------------------------------------------------------------------------------
# Precision


def test_amp_help_says_what_pick_amp_does(monkeypatch) -> None:
    """--amp's help is derived from the policy pick_amp follows, for each purpose: bf16 on a CPU with native bf16
    where pick_amp picks it, and only there."""
    monkeypatch.setattr(cli, "cpu_native_bf16", lambda: "AMX")
    for purpose in cli.AMP_PURPOSES:
        bf16 = cli.pick_amp(torch.device("cpu"), "auto", purpose)[0] is torch.bfloat16
        assert ("native bf16" in cli.amp_help(purpose)) == bf16


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
