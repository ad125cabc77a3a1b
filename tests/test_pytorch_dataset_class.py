"""pytorch_dataset_class.py: image preprocessing (any mode, 16-bit, alpha, the size limit) and the HDF5 datasets."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import pytorch_dataset_class as pdc
from pytorch_dataset_class import CaptionDataset, ImageDataset, normalize, preprocess_image, to_model_input
from utils import UserError

# ---------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16", "1"])
def test_preprocess_image_any_mode(tmp_path, mode):
    img = Image.new("RGB", (40, 30), (200, 120, 40)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    arr = preprocess_image(path, 16)
    assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8


def test_preprocess_16bit_is_scaled_not_saturated(tmp_path):
    values = np.full((10, 10), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(values).save(tmp_path / "g16.png")
    arr = preprocess_image(tmp_path / "g16.png", 8)
    assert abs(int(arr.mean()) - 128) <= 1


def test_preprocess_rgba_composited_on_white():
    arr = preprocess_image(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), 4)
    assert (arr == 255).all()


def test_preprocess_size_limit(tmp_path, monkeypatch):
    assert pdc.MAX_IMAGE_PIXELS >= 12000 * 12000 and Image.MAX_IMAGE_PIXELS == pdc.MAX_IMAGE_PIXELS
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(pdc, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(UserError, match="big.png"):
        preprocess_image(tmp_path / "big.png", 8)
    with pytest.raises(UserError, match="nothere.jpg"):
        preprocess_image(tmp_path / "nothere.jpg", 8)


# ---------------------------------------------------------------- datasets

def test_dataloaders_with_two_workers_read_everything(tiny_shapes):
    caps = CaptionDataset(tiny_shapes / "val.h5")
    assert len(caps) == 16 * 5
    seen = 0
    for x, caption, length in DataLoader(caps, batch_size=7, num_workers=2):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8  # as stored: normalised on the device
        model_input = to_model_input(x, "cpu")
        assert model_input.dtype == torch.float32 and torch.equal(model_input, normalize(x))
        assert caption.shape[1:] == (52,) and caption.dtype == torch.int64 and length.dtype == torch.int64
        seen += len(x)
    assert seen == len(caps)

    images = ImageDataset(tiny_shapes / "val.h5")
    indices = []
    for x, captions, lengths, index in DataLoader(images, batch_size=5, num_workers=2):
        assert x.shape[1:] == (3, 32, 32) and captions.shape[1:] == (5, 52) and lengths.shape[1:] == (5,)
        indices += index.tolist()
    assert sorted(indices) == list(range(16))
    assert len(images.references()) == len(images.filenames()) == len(images.meta()) == 16
    assert images.attrs["split"] == "val"


def test_dataset_with_cached_features(tiny_shapes, tmp_path):
    with h5py.File(tmp_path / "features.h5", "w") as f:
        f["features"] = np.random.default_rng(0).standard_normal((16, 4, 6)).astype(np.float16)  # (N, P, D)
    x, _, _ = CaptionDataset(tiny_shapes / "val.h5", tmp_path / "features.h5")[7]  # image 7 // 5 = 1
    assert x.shape == (4, 6) and x.dtype == torch.float16  # as stored: the loader moves half the bytes
    with h5py.File(tmp_path / "features.h5") as f:
        expected = torch.from_numpy(f["features"][1].astype(np.float32))
    model_input = to_model_input(x.unsqueeze(0), "cpu")  # (1, P, D)
    assert model_input.dtype == torch.float32 and torch.equal(model_input[0], expected)
    with pytest.raises(UserError):
        CaptionDataset(tmp_path / "missing.h5")
