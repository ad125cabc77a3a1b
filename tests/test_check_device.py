"""check_device.py: identical training steps on the cpu and a device, compared."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import torch
from helpers import tiny_train_args, tiny_train_config

import check_device


def test_check_device_cpu_agrees(tiny_shapes: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    check_device.main([*tiny_train_args(tiny_shapes, tmp_path), "cpu"])  # returns: exit status 0
    out = capsys.readouterr().out
    assert "cpu and cpu agree" in out and out.count("ok") == check_device.STEPS
    # a "device" whose output weights are 5% off is caught (1% stays within the 1e-3 relative tolerance)
    real_deepcopy = copy.deepcopy

    def skewed(model):
        m = real_deepcopy(model)
        with torch.no_grad():
            m.decoder.fc.weight.mul_(1.05)
        return m

    monkeypatch.setattr(check_device, "copy", types.SimpleNamespace(deepcopy=skewed))
    assert not check_device.check_device(tiny_train_config(tiny_shapes, tmp_path), "cpu")
    assert "DISAGREE" in capsys.readouterr().out
