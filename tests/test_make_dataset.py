"""make_dataset.py: a Karpathy split JSON and its images -> word_map.json and train/val/test HDF5 files."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import (
    SPLIT_FILES,
    TEMP_NAME,
    kill_when,
    make_odd_images,
    one_line,
    run_script,
    sha1,
    size,
    start_script,
    temps,
    write_karpathy,
)
from PIL import Image

from cli import UserError
from make_dataset import build_dataset, format_summary, main, sample_captions
from pytorch_dataset_class import ImageDataset, Vocab, read_attrs, to_model_input

# ---------------------------------------------------------------- helpers

def simple_entries(n_train: int = 4, n_val: int = 2, n_test: int = 2) -> list[dict]:
    return [{"split": s, "captions": [["a", "dog"], ["a", "cat", "runs"]]}
            for s, n in (("train", n_train), ("val", n_val), ("test", n_test)) for _ in range(n)]


def build(json_path: Path, image_dir: Path, out: Path, **kwargs) -> dict:
    options = dict(image_size=16, min_word_freq=1, workers=1, progress=False)
    options.update(kwargs)
    return build_dataset("flickr8k", json_path, image_dir, out, **options)



def two_captions(files: dict[str, list[str]]) -> list[dict]:
    """write_karpathy entries naming `files` per split, two short captions each (no images are made)."""
    return [{"split": split, "filename": name, "captions": [["a", "thing"], ["a", "b"]]}
            for split, names in files.items() for name in names]


def decode(row: np.ndarray, word_map: dict[str, int]) -> list[str]:
    """Caption row (L,) -> tokens between <start> and <end>."""
    return Vocab(word_map).decode(row.tolist())



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
        assert read_attrs(f)["word_map_sha1"] == Vocab.hash(tmp_path / "out" / "word_map.json")



def test_fraction_out_of_range_is_exit_2():
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
            attrs = read_attrs(f)
            assert (attrs["captions_per_image"], attrs["image_size"], attrs["max_len"]) == (5, 32, 50)
            assert (attrs["dataset"], attrs["split"], attrs["vocab_size"]) == ("shapes", split, len(word_map))
            assert attrs["word_map_sha1"] == Vocab.hash(tiny_shapes / "word_map.json")
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
    assert err.value.code == 1 and "train: at least 2 of 20 images are unusable" in str(err.value)
    assert not (tmp_path / "fail").exists() or not list((tmp_path / "fail").iterdir())



def test_missing_json_or_image_dir_is_one_line_exit_1(tmp_path):
    json_path, _ = write_karpathy(tmp_path, simple_entries(), make_images=False)
    argvs = {"--karpathy-json": ["--dataset", "flickr8k", "--karpathy-json", tmp_path / "no.json",
                                 "--image-dir", tmp_path],
             "--image-dir": ["--dataset", "flickr8k", "--karpathy-json", json_path, "--image-dir", tmp_path / "nope"]}
    for what, argv in argvs.items():
        r = run_script("make_dataset.py", *argv)
        assert r.rc == 1, r.err
        assert len(r.err.strip().splitlines()) == 1 and what in r.err and "Traceback" not in r.err


def test_make_dataset_keeps_odd_images_and_names_unusable_ones(tmp_path: Path) -> None:
    """Through the command line: 1x1, 16-bit, CMYK, RGBA and palette images are kept; a non-image file
    named .jpg is skipped and named in the summary; nothing else reaches stderr. (Missing, zero-byte and
    truncated images: test_bad_images_skipped_and_named; the 12000 x 12000 image goes through the same
    preprocess_image in tests/test_inference.py::test_inference_captions_every_kind_of_image.)"""
    image_dir = tmp_path / "images"
    odd = [p.name for p in make_odd_images(image_dir, big=False)]
    plain = []
    for i in range(16):
        Image.new("RGB", (24, 16), (10 * i, 100, 200)).save(image_dir / f"plain_{i}.jpg")
        plain.append(f"plain_{i}.jpg")
    (image_dir / "text.jpg").write_text("not an image\n")
    json_path, _ = write_karpathy(tmp_path, two_captions({"train": odd + plain[:14] + ["text.jpg"],
                                                          "val": plain[14:15], "test": plain[15:]}), make_images=False)
    out = tmp_path / "out"
    r = run_script("make_dataset.py", "--dataset", "flickr8k", "--karpathy-json", json_path, "--image-dir",
                   image_dir, "--output-dir", out, "--image-size", "16", "--min-word-freq", "1", "--workers", "1")
    assert r.rc == 0 and r.err.strip() == "", str(r)  # no progress bars (not a terminal), no warnings
    assert "images: train 19, val 1, test 1" in r.out and "skipped 1 unusable images" in r.out, str(r)
    assert f"{image_dir / 'text.jpg'}: cannot read image" in r.out
    assert ImageDataset(out / "train.h5").filenames()[:len(odd)] == odd


@pytest.mark.parametrize("kind", ["no_images", "truncated_json"])
def test_make_dataset_bad_input_is_one_line(tmp_path: Path, kind: str) -> None:
    """A folder with no images (every file missing) or a truncated Karpathy JSON: one line, exit 1."""
    names = [f"img_{i}.jpg" for i in range(24)]
    json_path, image_dir = write_karpathy(tmp_path, two_captions({"train": names[:20], "val": names[20:22],
                                                                  "test": names[22:]}), make_images=False)
    if kind == "truncated_json":
        for name in names:
            Image.new("RGB", (8, 8)).save(image_dir / name)
        json_path.write_text(json_path.read_text()[:100])
    r = run_script("make_dataset.py", "--dataset", "flickr8k", "--karpathy-json", json_path, "--image-dir",
                   image_dir, "--output-dir", tmp_path / "out", "--workers", "1")
    if kind == "no_images":
        one_line(r, 1, f"--image-dir {image_dir}", image_dir / "img_0.jpg", "image not found")
    else:
        one_line(r, 1, json_path, "not a Karpathy split JSON")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------- SIGKILL

def test_sigkill_make_dataset_leaves_no_half_written_file_and_rerun_completes(tmp_path: Path) -> None:
    out, raw = tmp_path / "out", tmp_path / "raw"
    args = ["--dataset", "shapes", "--shapes-train", "600", "--shapes-val", "20", "--shapes-test", "20",
            "--image-size", "32", "--workers", "1", "--min-word-freq", "1", "--raw-dir", raw, "--output-dir", out]

    def mid_way(proc: subprocess.Popen) -> bool:  # the train split is being written: about 100 images in
        return out.is_dir() and any(size(p) > 300_000 for p in temps(out, proc.pid, ("train.h5",)))

    # 1. killed mid-way into a fresh folder: no file under a final name
    first = start_script("make_dataset.py", *args, log=tmp_path / "first")
    assert kill_when(first, lambda: mid_way(first)), (tmp_path / "first.err").read_text()[-3000:]
    assert not any((out / name).exists() for name in SPLIT_FILES), sorted(p.name for p in out.iterdir())
    assert temps(out, first.pid), "killed before it wrote anything: not mid-way"
    assert all(TEMP_NAME.match(p.name) for p in out.iterdir())  # hidden temporaries only
    # 2. the rerun completes and deletes the killed run's temporary files
    r = run_script("make_dataset.py", *args)
    assert r.rc == 0, str(r)
    assert "removed" in r.out and "temporary files a killed run had left" in r.out, r.out
    assert sorted(p.name for p in out.iterdir()) == sorted(SPLIT_FILES)
    before = {name: sha1(out / name) for name in SPLIT_FILES}
    # 3. a run over those complete files, killed mid-way, leaves them as they were, and readable
    third = start_script("make_dataset.py", *args[:-2], "--seed", "1", "--output-dir", out, log=tmp_path / "third")
    assert kill_when(third, lambda: mid_way(third)), (tmp_path / "third.err").read_text()[-3000:]
    assert {name: sha1(out / name) for name in SPLIT_FILES} == before
    for split, n in (("train", 600), ("val", 20), ("test", 20)):
        ds = ImageDataset(out / f"{split}.h5")
        assert len(ds) == n and ds.attrs["word_map_sha1"] == before["word_map.json"]


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


# ---------------------------------------------------------------- every field of the Karpathy JSON

def _set(path: list, value):
    """A mutation of the Karpathy JSON: data[path...] = value."""
    def mutate(data: dict) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


WRONG_FIELDS = {  # name: (mutation, what the error line says)
    "token_number": (_set(["images", 0, "sentences", 0, "tokens", 1], 7),
                     "image 0 ('img_000.jpg'): sentence 0: token 1 is int"),
    "token_null": (_set(["images", 2, "sentences", 1, "tokens", 0], None),
                   "image 2 ('img_002.jpg'): sentence 1: token 0 is NoneType"),
    "token_list": (_set(["images", 1, "sentences", 0, "tokens", 0], ["a", ["b"]]),
                   "image 1 ('img_001.jpg'): sentence 0: token 0 is list"),
    "tokens_string": (_set(["images", 0, "sentences", 0, "tokens"], "a dog"), "sentence 0 has no list of tokens"),
    "sentence_string": (_set(["images", 0, "sentences", 0], "a dog"), "sentence 0 has no list of tokens"),
    "sentences_missing": (lambda d: d["images"][3].pop("sentences"), "image 3 ('img_003.jpg'): no 'sentences'"),
    "sentences_dict": (_set(["images", 0, "sentences"], {"tokens": ["a"]}), "sentences is dict, not a list"),
    "split_number": (_set(["images", 0, "split"], 1), "split is int, not a string"),
    "filename_null": (_set(["images", 0, "filename"], None), "image 0: filename is NoneType"),
    "filepath_number": (_set(["images", 0, "filepath"], 2014), "filepath is int"),
    "image_string": (_set(["images", 4], "img_004.jpg"), "image 4: is str, not an object"),
    "images_dict": (_set(["images"], {"0": {}}), '"images" is dict, not a list'),
}


@pytest.mark.parametrize("kind", WRONG_FIELDS)
def test_karpathy_json_field_of_the_wrong_type_is_one_line(tmp_path: Path, kind: str) -> None:
    """Tokens that are not all strings, an image that is not an object, a split that is not a string...: one line
    naming the JSON and the image, exit 1, nothing written."""
    mutate, needle = WRONG_FIELDS[kind]
    json_path, image_dir = write_karpathy(tmp_path, simple_entries())
    data = json.loads(json_path.read_text())
    mutate(data)
    json_path.write_text(json.dumps(data))
    r = run_script("make_dataset.py", "--dataset", "flickr8k", "--karpathy-json", json_path, "--image-dir", image_dir,
                   "--output-dir", tmp_path / "out", "--workers", "0", mode="in_process")
    one_line(r, 1, json_path, needle)
    assert not (tmp_path / "out").exists()


NOT_UTF8 = os.fsdecode(b"caf\xe9")  # Latin-1 bytes on disk: not valid UTF-8, a lone surrogate in Python


def test_file_names_not_valid_utf8(tmp_path: Path) -> None:
    """On a strict UTF-8 terminal: a file that is not valid UTF-8 in the image folder but not in the JSON changes
    nothing; the summary naming such a path (an unusable image in such a folder) prints it escaped; a JSON entry
    naming such a file (json's "\\udce9") is refused in one line, never a UnicodeEncodeError traceback."""
    image_dir = tmp_path / f"photos_{NOT_UTF8}"
    json_path, _ = write_karpathy(tmp_path, simple_entries(20, 2, 2))
    (tmp_path / "images").rename(image_dir)
    (image_dir / f"{NOT_UTF8}.jpg").write_bytes((image_dir / "img_000.jpg").read_bytes())  # not in the JSON
    (image_dir / "img_005.jpg").unlink()  # unusable: named in the summary, with the folder's name
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    args = ["--dataset", "flickr8k", "--karpathy-json", json_path, "--image-dir", image_dir, "--output-dir",
            tmp_path / "out", "--image-size", "16", "--min-word-freq", "1", "--workers", "0"]
    r = run_script("make_dataset.py", *args, mode="fresh", env=strict)
    assert r.rc == 0 and r.err == "", str(r)
    assert "images: train 19, val 2, test 2" in r.out and "photos_caf\\udce9/img_005.jpg: image not found" in r.out

    data = json.loads(json_path.read_text())
    data["images"][1]["filename"] = f"{NOT_UTF8}.jpg"
    json_path.write_text(json.dumps(data))  # ensure_ascii: "caf\udce9.jpg"
    r = run_script("make_dataset.py", *args, mode="fresh", env=strict)
    one_line(r, 1, "image 1 ('caf\\udce9.jpg'): filename is 'caf\\udce9.jpg', not valid UTF-8")


# ---------------------------------------------------------------- outputs never replace inputs

def test_output_dir_that_would_replace_an_input_or_is_a_file(tmp_path: Path) -> None:
    """--output-dir holding the Karpathy JSON under an output's name, or an image named like one; --output-dir
    or --raw-dir that is a file: refused in one line before any work, the inputs untouched."""
    json_path, image_dir = write_karpathy(tmp_path, simple_entries())
    out = tmp_path / "out"
    out.mkdir()
    as_word_map = out / "word_map.json"
    as_word_map.write_bytes(json_path.read_bytes())
    base = ["--dataset", "flickr8k", "--image-size", "16", "--min-word-freq", "1", "--workers", "0"]
    r = run_script("make_dataset.py", *base, "--karpathy-json", as_word_map, "--image-dir", image_dir,
                   "--output-dir", out, mode="in_process")
    one_line(r, 2, f"--output-dir {out}", f"would replace the input {as_word_map}")
    assert as_word_map.read_bytes() == json_path.read_bytes() and sorted(out.iterdir()) == [as_word_map]

    data = json.loads(json_path.read_text())
    data["images"][0]["filename"] = "train.h5"
    json_path.write_text(json.dumps(data))
    (image_dir / "img_000.jpg").rename(image_dir / "train.h5")
    r = run_script("make_dataset.py", *base, "--karpathy-json", json_path, "--image-dir", image_dir,
                   "--output-dir", image_dir, mode="in_process")
    one_line(r, 2, f"would replace the input {image_dir / 'train.h5'}")
    with Image.open(image_dir / "train.h5") as im:
        assert im.format == "JPEG"

    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    for option in ("--output-dir", "--raw-dir"):
        folders = {"--raw-dir": tmp_path / "raw", "--output-dir": tmp_path / "o2", option: blocker}
        r = run_script("make_dataset.py", "--shapes-train", "4", "--shapes-val", "2", "--shapes-test", "2",
                       "--workers", "0", *(x for pair in folders.items() for x in pair), mode="in_process")
        one_line(r, 1, f"{option} {blocker}: cannot write there", "is a file, not a folder")
        assert blocker.read_text() == "keep me\n" and not (tmp_path / "o2").exists()


def test_every_dataset_is_written_with_checksums(tiny_shapes: Path) -> None:
    """fletcher32 on every dataset, HDF5 1.10's format (checksummed metadata), no variable-length string (the
    global heap that holds them has no checksum): damage is detectable (tests/test_pytorch_dataset_class.py and
    tests/test_errors.py damage files)."""
    for split in ("train", "val", "test"):
        with h5py.File(tiny_shapes / f"{split}.h5") as f:
            assert sorted(f) == ["caption_lengths", "captions", "filenames", "images", "meta", "references"]
            assert all(f[k].fletcher32 for k in f)
            assert f.id.get_create_plist().get_version()[0] >= 2  # superblock 2+: checksummed metadata
            dtypes = [f[k].dtype for k in f] + [f.attrs.get_id(k).dtype for k in f.attrs]
            assert all(h5py.check_string_dtype(t) is None or h5py.check_string_dtype(t).length for t in dtypes)
        assert b"GCOL" not in (tiny_shapes / f"{split}.h5").read_bytes()  # no global heap at all
