"""The real-data path end to end: make_dataset.py -> train.py (feature cache) -> evaluate.py -> release.py ->
inference.py on the Flickr8k sample with EfficientNet-Lite0.

It lives here, not in the file of the script it ends with, because it checks what passes between five
scripts (the cache train.py builds, the scores release.py copies from evaluate.py's results, the released
file inference.py loads), which no one script's file is about.
"""

from __future__ import annotations

import json

import torch
from helpers import PHOTOS, photo_batch, run_script

import release
from checkpoints import load_checkpoint, model_from_checkpoint
from decoding import DecodeConfig, caption_batch


def test_flickr8k_sample_end_to_end(flickr_sample, tmp_path):
    """make_dataset -> feature cache -> train -> evaluate -> release -> inference on real photos with
    efficientnet_lite0: every command a user types for the released model, on 60 real Flickr8k images."""
    data, runs = tmp_path / "processed", tmp_path / "runs"
    r = run_script("make_dataset.py", "--dataset", "flickr8k", "--karpathy-json",
                   str(flickr_sample / "dataset_flickr8k.json"), "--image-dir", str(flickr_sample / "images"),
                   "--output-dir", str(data), "--image-size", "224", "--min-word-freq", "2", mode="fresh", timeout=600)
    assert r.rc == 0, r.err
    r = run_script("train.py", "--data", str(data), "--out-dir", str(runs), "--run", "f8k", "--encoder",
                   "efficientnet_lite0", "--encoded-size", "7", "--cache-features", "--epochs", "2",
                   "--batch-size", "8", "--group-captions", "--embed-dim", "32", "--attention-dim", "32",
                   "--decoder-dim", "32", "--lr-schedule", "cosine", "--workers", "0", "--max-decode-len", "12",
                   mode="fresh", timeout=600)
    assert r.rc == 0, r.err
    assert sorted(p.name for p in data.glob("features_efficientnet_lite0_*.h5")) == [
        p for p in sorted(p.name for p in data.glob("features_*.h5")) if p.endswith(("_train.h5", "_val.h5"))]
    history = [json.loads(line) for line in (runs / "f8k" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["train_ce"] < history[0]["train_ce"]
    # cosine from 4e-4 (the default): the last step's rate is near 0, the first epoch's last step's near half
    assert history[1]["lr_decoder"] < 0.05 * 4e-4 and 0.3 * 4e-4 < history[0]["lr_decoder"] < 0.7 * 4e-4
    r = run_script("evaluate.py", "--checkpoint", str(runs / "f8k" / "best.pt"), "--data", str(data), "--split",
                   "val", "--beam-sizes", "1", "3", "--workers", "0", "--max-len", "12", mode="fresh", timeout=600)
    assert r.rc == 0, r.err
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
    r = run_script("inference.py", "--checkpoint", str(out), "--attention-map", str(png), str(PHOTOS[0]), mode="fresh",
                   timeout=600)
    assert r.rc == 0, r.err
    assert "greedy:" in r.out and "beam 5:" in r.out and png.stat().st_size > 1000
