"""The demo's command path end to end, CI-sized: make_dataset -> train -> evaluate -> inference, then the
released model on a real photo; with --scst, self-critical training from the demo's model and its scores.

The 10-minute quality bars (BLEU-4, objects, relation) are checked by running `make demo` itself,
not here: this runs the same four command lines on a tiny dataset for 2 epochs.
"""

import json
from pathlib import Path

from helpers import run_script
from PIL import Image


def test_quick_demo_runs_every_stage_and_learns(tmp_path: Path) -> None:
    proc = run_script("demo.py", "--quick", "--scst", "--workdir", tmp_path, mode="fresh", timeout=600)
    assert proc.rc == 0, proc.out[-2000:] + proc.err[-2000:]
    run = tmp_path / "model_files" / "shapes"

    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    assert history[-1]["train_ce"] < history[0]["train_ce"], history  # training lowered the loss

    results = json.loads((run / "results_test.json").read_text())
    assert results["n_images"] == 20 and results["checkpoint"] == str(run / "last.pt")  # the last epoch's model
    assert results["meteor"] is False  # --no-meteor: the demo's table shows none
    predictions = json.loads((run / "predictions_test_beam5.json").read_text())
    assert len(predictions) == 20 and all(set(p) == {"image_id", "caption"} for p in predictions)

    out = proc.out
    assert "greedy:" in out and "beam 5:" in out  # the sample image's two captions
    png = run / next(p.name for p in run.iterdir() if p.name.startswith("attention_shapes"))
    photo = run / "attention_chelsea.png"  # the real photo, captioned by the released model
    for path in (png, photo):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 64
    assert f"attention maps: {png} (shapes), {photo} (the photo)" in out
    assert "docs/photos/chelsea.jpg" in out  # inference.py's caption lines name the photo
    assert out.rstrip().splitlines()[-1].startswith("results: ")  # it ends with the metrics table
    assert "| beam |" in out.split("demo finished")[-1]

    # --scst: one epoch of self-critical training from the demo's model, chosen and scored like the demo's own run
    scst = tmp_path / "model_files" / "shapes_scst"
    config = json.loads((scst / "config.json").read_text())
    assert config["scst"] and config["init_from"] == str(run / "last.pt")
    assert config["scst_ce_weight"] == 1.0  # the mixed objective: the references' cross-entropy too
    (epoch,) = [json.loads(line) for line in (scst / "metrics.jsonl").read_text().splitlines()]
    assert {"train_reward", "train_ce", "val_cider"} <= epoch.keys()
    assert json.loads((scst / "results_test.json").read_text())["n_images"] == 20
    after = out.split("after self-critical training:")
    assert len(after) == 2 and after[1].count("| beam |") == 1  # the demo ends with the SCST model's table
