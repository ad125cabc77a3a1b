"""The Makefile's Flickr8k recipes: `make -n` prints their commands, whose train.py options must parse."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest
from helpers import ROOT

import train


def train_options(target: str, *variables: str) -> dict:
    """The options `make TARGET VARIABLES...` would pass to train.py, parsed as train.py parses them."""
    out = subprocess.run(["make", "-n", "-B", target, *variables], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    line = next(cmd for cmd in out.splitlines() if " train.py " in cmd)
    argv = shlex.split(line)
    return vars(train.build_parser(show_defaults=False).parse_args(argv[argv.index("train.py") + 1:]))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_self_critical_recipe_samples_sixteen_captions_unless_told_otherwise() -> None:
    recipe = train_options("flickr8k-scst")
    assert recipe["scst"] is True and recipe["scst_samples"] == 16  # what the release was trained with
    assert recipe["init_from"] == "model_files/flickr8k_lite0/last.pt"  # flickr8k-model's run
    assert train_options("flickr8k-scst", "F8K_SCST_SAMPLES=5")["scst_samples"] == 5  # the faster, first recipe
    assert train_options("flickr8k-model")["epochs"] == 10


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_flickr8k_recipe_reads_the_raw_data_from_data_raw_unless_told_otherwise() -> None:
    def make_dataset_options(*variables: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", "flickr8k-model", *variables], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.replace("\\\n", " ")  # the recipe's continued lines
        return shlex.split(next(cmd for cmd in out.splitlines() if " make_dataset.py " in cmd))

    default = make_dataset_options()
    assert default[default.index("--karpathy-json") + 1] == "data/raw/flickr8k/dataset_flickr8k.json"
    assert default[default.index("--image-dir") + 1] == "data/raw/flickr8k/images"
    other = make_dataset_options("F8K=../shared/flickr8k-224")
    assert other[other.index("--image-dir") + 1] == "../shared/flickr8k-224/images"
