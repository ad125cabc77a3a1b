"""check_device.py (train.py --check-device): identical training steps on the cpu and a device, compared."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import torch
from helpers import run_script, tiny_train_args, tiny_train_config

import check_device
import runtime
from run_start import check_device_for


def test_check_device_cpu_agrees(tiny_shapes: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    r = run_script("check_device.py", *tiny_train_args(tiny_shapes, tmp_path), "cpu", mode="fresh")
    assert r.rc == 0, r.err
    assert "cpu and cpu agree" in r.out and r.out.count("ok") == runtime.CHECK_STEPS
    # a "device" whose output weights are 5% off is caught (1% stays within the 1e-3 relative tolerance)
    real_deepcopy = copy.deepcopy

    def skewed(model):
        m = real_deepcopy(model)
        with torch.no_grad():
            m.decoder.fc.weight.mul_(1.05)
        return m

    monkeypatch.setattr(runtime, "copy", types.SimpleNamespace(deepcopy=skewed))
    assert not check_device_for(tiny_train_config(tiny_shapes, tmp_path), "cpu")
    assert "DISAGREE" in capsys.readouterr().out


def test_check_device_finds_dev_among_train_options() -> None:
    """DEV may stand anywhere among train.py's options; --device's own value is not DEV."""
    assert check_device.train_argv(["cuda:1", "--data", "d"]) == ["--check-device", "cuda:1", "--data", "d"]
    assert check_device.train_argv(["--device", "cpu", "--data", "d", "mps"]) == \
        ["--check-device", "mps", "--device", "cpu", "--data", "d"]
    assert check_device.train_argv(["--data", "d"]) is None
    r = run_script("check_device.py", "--data", "d", mode="fresh")
    assert r.rc == 2 and r.err.count("\n") == 1 and "name one device" in r.err, r.err
