"""Tests of the data pipeline: make_dataset.py, pytorch_dataset_class.py and shapes.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import pytorch_dataset_class as pdc
from make_dataset import build_dataset, format_summary, main, sample_captions, word_map_sha1
from pytorch_dataset_class import CaptionDataset, ImageDataset, normalize, preprocess_image, to_model_input
from shapes import caption_correctness, generate_shapes
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SPLIT_FILES = ("word_map.json", "train.h5", "val.h5", "test.h5")


# ---------------------------------------------------------------- helpers

def write_karpathy(root: Path, entries: list[dict], make_images: bool = True) -> tuple[Path, Path]:
    """Write a small Karpathy JSON and (unless told not to) a 24 x 16 JPEG per entry.

    Each entry: {"split", "captions": [token lists], optional "filename"}. Returns (json, image dir).
    """
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i, e in enumerate(entries):
        filename = e.get("filename", f"img_{i:03d}.jpg")
        if make_images:
            Image.new("RGB", (24, 16), (10 * (i % 25), 100, 200)).save(image_dir / filename)
        images.append({"filename": filename, "imgid": i, "split": e["split"],
                       "sentences": [{"tokens": t, "raw": " ".join(t)} for t in e["captions"]]})
    json_path = root / "dataset_test.json"
    json_path.write_text(json.dumps({"dataset": "test", "images": images}))
    return json_path, image_dir


def simple_entries(n_train: int = 4, n_val: int = 2, n_test: int = 2) -> list[dict]:
    return [{"split": s, "captions": [["a", "dog"], ["a", "cat", "runs"]]}
            for s, n in (("train", n_train), ("val", n_val), ("test", n_test)) for _ in range(n)]


def build(json_path: Path, image_dir: Path, out: Path, **kwargs) -> dict:
    options = dict(image_size=16, min_word_freq=1, workers=1, progress=False)
    options.update(kwargs)
    return build_dataset("flickr8k", json_path, image_dir, out, **options)


def run_clis(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run several `make_dataset.py` command lines at once (each pays the torch import)."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "make_dataset.py"), *argv], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    results = []
    for argv, p in zip(argvs, procs):
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return results


def decode(row: np.ndarray, word_map: dict[str, int]) -> list[str]:
    """Caption row (L,) -> tokens between <start> and <end>."""
    words = {i: w for w, i in word_map.items()}
    tokens = [words[int(i)] for i in row]
    return tokens[1:tokens.index("<end>")]


# ---------------------------------------------------------------- vocabulary, options, sampling

def test_word_map_from_train_only_with_min_freq_boundary(tmp_path):
    entries = [
        {"split": "train", "captions": [["kept", "kept", "kept", "dropped"], ["dropped", "often"]]},
        {"split": "train", "captions": [["often", "often", "often"]]},
        {"split": "val", "captions": [["valonly"] * 9]},
        {"split": "test", "captions": [["testonly"] * 9, ["kept"]]},
    ]
    json_path, image_dir = write_karpathy(tmp_path, entries)
    summary = build(json_path, image_dir, tmp_path / "out", min_word_freq=3, captions_per_image=2)
    word_map = json.loads((tmp_path / "out" / "word_map.json").read_text())
    # count == min kept, min - 1 dropped, val/test words never counted; sorted by (-count, word).
    assert list(word_map) == ["<pad>", "<start>", "<end>", "<unk>", "often", "kept"]
    assert list(word_map.values()) == list(range(6)) and summary["vocab_size"] == 6
    with h5py.File(tmp_path / "out" / "test.h5") as f:
        assert decode(f["captions"][0], word_map)[0] in ("<unk>", "kept")
        assert json.loads(f["references"].asstr()[0])[0] == ["testonly"] * 9  # raw, never <unk>
        assert f.attrs["word_map_sha1"] == word_map_sha1(tmp_path / "out" / "word_map.json")


@pytest.fixture(scope="module")
def bad_clis(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every failing command line of this file, run at once: each one pays the torch import."""
    tmp = tmp_path_factory.mktemp("bad_clis")
    json_path, _ = write_karpathy(tmp, simple_entries(), make_images=False)
    argvs = {f"fraction {v}": ["--fraction", v] for v in ("0", "1.5", "-0.5")}
    argvs["--karpathy-json"] = ["--dataset", "flickr8k", "--karpathy-json", str(tmp / "no.json"),
                                "--image-dir", str(tmp)]
    argvs["--image-dir"] = ["--dataset", "flickr8k", "--karpathy-json", str(json_path),
                            "--image-dir", str(tmp / "nope")]
    return dict(zip(argvs, run_clis(list(argvs.values()))))


def test_fraction_out_of_range_is_exit_2(bad_clis):
    for v in ("0", "1.5", "-0.5"):
        r = bad_clis[f"fraction {v}"]
        assert r.returncode == 2, r.stderr
        assert "--fraction" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError) as err:
        build_dataset("shapes", fraction=0.0)
    assert err.value.code == 2


def test_fraction_one_via_main_and_subset_sizes(tmp_path, capsys):
    json_path, image_dir = write_karpathy(tmp_path, simple_entries(20, 10, 10))
    main(["--dataset", "flickr8k", "--karpathy-json", str(json_path), "--image-dir", str(image_dir),
          "--output-dir", str(tmp_path / "full"), "--fraction", "1.0", "--image-size", "16",
          "--min-word-freq", "1", "--workers", "1"])
    assert "train 20, val 10, test 10" in capsys.readouterr().out
    a = build(json_path, image_dir, tmp_path / "a", fraction=0.3, seed=1)
    assert a["images"] == {"train": 6, "val": 3, "test": 3}
    tiny = build(json_path, image_dir, tmp_path / "b", fraction=0.01)
    assert tiny["images"] == {"train": 1, "val": 1, "test": 1}
    build(json_path, image_dir, tmp_path / "c", fraction=0.3, seed=1)
    names = [ImageDataset(tmp_path / d / "train.h5").filenames() for d in ("a", "c")]
    assert names[0] == names[1] and names[0] == sorted(names[0])  # seeded, kept in JSON order


def test_sample_captions_fills_with_replacement_and_samples_without():
    rng = random.Random(0)
    few = [["a"], ["b"]]
    filled = sample_captions(few, 5, rng)
    assert len(filled) == 5 and filled[:2] == few and all(c in few for c in filled)
    many = [[w] for w in "abcdefg"]
    for _ in range(20):
        picked = sample_captions(many, 5, rng)
        assert len(picked) == 5 and len({c[0] for c in picked}) == 5 and all(c in many for c in picked)


def test_caption_sampling_in_hdf5(tmp_path):
    entries = [{"split": "train", "captions": [["one", "x"], ["two", "x"]]},
               {"split": "train", "captions": [[w, "y"] for w in "abcdefg"]},
               {"split": "val", "captions": [["v"]]}, {"split": "test", "captions": [["t"]]}]
    json_path, image_dir = write_karpathy(tmp_path, entries)
    build(json_path, image_dir, tmp_path / "out", captions_per_image=5)
    word_map = json.loads((tmp_path / "out" / "word_map.json").read_text())
    with h5py.File(tmp_path / "out" / "train.h5") as f:
        caps = [decode(r, word_map) for r in f["captions"][()]]
    assert caps[:2] == entries[0]["captions"]  # every original caption is kept, then draws fill up
    assert all(c in entries[0]["captions"] for c in caps[:5])
    assert len({tuple(c) for c in caps[5:]}) == 5 and all(c in entries[1]["captions"] for c in caps[5:])


def test_long_captions_dropped_and_images_without_any_dropped(tmp_path):
    entries = simple_entries(3, 1, 1) + [{"split": "train", "captions": [["w"] * 9]}]
    entries[0]["captions"].append(["long"] * 9)
    json_path, image_dir = write_karpathy(tmp_path, entries)
    summary = build(json_path, image_dir, tmp_path / "out", max_len=8)
    assert summary["images"]["train"] == 3 and summary["dropped_long"]["train"] == 1
    word_map = json.loads((tmp_path / "out" / "word_map.json").read_text())
    assert "long" not in word_map and "w" not in word_map
    with h5py.File(tmp_path / "out" / "train.h5") as f:
        assert f["captions"].shape == (15, 10)
        assert ["long"] * 9 in json.loads(f["references"].asstr()[0])  # references are never cut


def test_coco_restval_is_train_and_filepath_is_followed(tmp_path):
    json_path, image_dir = write_karpathy(tmp_path, simple_entries(2, 1, 1))
    data = json.loads(json_path.read_text())
    (image_dir / "train2014").mkdir()
    for e in data["images"]:
        (image_dir / e["filename"]).rename(image_dir / "train2014" / e["filename"])
        e["filepath"] = "train2014"
    data["images"][0]["split"] = "restval"
    json_path.write_text(json.dumps(data))
    summary = build_dataset("coco", json_path, image_dir, tmp_path / "out", image_size=8, min_word_freq=1,
                            workers=1, progress=False)
    assert summary["images"] == {"train": 2, "val": 1, "test": 1}
    assert ImageDataset(tmp_path / "out" / "train.h5").filenames()[0] == "train2014/img_000.jpg"


# ---------------------------------------------------------------- HDF5 layout and reruns

def test_hdf5_layout(tiny_shapes):
    word_map = json.loads((tiny_shapes / "word_map.json").read_text())
    assert [word_map[t] for t in ("<pad>", "<start>", "<end>", "<unk>")] == [0, 1, 2, 3]
    for split, n in (("train", 48), ("val", 16), ("test", 16)):
        with h5py.File(tiny_shapes / f"{split}.h5") as f:
            assert f["images"].shape == (n, 3, 32, 32) and f["images"].dtype == np.uint8
            assert f["captions"].shape == (n * 5, 52) and f["captions"].dtype == np.int32
            assert f["caption_lengths"].shape == (n * 5,) and f["caption_lengths"].dtype == np.int32
            for key in ("filenames", "references", "meta"):
                assert f[key].shape == (n,) and h5py.check_string_dtype(f[key].dtype).encoding == "utf-8"
            attrs = dict(f.attrs)
            assert (attrs["captions_per_image"], attrs["image_size"], attrs["max_len"]) == (5, 32, 50)
            assert (attrs["dataset"], attrs["split"], attrs["vocab_size"]) == ("shapes", split, len(word_map))
            assert attrs["word_map_sha1"] == word_map_sha1(tiny_shapes / "word_map.json")
            lengths, caps = f["caption_lengths"][()], f["captions"][()]
            assert (caps[:, 0] == 1).all() and (caps[np.arange(len(caps)), lengths - 1] == 2).all()
            assert all((caps[i, lengths[i]:] == 0).all() for i in range(len(caps)))
            meta = json.loads(f["meta"].asstr()[0])
            assert set(meta) == {"objects", "relation"}


def test_rerun_overwrites_cleanly(tmp_path):
    json_path, image_dir = write_karpathy(tmp_path, simple_entries())
    build(json_path, image_dir, tmp_path / "out", captions_per_image=5)
    build(json_path, image_dir, tmp_path / "out", captions_per_image=3)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SPLIT_FILES)  # no temp files
    assert ImageDataset(tmp_path / "out" / "train.h5").attrs["captions_per_image"] == 3


# ---------------------------------------------------------------- bad input

def test_bad_images_skipped_and_named(tmp_path):
    entries = simple_entries(20, 20, 20)
    for i, name in ((0, "missing.jpg"), (20, "empty.jpg"), (40, "cut.jpg")):  # one per split: 5% each
        entries[i]["filename"] = name
    entries[1]["filename"], entries[2]["filename"] = "gray.png", "rgba.png"
    json_path, image_dir = write_karpathy(tmp_path, entries)
    (image_dir / "missing.jpg").unlink()
    (image_dir / "empty.jpg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image_dir / "cut.jpg")
    data = (image_dir / "cut.jpg").read_bytes()
    (image_dir / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.new("L", (20, 20), 90).save(image_dir / "gray.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(image_dir / "rgba.png")

    summary = build(json_path, image_dir, tmp_path / "out", workers=2)
    assert summary["images"] == {"train": 19, "val": 19, "test": 19}
    text = format_summary(summary)
    assert "skipped 3 unusable images" in text
    assert all(name in text for name in ("missing.jpg", "empty.jpg", "cut.jpg"))
    assert "gray.png" in ImageDataset(tmp_path / "out" / "train.h5").filenames()

    # A second bad image in a 20-image split is over 5%: an error, and no final file is written.
    Image.new("RGB", (8, 8)).save(image_dir / "missing.jpg")
    (image_dir / "img_003.jpg").unlink()
    (image_dir / "img_004.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as err:
        build(json_path, image_dir, tmp_path / "fail")
    assert err.value.code == 1 and "train: 2 of 20 images are unusable" in str(err.value)
    assert not (tmp_path / "fail").exists() or not list((tmp_path / "fail").iterdir())


def test_missing_json_or_image_dir_is_one_line_exit_1(bad_clis):
    for what in ("--karpathy-json", "--image-dir"):
        r = bad_clis[what]
        assert r.returncode == 1, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and what in r.stderr and "Traceback" not in r.stderr


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


# ---------------------------------------------------------------- shapes

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


# ---------------------------------------------------------------- real data

def test_flickr8k_sample_end_to_end(flickr_sample, tmp_path):
    summary = build_dataset("flickr8k", flickr_sample / "dataset_flickr8k.json", flickr_sample / "images",
                            tmp_path / "out", image_size=64, workers=2, progress=False)
    assert summary["images"] == {"train": 40, "val": 10, "test": 10}
    assert not any(summary["skipped"].values())
    source = {e["filename"]: [s["tokens"] for s in e["sentences"]]
              for e in json.loads((flickr_sample / "dataset_flickr8k.json").read_text())["images"]}
    for split in ("train", "val", "test"):
        ds = ImageDataset(tmp_path / "out" / f"{split}.h5")
        assert ds.references() == [source[name] for name in ds.filenames()]
        assert ds.meta() == [{}] * len(ds) and ds.attrs["image_size"] == 64
        x = to_model_input(ds[0][0].unsqueeze(0), "cpu")[0]  # (3, S, S) float32
        assert x.shape == (3, 64, 64) and 0.1 < x.std() < 5  # a real photo, normalised
