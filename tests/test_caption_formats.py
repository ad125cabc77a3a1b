"""caption_formats.py through make_dataset.py: every caption format gives the dataset Karpathy's JSON gives, and
every mistake in a caption file is one line naming the file and the line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import SPLIT_FILES, one_line, run_script
from PIL import Image

from caption_formats import CaptionInput, detect_format, read_captions, seeded_split, tokenize
from cli import UserError
from make_dataset import build_dataset
from pytorch_dataset_class import ImageDataset

OTHER = "other-formats"
TOKEN, KAGGLE, COCO = "Flickr8k.token.txt", "captions.txt", "captions_coco_format.json"
LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
OPTIONS = dict(image_size=16, min_word_freq=1, workers=0, progress=False)


def build(out: Path, image_dir: Path, captions: CaptionInput | None = None, karpathy: Path | None = None) -> dict:
    return build_dataset("flickr8k", karpathy, image_dir, out, captions=captions, **OPTIONS)


def contents(folder: Path) -> dict:
    """Everything make_dataset wrote: the word map's bytes, and each split's datasets and attributes."""
    found: dict = {"word_map.json": (folder / "word_map.json").read_bytes()}
    for split in ("train", "val", "test"):
        with h5py.File(folder / f"{split}.h5") as f:
            found[split] = {k: f[k][()] for k in f} | {"attrs": dict(f.attrs)}
    return found


def assert_same(a: dict, b: dict) -> None:
    assert a["word_map.json"] == b["word_map.json"]
    for split in ("train", "val", "test"):
        assert sorted(a[split]) == sorted(b[split])
        for key, value in a[split].items():
            if key == "attrs":
                assert value.keys() == b[split][key].keys()
                assert all(np.array_equal(value[k], b[split][key][k]) for k in value), key
            else:
                assert value.dtype == b[split][key].dtype and np.array_equal(value, b[split][key]), (split, key)


@pytest.fixture(scope="module")
def karpathy_built(flickr_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sample built from Karpathy's JSON: what every other format must give."""
    out = tmp_path_factory.mktemp("karpathy")
    build(out, flickr_sample / "images", karpathy=flickr_sample / "dataset_flickr8k.json")
    return contents(out)


@pytest.fixture(scope="module")
def sample_jsonl(flickr_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's raw captions as JSON lines, one image a line, in the token file's order."""
    images = json.loads((flickr_sample / "dataset_flickr8k.json").read_text())["images"]
    path = tmp_path_factory.mktemp("jsonl") / "captions.jsonl"
    path.write_text("".join(json.dumps({"image": im["filename"], "captions": [s["raw"] for s in im["sentences"]]})
                            + "\n" for im in sorted(images, key=lambda im: im["filename"])))
    return path


# ---------------------------------------------------------------- the same data from every format

def test_tokenizer_reproduces_karpathys_tokens(flickr_sample: Path) -> None:
    """All 300 raw captions of the sample tokenise to Karpathy's `tokens`: lower case, punctuation gone, hyphens
    and "'s" split off as he did."""
    images = json.loads((flickr_sample / "dataset_flickr8k.json").read_text())["images"]
    sentences = [s for im in images for s in im["sentences"]]
    assert len(sentences) == 300
    assert [tokenize(s["raw"]) for s in sentences] == [s["tokens"] for s in sentences]
    assert tokenize("A man in a t-shirt , at someone 's café .") == ["a", "man", "in", "a", "t", "shirt", "at",
                                                                     "someone", "s", "café"]


@pytest.mark.parametrize("fmt", ["flickr-token", "csv", "coco", "jsonl"])
def test_each_format_with_the_split_lists_gives_karpathys_dataset(fmt: str, flickr_sample: Path, karpathy_built: dict,
                                                                  sample_jsonl: Path, tmp_path: Path) -> None:
    """The token file (its split lists found beside it), the CSV, COCO's JSON and JSON lines (split lists given):
    images, captions, lengths, file names, references, attributes and word map exactly as from Karpathy's JSON."""
    other = flickr_sample / OTHER
    lists = {split: other / name for split, name in LISTS.items()}
    source = {"flickr-token": CaptionInput((other / TOKEN,)),
              "csv": CaptionInput((other / KAGGLE,), split_lists=lists),
              "coco": CaptionInput((other / COCO,), split_lists=lists),
              "jsonl": CaptionInput((sample_jsonl,), split_lists=lists)}[fmt]
    summary = build(tmp_path / "out", flickr_sample / "images", source)
    assert summary["split_from"].startswith("split lists train=Flickr_8k.trainImages.txt")
    assert_same(contents(tmp_path / "out"), karpathy_built)


@pytest.mark.parametrize("fmt", ["csv", "coco", "jsonl"])
def test_formats_without_a_split_get_a_seeded_one(fmt: str, flickr_sample: Path, sample_jsonl: Path,
                                                  tmp_path: Path) -> None:
    """Without split lists: every image once, with all its captions, in a split drawn by --split-seed; the same
    seed gives the same split, another seed another one."""
    path = {"csv": flickr_sample / OTHER / KAGGLE, "coco": flickr_sample / OTHER / COCO, "jsonl": sample_jsonl}[fmt]
    expected = {im["filename"]: [s["tokens"] for s in im["sentences"]]
                for im in json.loads((flickr_sample / "dataset_flickr8k.json").read_text())["images"]}
    splits = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        summary = build(tmp_path / run, flickr_sample / "images", CaptionInput((path,), split_seed=seed))
        assert summary["images"] == {"train": 48, "val": 6, "test": 6}  # the default: 10% each
        datasets = {s: ImageDataset(tmp_path / run / f"{s}.h5") for s in ("train", "val", "test")}
        splits[run] = {s: ds.filenames() for s, ds in datasets.items()}
        found = {name: refs for ds in datasets.values() for name, refs in zip(ds.filenames(), ds.references())}
        assert found == expected
    assert splits["a"] == splits["b"] and splits["a"]["test"] != splits["c"]["test"]
    assert contents(tmp_path / "a")["word_map.json"] == contents(tmp_path / "b")["word_map.json"]


def test_seeded_split_sizes_and_order() -> None:
    """A count or a fraction (at least 1) per held-out split; each split keeps the file's order."""
    images = [f"{i:02d}.jpg" for i in range(40)]
    split = seeded_split(images, 5, 0.25, seed=3)
    assert [len(split[s]) for s in ("train", "val", "test")] == [25, 5, 10]
    assert sorted(sum(split.values(), [])) == images and all(split[s] == sorted(split[s]) for s in split)
    assert [len(v) for v in seeded_split(images[:3], 0.01, 0.01, seed=0).values()] == [1, 1, 1]
    with pytest.raises(UserError, match="leave no train images of 3"):
        seeded_split(images[:3], 1, 2, seed=0)


def test_detects_each_format(flickr_sample: Path, sample_jsonl: Path, tmp_path: Path) -> None:
    """From the name (.json, .jsonl, .csv, .tsv), else the first line: Kaggle's captions.txt is CSV; JSON lines
    named .txt are JSON lines; a token file is one; Karpathy's and COCO's JSON are told apart by their keys."""
    other = flickr_sample / OTHER
    as_txt = tmp_path / "lines.txt"
    shutil.copy(sample_jsonl, as_txt)
    for path, fmt in ((other / TOKEN, "flickr-token"), (other / KAGGLE, "csv"), (as_txt, "jsonl"),
                      (sample_jsonl, "jsonl"), (other / COCO, "json")):
        assert detect_format(path, path.read_text()) == fmt, path
    for path, split_from in ((other / COCO, "seeded"), (flickr_sample / "dataset_flickr8k.json", "Karpathy JSON")):
        found = read_captions(CaptionInput((path,)), max_len=50)
        assert found.split_from.startswith(split_from) and sum(map(len, found.splits.values())) == 60


def test_csv_delimiters_and_named_columns(tmp_path: Path) -> None:
    """TSV, and Kaggle's Flickr30k results.csv (`image_name| comment_number| comment`) with --image-column and
    --caption-column; quoted captions may hold the delimiter."""
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("caption\tfile\nA dog runs .\ta.jpg\n\"Two, or three\"\tb.jpg\nA cat .\tc.jpg\n")
    found = read_captions(CaptionInput((tsv,), image_column="file", val_size=1, test_size=1), max_len=50)
    refs = {e.filename: e.references for entries in found.splits.values() for e in entries}
    assert refs == {"a.jpg": [["a", "dog", "runs"]], "b.jpg": [["two", "or", "three"]], "c.jpg": [["a", "cat"]]}
    piped = tmp_path / "results.csv"
    piped.write_text("image_name| comment_number| comment\n1.jpg| 0| A girl .\n1.jpg| 1| A child !\n"
                     "2.jpg| 0| A boat .\n3.jpg| 0| Sky\n")
    found = read_captions(CaptionInput((piped,), image_column="image_name", caption_column="comment", val_size=1,
                                       test_size=1, split_seed=5), max_len=50)
    refs = {e.filename: e.references for entries in found.splits.values() for e in entries}
    assert refs == {"1.jpg": [["a", "girl"], ["a", "child"]], "2.jpg": [["a", "boat"]], "3.jpg": [["sky"]]}


def test_coco_files_merge_and_find_their_folders(flickr_sample: Path, tmp_path: Path) -> None:
    """COCO's train2014 + val2014 annotations read as one; `captions_<folder>.json` looks for its images in
    <image-dir>/<folder>/ when that folder exists, as Karpathy's COCO JSON names them."""
    doc = json.loads((flickr_sample / OTHER / COCO).read_text())
    images = tmp_path / "images"
    files = []
    for folder, part in (("train2014", doc["images"][:45]), ("val2014", doc["images"][45:])):
        (images / folder).mkdir(parents=True)
        for im in part:
            shutil.copy(flickr_sample / "images" / im["file_name"], images / folder)
        ids = {im["id"] for im in part}
        files.append(tmp_path / f"captions_{folder}.json")
        files[-1].write_text(json.dumps({"images": part, "annotations": [a for a in doc["annotations"]
                                                                          if a["image_id"] in ids]}))
    summary = build(tmp_path / "out", images, CaptionInput(tuple(files)))
    assert summary["images"] == {"train": 48, "val": 6, "test": 6} and not any(summary["skipped"].values())
    names = [n for s in ("train", "val", "test") for n in ImageDataset(tmp_path / "out" / f"{s}.h5").filenames()]
    assert sorted(names) == sorted([f"train2014/{im['file_name']}" for im in doc["images"][:45]]
                                   + [f"val2014/{im['file_name']}" for im in doc["images"][45:]])


# ---------------------------------------------------------------- your own photos: mistakes and repeats

def photos(root: Path, n: int) -> Path:
    """n small JPEGs p00.jpg... in root/photos."""
    folder = root / "photos"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (24, 16), (10 * i, 100, 200)).save(folder / f"p{i:02d}.jpg")
    return folder


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("image", "caption")) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def own(tmp_path: Path, *args: str | Path, dataset: str = "mine") -> object:
    """make_dataset.py on the photos in tmp_path/photos, output to tmp_path/out."""
    return run_script("make_dataset.py", "--dataset", dataset, "--image-dir", tmp_path / "photos", "--output-dir",
                      tmp_path / "out", "--image-size", "16", "--min-word-freq", "1", "--workers", "0", *args,
                      mode="in_process")


def two_rows(names: list[str]) -> list[tuple[str, str]]:
    return [(name, caption) for name in names for caption in ("A red thing .", "Something blue")]


def test_own_csv_end_to_end_with_a_name_of_its_own(tmp_path: Path) -> None:
    photos(tmp_path, 20)
    rows = two_rows([f"p{i:02d}.jpg" for i in range(20)])
    r = own(tmp_path, "--captions", write_csv(tmp_path / "captions.csv", rows), "--val-size", "2", "--test-size", "3",
            dataset="my-photos_v1.0")
    assert r.rc == 0 and r.err == "", str(r)
    assert "images: train 15, val 2, test 3" in r.out and "splits: seeded (--split-seed 0)" in r.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SPLIT_FILES)
    assert ImageDataset(tmp_path / "out" / "test.h5").attrs["dataset"] == "my-photos_v1.0"


def test_caption_rows_for_missing_images_are_skipped_up_to_the_limit(tmp_path: Path) -> None:
    """A caption row whose image is not on disk: skipped and named in the summary, like an unreadable image; more
    than 5% of a split is an error and nothing is written."""
    photos(tmp_path, 24)
    names = [f"p{i:02d}.jpg" for i in range(24)]
    (tmp_path / "train.txt").write_text("\n".join(names[:20] + ["gone.jpg"]) + "\n")
    (tmp_path / "val.txt").write_text("p20.jpg\np21.jpg\n")
    (tmp_path / "test.txt").write_text("p22.jpg\np23.jpg\n")
    csv_path = write_csv(tmp_path / "captions.csv", two_rows(names + ["gone.jpg"]))
    lists = ["--split-lists", f"train={tmp_path / 'train.txt'}", f"val={tmp_path / 'val.txt'}",
             f"test={tmp_path / 'test.txt'}"]
    r = own(tmp_path, "--captions", csv_path, *lists)
    assert r.rc == 0 and r.err == "", str(r)
    assert "images: train 20, val 2, test 2" in r.out and "skipped 1 unusable images" in r.out
    assert f"{tmp_path / 'photos' / 'gone.jpg'}: image not found" in r.out
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "photos" / "p03.jpg").unlink()
    one_line(own(tmp_path, "--captions", csv_path, *lists), 1, "train: 2 of 21 images are unusable")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def karpathy_json(path: Path, splits: list[tuple[str, str]]) -> Path:
    """A Karpathy JSON listing (filename, split) pairs, one caption each."""
    images = [{"filename": name, "split": split, "sentences": [{"tokens": ["a", "photo"]}]} for name, split in splits]
    path.write_text(json.dumps({"images": images}))
    return path


def coco_json(path: Path, n_images: int, captioned: int) -> Path:
    images = [{"id": i, "file_name": f"p{i:02d}.jpg"} for i in range(n_images)]
    path.write_text(json.dumps({"images": images, "annotations": [{"id": i, "image_id": i, "caption": "A photo ."}
                                                                  for i in range(captioned)]}))
    return path


# name: (what writes the files, make_dataset's arguments after --captions, what the error line says)
BAD = {
    "csv_columns": (lambda d: write_csv(d / "c.csv", two_rows(["p00.jpg"]), ("file", "text")), ["c.csv"],
                    "c.csv: no column 'image' or 'caption'; its header has 'file', 'text'"),
    "csv_empty_caption": (lambda d: write_csv(d / "c.csv", two_rows(["p00.jpg"]) + [("p01.jpg", "  ")]), ["c.csv"],
                          "c.csv: line 4: empty caption for 'p01.jpg'"),
    "csv_wordless_caption": (lambda d: write_csv(d / "c.csv", [("p00.jpg", "?!")]), ["c.csv"],
                             "c.csv: line 2: the caption '?!' of 'p00.jpg' has no words"),
    "csv_unquoted_delimiter": (lambda d: (d / "c.csv").write_text("image,caption\np00.jpg,A dog , a ball\n"),
                               ["c.csv"], "c.csv: line 2: 3 fields, the header has 2"),
    "token_empty_caption": (lambda d: (d / "t.txt").write_text("p00.jpg#0\tA dog .\np00.jpg#1\t\n"), ["t.txt"],
                            "t.txt: line 2: empty caption for 'p00.jpg'"),
    "token_bad_line": (lambda d: (d / "t.txt").write_text("p00.jpg#0\tA dog .\np00.jpg A cat\n"),
                       ["t.txt", "--format", "flickr-token"], "t.txt: line 2: expected <image>#<n><TAB><caption>"),
    "jsonl_empty_caption": (lambda d: (d / "c.jsonl").write_text('{"image": "p00.jpg", "captions": ["A", ""]}\n'),
                            ["c.jsonl"], "c.jsonl: line 1: empty caption for 'p00.jpg'"),
    "jsonl_no_caption": (lambda d: (d / "c.jsonl").write_text('{"image": "p00.jpg"}\n'), ["c.jsonl"],
                         'c.jsonl: line 1: expected {"image": ..., "caption": "..."}'),
    "coco_image_without_captions": (lambda d: coco_json(d / "c.json", 20, 19), ["c.json"],
                                    "c.json: images[19] ('p19.jpg') has no captions in annotations[]"),
    "coco_unknown_image_id": (lambda d: (d / "c.json").write_text(json.dumps(
        {"images": [], "annotations": [{"image_id": 7, "caption": "A dog"}]})), ["c.json"],
        "c.json: annotations[0]: image_id 7 is not in images[]"),
    "listed_without_captions": (lambda d: (write_csv(d / "c.csv", two_rows(["p00.jpg", "p01.jpg"])),
                                           (d / "v.txt").write_text("p00.jpg\n"),
                                           (d / "t.txt").write_text("\np02.jpg\n")),
                                ["c.csv", "--split-lists", "val=v.txt", "test=t.txt"],
                                "t.txt: line 2: 'p02.jpg' has no captions in c.csv"),
    "listed_in_two_splits": (lambda d: (write_csv(d / "c.csv", two_rows(["p00.jpg", "p01.jpg", "p02.jpg"])),
                                        (d / "v.txt").write_text("p01.jpg\n"),
                                        (d / "t.txt").write_text("p02.jpg\np01.jpg\n")),
                             ["c.csv", "--split-lists", "val=v.txt", "test=t.txt"],
                             "t.txt: line 2: 'p01.jpg' is in test, and in val at v.txt: line 1"),
    "karpathy_in_two_splits": (lambda d: karpathy_json(d / "k.json", [("p00.jpg", "train"), ("p01.jpg", "val"),
                                                                      ("p02.jpg", "test"), ("p00.jpg", "test")]),
                               ["k.json"], "k.json: image 3: 'p00.jpg' is in test, and in train as image 0: an image "
                                           "in two splits leaks held-out images into training"),
    "unknown_format": (lambda d: (d / "c.txt").write_text("p00.jpg A dog\n"), ["c.txt"],
                       "c.txt: cannot tell its format; the formats are karpathy, flickr-token, csv, coco, jsonl "
                       "(docs/your_data.md): force one with --format"),
    "neither_json": (lambda d: (d / "c.json").write_text('{"photos": []}'), ["c.json"],
                     "c.json: JSON, but neither Karpathy's split JSON"),
    "not_utf8": (lambda d: (d / "c.csv").write_bytes(b"image,caption\np00.jpg,caf\xe9\n"), ["c.csv"],
                 "c.csv: line 2: not UTF-8 text (byte 0xe9)"),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_caption_file_is_one_line_and_writes_nothing(kind: str, tmp_path: Path, monkeypatch) -> None:
    write, args, needle = BAD[kind]
    photos(tmp_path, 20)
    write(tmp_path)
    monkeypatch.chdir(tmp_path)  # the files are named relative to it
    one_line(own(tmp_path, "--captions", *args), 1, needle)
    assert not (tmp_path / "out").exists()


def test_repeats_are_kept_once_with_one_warning(tmp_path: Path) -> None:
    """The same (image, caption) row twice, or an image listed twice in one split of a Karpathy JSON: one warning
    line on stderr, one copy kept, exit 0."""
    photos(tmp_path, 20)
    names = [f"p{i:02d}.jpg" for i in range(20)]
    rows = two_rows(names)
    r = own(tmp_path, "--captions", write_csv(tmp_path / "c.csv", rows[:5] + rows[:3] + rows[5:]))
    assert r.rc == 0 and r.err.count("\n") == 1, str(r)
    first = f"{tmp_path / 'c.csv'}: line 7 ('p00.jpg')"
    assert f"make_dataset.py: warning: 3 repeated (image, caption) rows kept once, the first at {first}" in r.err
    refs = {}
    for split in ("train", "val", "test"):
        ds = ImageDataset(tmp_path / "out" / f"{split}.h5")
        refs.update(zip(ds.filenames(), ds.references()))
    assert refs == {n: [["a", "red", "thing"], ["something", "blue"]] for n in names}

    shutil.rmtree(tmp_path / "out")
    pairs = [(n, "train") for n in names[:16]] + [(names[16], "val"), (names[17], "test"), (names[3], "train"),
                                                  (names[3], "train")]
    r = own(tmp_path, "--karpathy-json", karpathy_json(tmp_path / "k.json", pairs))
    assert r.rc == 0 and r.err.count("\n") == 1, str(r)
    assert "warning: 2 images listed twice in one split kept once, the first at" in r.err and "image 18" in r.err
    assert "images: train 16, val 1, test 1" in r.out


def test_split_lists_without_train_and_split_options_that_do_not_apply(tmp_path: Path, monkeypatch) -> None:
    """--split-lists val=... test=...: every other image is train. A seeded split's sizes given for a Karpathy JSON,
    or for split lists, or a dataset name that is not a safe folder name: one line, exit 2."""
    photos(tmp_path, 20)
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "c.csv", two_rows([f"p{i:02d}.jpg" for i in range(20)]))
    (tmp_path / "v.txt").write_text("p05.jpg\n")
    (tmp_path / "t.txt").write_text("p07.jpg\np09.jpg\n")
    r = own(tmp_path, "--captions", "c.csv", "--split-lists", "val=v.txt", "test=t.txt")
    assert r.rc == 0 and "images: train 17, val 1, test 2" in r.out, str(r)
    assert ImageDataset(tmp_path / "out" / "test.h5").filenames() == ["p07.jpg", "p09.jpg"]
    karpathy = karpathy_json(tmp_path / "k.json", [("p00.jpg", "train"), ("p01.jpg", "val"), ("p02.jpg", "test")])
    for args, needle in ((["--captions", karpathy, "--test-size", "3"],
                          "--test-size: Karpathy's JSON has its own split"),
                         (["--captions", "c.csv", "--split-lists", "val=v.txt", "test=t.txt", "--val-size", "2"],
                          "the split lists give the split"),
                         (["--karpathy-json", karpathy, "--val-size", "2"], "--val-size: only with --captions"),
                         (["--captions", "c.csv", "--val-size", "1.5"], "a fraction in (0, 1), got 1.5"),
                         (["--captions", "c.csv", "--split-lists", "val=v.txt"], "give val=FILE and test=FILE")):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        one_line(own(tmp_path, *args), 2, needle)
        assert not (tmp_path / "out").exists()
    for name in ("../up", "a/b", "..", "-x", "x" * 65, "café"):
        one_line(own(tmp_path, "--captions", "c.csv", dataset=name), 2, "argument --dataset")
    one_line(own(tmp_path, dataset="mine"), 2, "--dataset mine: give its captions with --captions FILE")
    assert not (tmp_path / "out").exists()
