"""inference.py end to end on generated images with a small random checkpoint."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

import inference
from all_models import Captioner, ModelConfig
from shapes import _sample_objects, render
from utils import UserError, run_cli

IMAGE_SIZE = 32
WORDS = "a small large red green blue yellow circle square triangle to the left right of above below there is".split()


def make_checkpoint(path: Path, word_map: dict[str, int], image_size: int = IMAGE_SIZE, seed: int = 0,
                    word_map_sha1: str = "0" * 40) -> Path:
    """A tiny random Captioner saved as the contract's checkpoint dict (train-only keys: placeholders).

    Decoder weights are drawn from N(0, 0.5) and the <end> logit lowered a little, so captions are
    a few words long and depend on the image (a freshly initialised decoder says nearly nothing).
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(word_map), encoder="smallcnn", encoded_size=4, embed_dim=16, attention_dim=16,
                      decoder_dim=16, dropout=0.0)
    model = Captioner(cfg)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.normal_(0.0, 0.5)
        model.decoder.fc.bias[word_map["<end>"]] -= 1.0
    ckpt = {"format_version": 1, "model_config": asdict(cfg), "model_state": model.state_dict(),
            "word_map": word_map, "word_map_sha1": word_map_sha1, "image_size": image_size, "dataset": "shapes",
            "train_config": {}, "optimizer_state": {}, "scheduler_state": {}, "scaler_state": None, "epoch": 1,
            "best_score": 0.0, "epochs_since_improvement": 0, "rng_state": {}, "history": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def shapes_word_map() -> dict[str, int]:
    return {w: i for i, w in enumerate(["<pad>", "<start>", "<end>", "<unk>"] + WORDS)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", shapes_word_map())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Five generated shapes images (64 px: inference resizes them to the checkpoint's 32 px)."""
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    paths = []
    for i in range(5):
        path = folder / f"img_{i}.png"
        render(_sample_objects(rng), 64).save(path)
        paths.append(path)
    return paths


def run(argv: list[str]) -> None:
    inference.main(argv + ["--workers", "0"])


def test_text_output(checkpoint, images, capsys):
    run(["--checkpoint", str(checkpoint), "--beam-size", "3", "--max-len", "8", str(images[0]), str(images[1])])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    for block, path in zip((lines[:3], lines[3:]), images[:2]):
        assert block[0] == str(path)
        assert block[1].startswith("  greedy: ")
        assert block[2].startswith("  beam 3: ") and "(score -" in block[2]
    words = set(WORDS) | {"<unk>"}
    assert any(len(line.split(":", 1)[1].split("(")[0].split()) > 0 for line in lines[1::3])
    for line in lines:
        if line.startswith("  greedy: "):
            assert set(line[len("  greedy: "):].split()) <= words


def test_json_output_and_attention_map_png(checkpoint, images, tmp_path, capsys):
    png = tmp_path / "maps" / "one.png"
    run(["--checkpoint", str(checkpoint), "--json", "--attention-map", str(png), "--max-len", "10", str(images[2])])
    (line,) = capsys.readouterr().out.splitlines()
    obj = json.loads(line)
    assert set(obj) == {"image", "greedy", "beam", "beam_size", "score", "attention_map"}
    assert obj["image"] == str(images[2]) and obj["beam_size"] == 5 and obj["attention_map"] == str(png)
    assert isinstance(obj["score"], float) and obj["score"] <= 0
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        n_panels = len(obj["beam"].split()) + 1
        assert im.format == "PNG" and im.width >= min(n_panels, inference.MAP_COLUMNS) * inference.MAP_PANEL_PX * 0.9
    assert png.stat().st_size < 300_000
    assert not list(png.parent.glob("*.tmp"))


def test_folder_batching_and_unreadable_images(checkpoint, images, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("not an image: ignored in a folder")
    maps = tmp_path / "maps"
    run(["--checkpoint", str(checkpoint), "--json", "--batch-size", "2", "--max-len", "6", "--attention-map",
         str(maps), str(folder)])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in images)  # sorted, broken one skipped
    assert "broken.png" in err and "warning" in err
    assert sorted(p.name for p in maps.iterdir()) == sorted(p.stem + ".png" for p in images)
    # Same captions whatever the batch size (batched decoding equals one image at a time).
    run(["--checkpoint", str(checkpoint), "--json", "--batch-size", "1", "--max-len", "6", *map(str, images)])
    single = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["greedy"], r["beam"]) for r in single] == [(r["greedy"], r["beam"]) for r in rows]
    assert [r["score"] for r in single] == pytest.approx([r["score"] for r in rows], abs=1e-4)


def test_user_errors_are_one_line(checkpoint, images, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    cases = [
        ([str(tmp_path / "missing.jpg")], "no such file or folder"),
        ([str(empty)], "folder holds no images"),
        ([str(broken)], "broken.jpg: cannot read image"),  # a single image: its own error line
        (["--attention-map", str(images[0]), str(images[0]), str(images[1])], "need a folder"),
    ]
    for args, message in cases:
        monkeypatch.setattr(sys, "argv", ["inference.py", "--checkpoint", str(checkpoint), "--workers", "0", *args])
        with pytest.raises(SystemExit) as exit_info:
            run_cli(inference.main)
        assert exit_info.value.code in (1, 2)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert message in last and "Traceback" not in err
    with pytest.raises(UserError, match="file not found"):
        run(["--checkpoint", str(tmp_path / "nope.pt"), str(images[0])])
    junk = tmp_path / "junk.pt"
    junk.write_text("junk\n")  # the weights-only unpickler raises a KeyError on this one
    with pytest.raises(UserError, match="truncated or corrupt"):
        run(["--checkpoint", str(junk), str(images[0])])


def test_smooth_maps_are_upsampled_where_the_model_looked():
    alphas = torch.full((2, 16), 0.01)
    alphas[0, 3] = 1.0  # row 0, column 3 of the 4 x 4 grid: top right
    alphas[1, 12] = 1.0  # bottom left
    alphas = alphas / alphas.sum(1, keepdim=True)
    maps = inference.smooth_maps(alphas, 64)  # (2, 64, 64)
    assert maps.shape == (2, 64, 64) and bool((maps >= 0).all())
    peak0 = divmod(int(maps[0].argmax()), 64)
    peak1 = divmod(int(maps[1].argmax()), 64)
    assert peak0[0] < 16 and peak0[1] >= 48
    assert peak1[0] >= 48 and peak1[1] < 16


def test_attention_map_paths():
    one = [Path("a/x.jpg")]
    assert inference.attention_map_paths("out.png", one) == [Path("out.png")]
    assert inference.attention_map_paths("out/", one) == [Path("out/x.png")]
    several = [Path("a/x.jpg"), Path("b/x.jpg"), Path("a/y.png")]
    assert inference.attention_map_paths("out", several) == [Path("out/x.png"), Path("out/x_2.png"),
                                                             Path("out/y.png")]
