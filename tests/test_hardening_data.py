"""Data files trusted only inside their folder (HDF5 links, caption files' image names), output paths of the wrong
kind refused before anything is written, and make_dataset.py replacing only its own files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import copy_data, make_checkpoint, one_line, run_script, tiny_train_args

import feature_cache
from all_models import Encoder, ModelConfig
from cli import UserError
from pytorch_dataset_class import CaptionDataset, ImageDataset, Vocab, open_data, stored_here_problem

# ----------------------------------------------------------------------------------------------
# HDF5 files: every dataset stored in the file itself


def link_out(h5_path: Path, name: str, outside: Path, data=None) -> None:
    """Move dataset `name` of `h5_path` into the HDF5 file `outside` (or put `data` there instead), and leave an
    external link to it in its place: the file reads as before, from elsewhere."""
    with h5py.File(h5_path, "r+") as f, h5py.File(outside, "a") as o:
        o.create_dataset(name, data=f[name][()] if data is None else data, fletcher32=True)
        if name in f:
            del f[name]
        f[name] = h5py.ExternalLink(str(outside), "/" + name)


def test_an_external_link_in_a_split_file_is_refused_by_evaluate(tiny_shapes: Path, tmp_path: Path) -> None:
    """A string dataset linked to another file would put that file's text into references_test.json."""
    data = copy_data(tiny_shapes, tmp_path / "data")
    secret = [json.dumps([["secret", "text", "of", "another", "file"]]).encode()] * 16
    link_out(data / "test.h5", "references", tmp_path / "p.h5",
             np.array(secret, dtype=h5py.string_dtype("utf-8", len(secret[0]))))
    wm = data / "word_map.json"
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", json.loads(wm.read_text()), 32, 0, Vocab.hash(wm))
    r = run_script("evaluate.py", "--checkpoint", ckpt, "--data", data, "--beam-sizes", "1", "--workers", "0",
                   "--max-len", "4", mode="in_process")
    one_line(r, 1, data / "test.h5", "references", "external link", "p.h5")
    assert not (tmp_path / "run" / "references_test.json").exists()


def test_an_external_link_in_a_split_file_is_refused_by_train(tiny_shapes: Path, tmp_path: Path) -> None:
    data = copy_data(tiny_shapes, tmp_path / "data")
    link_out(data / "train.h5", "images", tmp_path / "other.h5")
    for opener in (open_data, lambda d: CaptionDataset(d / "train.h5"), lambda d: ImageDataset(d / "train.h5")):
        with pytest.raises(UserError, match=r"train\.h5: dataset /images is an external link to .*other\.h5:/images"):
            opener(data)
    out = tmp_path / "runs"
    r = run_script("train.py", *tiny_train_args(data, out, "--epochs", "1", "--run", "r"), mode="in_process")
    one_line(r, 1, data / "train.h5", "/images", "external link")
    assert not (out / "r").exists()


def test_links_virtual_datasets_and_external_storage_are_named(tmp_path: Path) -> None:
    (tmp_path / "raw.bin").write_bytes(bytes(4))
    with h5py.File(tmp_path / "other.h5", "w") as o:
        o["x"] = np.zeros(4, np.uint8)
    cases = {
        "soft link": lambda f: f.__setitem__("s", h5py.SoftLink("/a")),
        "external link": lambda f: f.__setitem__("e", h5py.ExternalLink("other.h5", "/x")),
        "external file": lambda f: f.create_dataset("r", (4,), "u1", external=[(str(tmp_path / "raw.bin"), 0, 4)]),
        "virtual": lambda f: f.create_virtual_dataset("v", _layout(tmp_path / "other.h5")),
        "/g/e is an external link": lambda f: f.create_group("g").__setitem__("e", h5py.ExternalLink("other.h5", "/x")),
    }
    for i, (what, make) in enumerate(cases.items()):
        path = tmp_path / f"f{i}.h5"
        with h5py.File(path, "w") as f:
            f["a"] = np.arange(3)
            f["g2"] = f["a"]  # a second hard link: stored here
            make(f)
        with h5py.File(path, "r") as f:
            problem = stored_here_problem(f)
        assert problem is not None and what in problem, (what, problem)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["a"] = np.arange(3)
        f.create_group("g")["b"] = np.arange(2)
    with h5py.File(tmp_path / "plain.h5", "r") as f:
        assert stored_here_problem(f) is None


def _layout(source: Path) -> h5py.VirtualLayout:
    layout = h5py.VirtualLayout((4,), np.uint8)
    layout[:] = h5py.VirtualSource(str(source), "x", (4,))
    return layout


def test_a_feature_cache_with_an_external_link_is_refused(tiny_shapes: Path, tmp_path: Path) -> None:
    data = copy_data(tiny_shapes, tmp_path / "data")
    cache = data / "features_smallcnn_none-000000000000_4_val.h5"
    with h5py.File(cache, "w") as f:
        f.attrs["encoder_sha1"] = "x"
    link_out(cache, "features", tmp_path / "other.h5", np.zeros((16, 16, 128), np.float16))
    with pytest.raises(UserError, match=r"features_.*_val\.h5: dataset /features is an external link"):
        ImageDataset(data / "val.h5", feature_path=cache)
    encoder = Encoder(ModelConfig(vocab_size=10, encoder="smallcnn", encoded_size=4))
    with pytest.raises(UserError, match=r"features_.*_val\.h5: dataset /features is an external link"):
        feature_cache.build_feature_cache(encoder, data / "val.h5", cache, progress=False)


# ----------------------------------------------------------------------------------------------
# Caption files: every image name inside --image-dir

GOOD = ("a.jpg", "b.jpg", "sub/c.jpg", "d.jpg", "e.jpg")
BAD = ("../outside.jpg", "/etc/outside.jpg")


def caption_file(folder: Path, fmt: str, names: tuple[str, ...]) -> Path:
    """A caption file in format `fmt` giving each image of `names` one caption."""
    if fmt == "karpathy":
        images = [{"filename": n, "split": ("train", "train", "val", "test")[i % 4],
                   "sentences": [{"tokens": ["a", "dog"]}]} for i, n in enumerate(names)]
        text, name = json.dumps({"images": images}), "dataset.json"
    elif fmt == "flickr-token":
        text, name = "".join(f"{n}#0\ta dog runs\n" for n in names), "Flickr8k.token.txt"
    elif fmt == "csv":
        text, name = "image,caption\n" + "".join(f"{n},a dog runs\n" for n in names), "captions.csv"
    elif fmt == "coco":
        text = json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                           "annotations": [{"image_id": i, "caption": "a dog runs"} for i in range(len(names))]})
        name = "captions.json"
    else:
        text, name = "".join(json.dumps({"image": n, "caption": "a dog runs"}) + "\n" for n in names), "c.jsonl"
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("fmt", ["karpathy", "flickr-token", "csv", "coco", "jsonl"])
def test_image_names_outside_the_image_folder_are_refused(fmt: str, tmp_path: Path) -> None:
    from caption_formats import CaptionInput, read_captions

    images = tmp_path / "images"
    images.mkdir()
    good = read_captions(CaptionInput((caption_file(tmp_path, fmt, GOOD),), fmt), 50, images)
    assert sorted(e.filename for es in good.splits.values() for e in es) == sorted(GOOD)  # a subfolder is fine
    path = caption_file(tmp_path, fmt, GOOD + BAD)
    with pytest.raises(UserError) as err:
        read_captions(CaptionInput((path,), fmt), 50, images)
    line = str(err.value)
    assert line.startswith(f"{path}: 2 image names lead outside --image-dir {images}, the first ")
    assert any(f"first {ascii(name)};" in line for name in BAD), line


def test_make_dataset_reads_no_image_outside_the_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg", "d.jpg", "outside.jpg")):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save((images if name != "outside.jpg" else tmp_path) / name)
    captions = caption_file(tmp_path, "csv", ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "../outside.jpg"))
    out = tmp_path / "out"
    r = run_script("make_dataset.py", "--dataset", "mine", "--captions", captions, "--image-dir", images,
                   "--output-dir", out, "--min-word-freq", "1", "--workers", "0", mode="in_process")
    one_line(r, 1, captions, "1 image name leads outside --image-dir", "'../outside.jpg'")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Output paths of the wrong kind: refused in one line before anything is written


def test_a_file_where_train_writes_its_event_files_is_one_line_new_run_and_resume(trained: Path, tiny_shapes: Path,
                                                                                    tmp_path: Path) -> None:
    out = tmp_path / "runs"
    (out / "r").mkdir(parents=True)
    (out / "r" / "tensorboard").write_text("mine\n")
    r = run_script("train.py", *tiny_train_args(tiny_shapes, out, "--epochs", "1", "--run", "r", "--tensorboard"),
                   mode="in_process")
    one_line(r, 1, f"{out / 'r' / 'tensorboard'}: a file, not a folder")
    assert sorted(p.name for p in (out / "r").iterdir()) == ["tensorboard"]  # no config.json, no metrics.jsonl
    run = shutil.copytree(trained, tmp_path / "resumed")
    (run / "tensorboard").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    r = run_script("train.py", "--resume", run / "last.pt", "--epochs", "2", "--tensorboard", mode="in_process")
    one_line(r, 1, f"{run / 'tensorboard'}: a file, not a folder")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_folder_named_like_a_run_file_is_one_line_before_training(tiny_shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    (out / "r" / "curves.png").mkdir(parents=True)
    r = run_script("train.py", *tiny_train_args(tiny_shapes, out, "--epochs", "1", "--run", "r"), mode="in_process")
    one_line(r, 1, f"{out / 'r' / 'curves.png'}: a folder, not a file")
    assert sorted(p.name for p in (out / "r").iterdir()) == ["curves.png"]


def test_a_folder_where_a_feature_cache_goes_is_refused_before_any_is_built(tiny_shapes: Path, tmp_path: Path) -> None:
    data = copy_data(tiny_shapes, tmp_path / "data")
    encoder = Encoder(ModelConfig(vocab_size=10, encoder="smallcnn", encoded_size=4))
    cfg = ModelConfig(vocab_size=10, encoder="smallcnn", encoded_size=4)
    fp = feature_cache.encoder_fingerprint(encoder)
    train_cache, val_cache = (feature_cache.feature_cache_path(data, cfg, "none", fp, s) for s in ("train", "val"))
    val_cache.mkdir()
    with pytest.raises(UserError, match=f"{val_cache}: a folder, not a file"):
        feature_cache.build_split_caches(encoder, data, cfg, "none", batch_size=16, workers=0, progress=False)
    assert not train_cache.exists()


def test_a_folder_named_like_an_evaluate_output_is_one_line_before_decoding(tiny_shapes: Path, tmp_path: Path) -> None:
    wm = tiny_shapes / "word_map.json"
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", json.loads(wm.read_text()), 32, 0, Vocab.hash(wm))
    (tmp_path / "run" / "predictions_test_beam2.json").mkdir()
    r = run_script("evaluate.py", "--checkpoint", ckpt, "--data", tiny_shapes, "--beam-sizes", "1", "2",
                   "--workers", "0", "--max-len", "4", mode="in_process")
    one_line(r, 1, f"{tmp_path / 'run' / 'predictions_test_beam2.json'}: a folder, not a file")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "predictions_test_beam2.json"]


def test_a_folder_named_like_a_make_dataset_output_is_one_line_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "val.h5").mkdir(parents=True)
    base = ["--shapes-train", "8", "--shapes-val", "4", "--shapes-test", "4", "--workers", "0", "--image-size", "16",
            "--min-word-freq", "1"]
    r = run_script("make_dataset.py", *base, "--raw-dir", tmp_path / "raw", "--output-dir", out, mode="in_process")
    one_line(r, 1, f"{out / 'val.h5'}: a folder, not a file")
    assert sorted(p.name for p in out.iterdir()) == ["val.h5"] and not (tmp_path / "raw").exists()
    (tmp_path / "raw2" / "dataset_shapes.json").mkdir(parents=True)
    (tmp_path / "raw2" / "dataset_shapes.json" / "mine.txt").write_text("mine\n")
    r = run_script("make_dataset.py", *base, "--raw-dir", tmp_path / "raw2", "--output-dir", tmp_path / "o2",
                   mode="in_process")
    one_line(r, 1, f"{tmp_path / 'raw2' / 'dataset_shapes.json'}: a folder, not a file")
    assert (tmp_path / "raw2" / "dataset_shapes.json" / "mine.txt").read_text() == "mine\n"


def test_attention_maps_under_a_file_are_one_line_before_captioning(tmp_path: Path) -> None:
    from helpers import shapes_word_map
    from PIL import Image

    ckpt = make_checkpoint(tmp_path / "tiny.pt", shapes_word_map())
    images = []
    for i in range(2):
        images.append(tmp_path / f"img_{i}.png")
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(images[-1])
    (tmp_path / "blocker").write_text("mine\n")
    r = run_script("inference.py", "--checkpoint", ckpt, "--workers", "0", "--attention-map",
                   tmp_path / "blocker" / "maps", *images, mode="in_process")
    one_line(r, 1, f"--attention-map {tmp_path / 'blocker' / 'maps' / 'img_0.png'}: cannot write there",
             "blocker is a file, not a folder")
    assert r.out == ""


# ----------------------------------------------------------------------------------------------
# make_dataset.py replaces only its own output, unless --overwrite


def test_make_dataset_replaces_a_users_own_files_only_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = ["--shapes-train", "8", "--shapes-val", "4", "--shapes-test", "4", "--workers", "0", "--image-size", "16",
            "--min-word-freq", "1", "--raw-dir", tmp_path / "raw", "--output-dir", out]
    r = run_script("make_dataset.py", *base, mode="in_process")
    assert r.rc == 0, str(r)
    r = run_script("make_dataset.py", *base, "--seed", "1", mode="in_process")  # its own output: rebuilt
    assert r.rc == 0, str(r)
    mine = b'{"my": 0, "own": 1}\n'
    (out / "word_map.json").write_bytes(mine)  # a word map of the user's, beside make_dataset's split files
    r = run_script("make_dataset.py", *base, mode="in_process")
    one_line(r, 2, f"--output-dir {out}: word_map.json is not make_dataset.py's output", "--overwrite")
    assert (out / "word_map.json").read_bytes() == mine
    (out / "word_map.json").unlink()
    with h5py.File(out / "train.h5", "w") as f:  # an HDF5 file of the user's
        f["mine"] = np.arange(3)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_script("make_dataset.py", *base, mode="in_process")
    one_line(r, 2, "train.h5 is not make_dataset.py's output")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = run_script("make_dataset.py", *base, "--overwrite", mode="in_process")
    assert r.rc == 0, str(r)
    assert open_data(out).vocab.sha1 == ImageDataset(out / "train.h5").attrs["word_map_sha1"]
