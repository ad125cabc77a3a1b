"""bench.py at toy sizes: every benchmark runs through the real code and reports what the README table needs."""

from __future__ import annotations

import json

import torch

import bench

TOY = bench.BenchConfig(batch_size=2, encoder="resnet18", encoded_size=2, dim=16, vocab_size=20, words=3,
                        image_size=32, warmup=1, repeats=1, cnn_repeats=1, beam_images=4, beam_batch=2,
                        beam_max_len=20, jpeg_images=12, jpeg_repeats=1, workers=1, real_cnn_batch=2,
                        real_cnn_repeats=1, real_images=2, real_repeats=1, real_photos=1, scst_samples=2)


def test_bench_smoke(trained) -> None:
    device = torch.device("cpu")
    report = {"env": bench.environment(device, TOY, quick=True), "seconds": 0.0}
    for name in bench.BENCHES:
        if name != "precision":  # the released model in emulated bf16 takes minutes on a CPU without bf16
            report[name] = bench.run_one(name, TOY, device, checkpoint=None)
    report["precision"] = bench.bench_precision(TOY, device, trained / "best.pt")
    report = json.loads(json.dumps(report))  # what bench.json holds
    memory = {"peak_rss_mib", "start_rss_mib"}
    assert memory | {"images_per_s", "tokens_per_s", "seconds_per_step"} <= set(report["decoder"])
    assert memory | {"frozen_images_per_s", "cached_images_per_s", "ratio"} <= set(report["train"])
    assert memory | {"batched_images_per_s", "single_images_per_s", "ratio", "identical", "weights",
                     "words_mean"} <= set(report["beam"])
    assert memory | {"images_per_s", "workers"} <= set(report["make_dataset"])
    # 5: the released model's path at its real sizes (EfficientNet-Lite0 224 px, 7 x 7 x 1280, its decoder)
    real = report["real"]
    assert memory | {"cnn_images_per_s", "reference_cnn_images_per_s", "decoder_captions_per_s",
                     "decoder_captions_per_s_autograd_wgrad",
                     "epoch_seconds_estimate", "seconds_per_photo"} <= set(real)
    assert (real["image_size"], real["grid"], real["dim"]) == (224, "7 x 7", 1280)
    assert real["epoch_seconds_estimate"] == bench.FLICKR8K_TRAIN_CAPTIONS / real["decoder_captions_per_s"]
    assert {"device", "cpu", "threads", "torch", "config"} <= set(report["env"])
    assert report["beam"]["identical"] is True  # batched and one-at-a-time beam search agree
    assert 5 <= report["beam"]["words_mean"] <= 15  # the clocked <end> gives captions of realistic length
    # 6: every hot path in fp32 and bf16, each with its fraction of the matrix-product floor
    precision = report["precision"]
    assert set(precision["paths"]) == {"train step", "self-critical step", "encoder", "beam search", "one photo"}
    assert all(p[k] > 0 for p in precision["paths"].values() for k in ("fp32", "bf16", "fp32_floor", "bf16_floor"))
    assert 0 <= precision["encoder_max_relative_difference"] < 0.5 and 0 <= precision["beam_same_captions"] <= 1
    table = bench.format_table(report)
    assert "tokens/s" in table and "captions/s" in table and "| beam search (images/s) |" in table
    assert table.count("\n") == 28
