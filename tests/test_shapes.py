"""shapes.py: the synthetic shapes dataset and its caption checker."""

from __future__ import annotations

import json

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
