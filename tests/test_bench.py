"""bench.py at toy sizes: every benchmark runs through the real code and reports its named figures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import one_line, run_script

import bench

TOY = bench.BenchConfig(batch_size=2, encoder="resnet18", encoded_size=2, dim=16, vocab_size=20, words=3,
                        image_size=32, warmup=1, repeats=1, cnn_repeats=1, beam_images=4, beam_batch=2,
                        beam_max_len=20, jpeg_images=12, jpeg_repeats=1, workers=1, real_cnn_batch=2,
                        real_cnn_repeats=1, real_images=2, real_repeats=1, real_photos=1, scst_samples=2)
CPU = torch.device("cpu")


def figures_by_name(table: str) -> dict[str, float]:
    """The table's rows that start a benchmark -> {its name: its first figure}."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] in bench.BENCHMARKS:
            out[cells[0]] = float(cells[2].replace(",", ""))
    return out


@pytest.fixture(scope="module")
def report(trained: Path) -> dict:
    """Every benchmark at toy sizes, as bench.json holds them; `precision` times the tiny trained model (the
    released one in emulated bf16 takes minutes on a CPU without bf16)."""
    toy = bench.Setup(TOY, CPU)
    out: dict = {"env": bench.environment(CPU, TOY, quick=True), "seconds": 0.0}
    for name in bench.BENCHMARKS:
        out[name] = bench.run_one(name, replace(toy, released=trained / "best.pt") if name == "precision" else toy)
    return json.loads(json.dumps(out))


def test_every_benchmark_reports_its_named_figures(report: dict) -> None:
    memory = {"peak_rss_mib", "start_rss_mib"}
    assert memory | {"images_per_s", "tokens_per_s", "seconds_per_step"} <= set(report["decoder"])
    assert memory | {"frozen_images_per_s", "cached_images_per_s", "ratio"} <= set(report["train"])
    assert memory | {"batched_images_per_s", "single_images_per_s", "ratio", "identical", "weights",
                     "words_mean"} <= set(report["beam"])
    assert memory | {"images_per_s", "workers"} <= set(report["make_dataset"])
    # the released model's path at its real sizes (EfficientNet-Lite0 224 px, 7 x 7 x 1280, its decoder)
    assert memory | {"cnn_images_per_s", "reference_cnn_images_per_s"} <= set(report["real_encoder"])
    step = report["real_step"]
    assert memory | {"decoder_captions_per_s", "decoder_captions_per_s_autograd_wgrad",
                     "epoch_seconds_estimate"} <= set(step)
    assert memory | {"seconds_per_photo"} <= set(report["real_photo"])
    assert (report["real_encoder"]["image_size"], step["grid"], step["dim"]) == (224, "7 x 7", 1280)
    assert step["epoch_seconds_estimate"] == bench.FLICKR8K_TRAIN_CAPTIONS / step["decoder_captions_per_s"]
    assert {"device", "cpu", "threads", "torch", "config"} <= set(report["env"])
    assert report["beam"]["identical"] is True  # batched and one-at-a-time beam search agree
    assert 5 <= report["beam"]["words_mean"] <= 15  # the clocked <end> gives captions of realistic length
    # every hot path in fp32 and bf16, each with its fraction of the matrix-product floor
    precision = report["precision"]
    assert set(precision["paths"]) == {"train step", "self-critical step", "encoder", "beam search", "one photo"}
    assert all(p[k] > 0 for p in precision["paths"].values() for k in ("fp32", "bf16", "fp32_floor", "bf16_floor"))
    assert 0 <= precision["encoder_max_relative_difference"] < 0.5 and 0 <= precision["beam_same_captions"] <= 1


def test_the_table_names_every_benchmark_with_its_figures(report: dict) -> None:
    for name, b in bench.BENCHMARKS.items():
        assert {row.field for row in b.rows} <= set(report[name])  # every row reads a field of its record
    table = bench.format_table(report)
    assert set(figures_by_name(table)) == {name for name, b in bench.BENCHMARKS.items() if b.rows}
    for path in report["precision"]["paths"]:  # precision's own table: a row per hot path
        assert f"| {path} (" in table
    some = bench.format_table({k: report[k] for k in ("env", "beam", "real_step")})  # only what the report holds
    assert set(figures_by_name(some)) == {"beam", "real_step"} and "precision" not in some


def test_only_selects_by_name_and_real_stands_for_the_released_path() -> None:
    assert bench.select(None) == list(bench.BENCHMARKS)
    assert bench.select(["real", "beam", "real_step"]) == ["beam", "real_encoder", "real_step", "real_photo"]


def test_only_runs_the_named_benchmarks_and_writes_their_figures(monkeypatch, tmp_path: Path) -> None:
    """--only decoder train: the table and bench.json hold those two (each run here at toy sizes, not apart)."""
    monkeypatch.setattr(bench, "run_apart",
                        lambda names, forward: {n: bench.run_one(n, bench.Setup(TOY, CPU)) for n in names})
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--only", "decoder", "train", "--device", "cpu", "--checkpoint", "none",
                   "--output", out, mode="in_process")
    assert r.rc == 0, str(r)
    report = json.loads(out.read_text())
    assert set(report) == {"env", "decoder", "train", "seconds"}
    assert set(figures_by_name(r.out)) == {"decoder", "train"}


def test_json_out_runs_here_and_writes_each_record_by_name(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench, "QUICK", TOY)
    out = tmp_path / "decoder.json"
    r = run_script("bench.py", "--quick", "--only", "decoder", "--device", "cpu", "--checkpoint", "none",
                   "--json-out", out, mode="in_process")
    assert r.rc == 0, str(r)
    assert {"images_per_s", "tokens_per_s", "peak_rss_mib"} <= set(json.loads(out.read_text())["decoder"])


def test_an_unknown_benchmark_is_one_line(tmp_path: Path) -> None:
    r = run_script("bench.py", "--only", "decoder", "nope", "--checkpoint", "none", "--output",
                   tmp_path / "bench.json", mode="in_process")
    one_line(r, 2, "--only", "nope")
    assert not (tmp_path / "bench.json").exists()
