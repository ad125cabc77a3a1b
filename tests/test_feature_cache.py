"""feature_cache.py: a training step on cached annotations equals one through the encoder; the cache's name, reuse
and range checks; a run that trains from it."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from helpers import tiny_train_config
from torch.utils.data import DataLoader

import feature_cache
import train
from all_models import Captioner
from cli import UserError
from optim import make_optimizer
from pytorch_dataset_class import CaptionDataset, to_model_input
from run_start import make_model_config
from scst import train_step


def first_batch(h5: Path, n: int, feature_path: Path | None = None) -> tuple[torch.Tensor, ...]:
    """(model input float32, captions, lengths) of the first n captions, as train.py feeds them."""
    x, caps, lens = next(iter(DataLoader(CaptionDataset(h5, feature_path=feature_path), batch_size=n, shuffle=False)))
    return to_model_input(x, "cpu"), caps, lens


def test_cached_features_step_equals_cnn_step(tiny_shapes: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    cfg = tiny_train_config(data, tmp_path, dropout=0.0)
    torch.manual_seed(0)
    model = Captioner(make_model_config(cfg, len(json.loads((data / "word_map.json").read_text()))))
    fp = feature_cache.encoder_fingerprint(model.encoder)
    feats = feature_cache.feature_cache_path(data, model.config, "none", fp, "train")
    assert feats.name == f"features_smallcnn_none-{fp[:12]}_4_train.h5"
    feature_cache.build_feature_cache(model.encoder, data / "train.h5", feats, batch_size=16, progress=False)
    with h5py.File(feats) as f:
        assert f["features"].shape == (48, 16, 128) and f["features"].dtype == "float16"
    mtime = feats.stat().st_mtime_ns
    feature_cache.build_feature_cache(model.encoder, data / "train.h5", feats, progress=False)  # up to date: reused
    assert feats.stat().st_mtime_ns == mtime
    x, caps, lens = first_batch(data / "train.h5", 16)
    a, caps2, lens2 = first_batch(data / "train.h5", 16, feature_path=feats)
    assert a.shape == (16, 16, 128) and torch.equal(caps, caps2) and torch.equal(lens, lens2)
    losses, weights = [], []
    for inp in (x, a):
        m = copy.deepcopy(model).train()
        opt = make_optimizer(m, cfg.decoder_lr, cfg.encoder_lr)
        losses.append(train_step(m, inp, caps, lens, opt, alpha_c=1.0, grad_clip=5.0))
        weights.append(m.decoder.fc.weight.detach().clone())
    for k in ("loss", "ce", "dsr"):  # the cache is float16: equal to ~1e-4
        assert losses[1][k] == pytest.approx(losses[0][k], rel=1e-3)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-3, atol=1e-6)
    # a different encoder never reads these features
    other = Captioner(make_model_config(cfg, model.config.vocab_size))
    other_fp = feature_cache.encoder_fingerprint(other.encoder)
    assert feature_cache.feature_cache_path(data, other.config, "none", other_fp, "train") != feats
    # annotations beyond float16's range are refused, not stored as inf
    with torch.no_grad():
        other.encoder.cnn[1].weight.mul_(1e6)  # cnn[0] is AddCoords, cnn[1] the first conv
    with pytest.raises(UserError, match="beyond float16's range"):
        feature_cache.build_feature_cache(other.encoder, data / "train.h5", tmp_path / "f.h5", progress=False)
    assert not (tmp_path / "f.h5").exists()


def test_training_from_feature_cache(tiny_shapes: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    summary = train.train(tiny_train_config(data, tmp_path, cache_features=True), progress=False)
    assert summary["epochs"] == 1
    assert len(list(data.glob("features_smallcnn_none-*_4_train.h5"))) == 1
    assert len(list(data.glob("features_smallcnn_none-*_4_val.h5"))) == 1
