"""shapes.py: the synthetic shapes dataset and its caption checker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import kill_when, sha1, start_script

import shapes
from cli import UserError
from shapes import caption_correctness, generate_shapes


def test_shapes_deterministic_and_captions_correct(tmp_path):
    a = generate_shapes(tmp_path / "a", 150, 25, 25, image_size=32, seed=3, workers=1, progress=False)
    b = generate_shapes(tmp_path / "b", 150, 25, 25, image_size=32, seed=3, workers=1, progress=False)
    assert a.read_bytes() == b.read_bytes()
    for p in (tmp_path / "a" / "images").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    c = generate_shapes(tmp_path / "c", 150, 25, 25, image_size=32, seed=4, workers=1, progress=False)
    assert c.read_bytes() != a.read_bytes()

    images = json.loads(a.read_text())["images"]
    assert [sum(e["split"] == s for e in images) for s in ("train", "val", "test")] == [150, 25, 25]
    n_two = 0
    for e in images:
        truth = e["shapes"]
        two = len(truth["objects"]) == 2
        n_two += two
        assert len(e["sentences"]) == 5
        for s in e["sentences"]:
            assert len(s["tokens"]) <= 12 and s["raw"] == " ".join(s["tokens"])
            assert caption_correctness(s["tokens"], truth) == (True, True if two else None)
    assert 0.55 < n_two / len(images) < 0.85
    vocab = {w for e in images for s in e["sentences"] for w in s["tokens"]}
    assert len(vocab) < 40


def test_caption_correctness_rejects_wrong_captions():
    truth = {"objects": [{"shape": "circle", "color": "red", "size": "small", "cx": 0.2, "cy": 0.5},
                         {"shape": "square", "color": "blue", "size": "large", "cx": 0.7, "cy": 0.5}],
             "relation": "left"}
    ok = [("a red circle to the left of a blue square", (True, True)),
          ("there is a large blue square right of a small red circle", (True, True)),
          ("a red circle left of a blue square", (True, True)),
          ("a green circle to the left of a blue square", (False, False)),  # swapped colour
          ("a red circle to the right of a blue square", (True, False)),  # swapped relation
          ("a blue square to the left of a red circle", (True, False)),
          ("a red circle above a blue square", (True, False)),
          ("a red circle a blue square", (True, False)),  # relation missing
          ("a red circle to the of left a blue square", (True, False)),  # garbled
          ("a red circle", (False, False)),
          ("a red circle to the left of a blue square and a red circle", (False, False)),
          ("a red blue circle to the left of a blue square", (False, False))]
    for text, expected in ok:
        assert caption_correctness(text.split(), truth) == expected, text
    one = {"objects": [truth["objects"][0]], "relation": None}
    assert caption_correctness(["a", "small", "red", "circle"], one) == (True, None)
    assert caption_correctness(["a", "red", "square"], one) == (False, None)
    for garbage in ([], ["<unk>"] * 30, [None, 3, "circle"], None, 42, ["red"], ["circle", "red"]):
        objects_ok, relation_ok = caption_correctness(garbage, truth)  # never raises
        assert objects_ok is False and relation_ok is False


# ---------------------------------------------------------------- the raw folder is replaced whole

def snapshot(raw: Path) -> dict[str, str]:
    """Every file of a raw shapes folder (its JSON and images, not a hidden staging folder) -> its sha1."""
    return {str(p.relative_to(raw)): sha1(p) for p in sorted(raw.rglob("*"))
            if p.is_file() and not p.relative_to(raw).parts[0].startswith(".")}


def test_generation_that_fails_part_way_leaves_the_previous_set(tmp_path: Path, monkeypatch) -> None:
    """A run that dies while rendering (here: the 40th image raises) leaves the previous complete set, byte for
    byte, and nothing of its own: never images of two seeds under one JSON."""
    raw = tmp_path / "raw"
    generate_shapes(raw, 60, 5, 5, image_size=16, seed=0, workers=1, progress=False)
    before = snapshot(raw)
    render, calls = shapes._render_to_file, []

    def dies_at_40(job):
        calls.append(job)
        if len(calls) == 40:
            raise OSError("disk full")
        render(job)

    monkeypatch.setattr(shapes, "_render_to_file", dies_at_40)
    with pytest.raises(OSError, match="disk full"):
        generate_shapes(raw, 60, 5, 5, image_size=16, seed=1, workers=1, progress=False)
    assert snapshot(raw) == before
    assert sorted(p.name for p in raw.iterdir()) == ["dataset_shapes.json", "images"]  # no staging folder left


def test_sigkill_while_rendering_leaves_the_previous_set_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    """make_dataset killed (SIGKILL) while the shapes generator renders into its staging folder: the previous
    raw folder is as it was; the next run deletes the dead run's staging folder and replaces the set whole."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate_shapes(raw, 30, 5, 5, image_size=16, seed=0, workers=1, progress=False)
    before = snapshot(raw)
    proc = start_script("make_dataset.py", "--dataset", "shapes", "--shapes-train", "3000", "--shapes-val", "5",
                        "--shapes-test", "5", "--image-size", "16", "--workers", "1", "--seed", "1",
                        "--raw-dir", raw, "--output-dir", out, log=tmp_path / "killed")

    def rendering() -> bool:  # a few hundred images into the staging folder
        return any((p / "images").is_dir() and len(list((p / "images").iterdir())) > 300 for p in staging(raw))

    assert kill_when(proc, rendering), (tmp_path / "killed.err").read_text()[-3000:]
    assert snapshot(raw) == before
    assert staging(raw), "killed before it rendered anything"
    generate_shapes(raw, 20, 5, 5, image_size=16, seed=1, workers=1, progress=False)
    assert not staging(raw)
    assert sorted(p.name for p in (raw / "images").iterdir()) == [f"shapes_{i:06d}.png" for i in range(30)]
    images = json.loads((raw / "dataset_shapes.json").read_text())["images"]
    assert [e["filename"] for e in images] == [f"shapes_{i:06d}.png" for i in range(30)]


def staging(raw: Path) -> list[Path]:
    return [p for p in raw.iterdir() if shapes.STAGING_NAME.match(p.name)]


def test_images_folder_the_generator_did_not_write_is_refused(tmp_path: Path) -> None:
    """--raw-dir pointing at real data: its images folder is replaced as a whole, so one holding anything
    else is refused, untouched."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "images" / "holiday.jpg").write_bytes(b"a photo")
    with pytest.raises(UserError, match="holiday.jpg.*did not write"):
        generate_shapes(raw, 5, 2, 2, image_size=16, workers=1, progress=False)
    assert (raw / "images" / "holiday.jpg").read_bytes() == b"a photo"
    assert sorted(p.name for p in raw.iterdir()) == ["images"]
