"""Shared fixtures: a tiny processed shapes dataset, and the real 60-image Flickr8k sample."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # flat repository: the scripts are imported as top-level modules
    sys.path.insert(0, str(ROOT))


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
