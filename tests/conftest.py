"""Shared fixtures: the tiny shapes dataset and variants of it, one tiny trained run, odd and bad images,
the Flickr8k sample. Plain helpers are in helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # flat repository: the scripts are imported as top-level modules
    sys.path.insert(0, str(ROOT))

from helpers import (  # noqa: E402  (after the sys.path line)
    Result,
    copy_data,
    make_bad_images,
    make_odd_images,
    rewrite_word_map,
    run_script,
    stop_fork_server,
    tiny_train_args,
)


@pytest.fixture(scope="session", autouse=True)
def fork_server():
    """helpers.run_script starts its fork server when first needed; it stops when the session ends."""
    yield
    stop_fork_server()


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A processed shapes dataset (48 train / 16 val / 16 test images, 32 px, every word kept).

    Returns the folder holding word_map.json, train.h5, val.h5 and test.h5; the raw images and
    dataset_shapes.json are in its sibling folder `raw`.
    """
    from make_dataset import build_dataset

    root = tmp_path_factory.mktemp("tiny_shapes")
    build_dataset("shapes", output_dir=root / "processed", raw_dir=root / "raw", shapes_sizes=(48, 16, 16),
                  image_size=32, min_word_freq=1, workers=1, progress=False)
    return root / "processed"


@pytest.fixture(scope="session")
def datasets(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Variants of tiny_shapes: another vocabulary, an edited word map, truncated HDF5, another image size."""
    d = tmp_path_factory.mktemp("datasets")
    other = copy_data(tiny_shapes, d / "other_vocab")  # consistent, but not the vocabulary of `trained`
    rewrite_word_map(other)
    edited = copy_data(tiny_shapes, d / "edited_word_map")  # word_map.json no longer what the HDF5 says
    rewrite_word_map(edited, update_h5=False)
    truncated = copy_data(tiny_shapes, d / "truncated")
    for split in ("train", "test"):
        data = (truncated / f"{split}.h5").read_bytes()
        (truncated / f"{split}.h5").write_bytes(data[: len(data) // 2])
    size64 = copy_data(tiny_shapes, d / "size64")
    with h5py.File(size64 / "test.h5", "r+") as f:
        f.attrs["image_size"] = 64
    no_h5 = copy_data(tiny_shapes, d / "no_h5")
    for split in ("train", "test"):
        (no_h5 / f"{split}.h5").unlink()
    return {"other_vocab": other, "edited_word_map": edited, "truncated": truncated, "size64": size64,
            "no_h5": no_h5, "missing": d / "no_such_folder"}


@pytest.fixture(scope="session")
def test_split(tiny_shapes: Path) -> tuple[list[list[list[str]]], list[dict], list[str]]:
    """tiny_shapes' test split: (references, shapes ground truth, filenames)."""
    from pytorch_dataset_class import ImageDataset

    ds = ImageDataset(tiny_shapes / "test.h5")
    return ds.references(), ds.meta(), ds.filenames()


@pytest.fixture(scope="session")
def trained_run(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """`python train.py` with the tiny options for 1 epoch on tiny_shapes; returns (run folder, its run).

    Tests read it and copy it, never write into it."""
    out = tmp_path_factory.mktemp("trained")
    return out / "r", run_script("train.py", *tiny_train_args(tiny_shapes, out, "--epochs", "1", "--run", "r"))


@pytest.fixture(scope="session")
def trained(trained_run: tuple[Path, Result]) -> Path:
    """The run folder of trained_run (last.pt, best.pt, ...), which ended with exit status 0."""
    run_dir, r = trained_run
    assert r.rc == 0, str(r)
    return run_dir


@pytest.fixture(scope="module")
def last_ckpt(trained: Path) -> dict:
    """trained's last.pt as checkpoints.load_checkpoint reads it (tests edit deep copies of it)."""
    from checkpoints import load_checkpoint

    return load_checkpoint(trained / "last.pt")


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """helpers.make_odd_images: 1x1, 12000 x 12000, 16-bit, CMYK, RGBA and palette images."""
    return make_odd_images(tmp_path_factory.mktemp("images") / "odd")


@pytest.fixture(scope="session")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """helpers.make_bad_images: zero bytes, a truncated JPEG, text as .jpg and .txt, > 200 MP."""
    return make_bad_images(tmp_path_factory.mktemp("images") / "bad")


@pytest.fixture(scope="session")
def good_image(odd_images: list[Path]) -> Path:
    return odd_images[0]


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """Hide `java` from PATH (an empty folder as the whole PATH)."""
    import metrics

    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert not metrics.java_available()


@pytest.fixture(scope="session")
def flickr_sample() -> Path:
    """The shared 60-image Flickr8k sample (../shared/flickr8k-sample), or a skip when absent."""
    for base in (Path(__file__).resolve().parents[2], ROOT.parent):
        path = base / "shared" / "flickr8k-sample"
        if (path / "dataset_flickr8k.json").is_file() and (path / "images").is_dir():
            return path
    pytest.skip("the Flickr8k sample is not at ../shared/flickr8k-sample (see its README)")


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread is several times faster than two that fight."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
