"""pytorch_dataset_class.py: image preprocessing (any mode, 16-bit, alpha, the size limit) and the HDF5 datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import pytorch_dataset_class as pdc
from cli import UserError
from pytorch_dataset_class import (
    CaptionDataset,
    ImageDataset,
    Vocab,
    normalize,
    open_data,
    preprocess_image,
    to_model_input,
)

# ---------------------------------------------------------------- the vocabulary


def test_vocab_build_puts_the_special_tokens_first_then_words_by_count() -> None:
    vocab = Vocab.build([["a", "dog", "runs"], ["a", "dog"], ["a", "cat"]], min_word_freq=2)
    assert list(vocab.word_map) == [*Vocab.SPECIAL, "a", "dog"] and len(vocab) == 6
    assert (vocab.pad, vocab.start, vocab.end, vocab.unk) == (0, 1, 2, 3)
    assert vocab.words[4] == "a"


def test_vocab_encode_and_decode_are_inverse_for_known_words() -> None:
    vocab = Vocab.build([["a", "dog"]], min_word_freq=1)
    ids, length = vocab.encode(["a", "zebra", "dog"], max_len=5)
    assert ids == [1, 4, 3, 5, 2, 0, 0] and length == 5  # <start> a <unk> dog <end> <pad> <pad>
    assert vocab.decode(ids) == ["a", Vocab.UNK, "dog"]  # the markers dropped, <unk> kept
    assert vocab.decode([4, 99]) == ["a", Vocab.UNK]  # an index outside the map reads <unk>


def test_vocab_hash_is_that_of_word_map_json(tmp_path: Path) -> None:
    vocab = Vocab.build([["a", "dog"]], min_word_freq=1)
    (tmp_path / "word_map.json").write_bytes(vocab.to_json())
    read = Vocab.read(tmp_path / "word_map.json")
    assert read == vocab and read.sha1 == vocab.sha1 == Vocab.hash(tmp_path / "word_map.json")
    assert Vocab.of(read) is read and Vocab.of(vocab.word_map) == vocab
    assert Vocab(vocab.word_map, "f" * 40).sha1 == "f" * 40  # a checkpoint's stored hash is kept
    (tmp_path / "bad.json").write_text('{"a": 0, "b": 2}')
    with pytest.raises(ValueError, match="indices 0..V-1"):
        Vocab.read(tmp_path / "bad.json")


def test_open_data_reads_the_vocab_and_its_hash(tiny_shapes: Path) -> None:
    data = open_data(tiny_shapes)
    assert data.vocab == Vocab.read(tiny_shapes / "word_map.json")
    assert data.vocab.sha1 == Vocab.hash(tiny_shapes / "word_map.json")


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
    with h5py.File(tmp_path / "features.h5", "w", libver=pdc.HDF5_FORMAT) as f:
        f.create_dataset("features", data=np.random.default_rng(0).standard_normal((16, 4, 6)).astype(np.float16),
                         chunks=(1, 4, 6), **pdc.CHECKSUMS)  # (N, P, D), as feature_cache.py writes it
    x, _, _ = CaptionDataset(tiny_shapes / "val.h5", tmp_path / "features.h5")[7]  # image 7 // 5 = 1
    assert x.shape == (4, 6) and x.dtype == torch.float16  # as stored: the loader moves half the bytes
    with h5py.File(tmp_path / "features.h5") as f:
        expected = torch.from_numpy(f["features"][1].astype(np.float32))
    model_input = to_model_input(x.unsqueeze(0), "cpu")  # (1, P, D)
    assert model_input.dtype == torch.float32 and torch.equal(model_input[0], expected)
    with pytest.raises(UserError):
        CaptionDataset(tmp_path / "missing.h5")


# ---------------------------------------------------------------- every field checked, damage detected

def damage(path: Path, where: str, dataset: str = "images") -> None:
    """Zero 16 bytes inside an HDF5 file: in the middle of the data of `dataset`'s chunk 3 ("data"), or inside
    the object header that describes `dataset` ("metadata")."""
    with h5py.File(path) as f:
        ds = f[dataset]
        if where == "data":
            info = ds.id.get_chunk_info(3)
            offset = info.byte_offset + info.size // 2
        else:
            offset = header_address(ds) + 8
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(16))


def header_address(ds: h5py.Dataset) -> int:
    return h5py.h5o.get_info(ds.id).addr


@pytest.fixture
def data(tiny_shapes: Path, tmp_path: Path) -> Path:
    """A copy of tiny_shapes to damage or edit."""
    return Path(shutil.copytree(tiny_shapes, tmp_path / "data"))


EDITS = {  # name: (what to do to val.h5, what the error line says)
    "caption_index_too_big": (lambda f: f["captions"].__setitem__((7, 3), f.attrs["vocab_size"]),
                              "word indices outside the vocabulary"),
    "caption_index_negative": (lambda f: f["captions"].__setitem__((0, 1), -1), "outside the vocabulary"),
    "length_too_long": (lambda f: f["caption_lengths"].__setitem__(5, 53), "caption_lengths outside [2, 52]"),
    "length_zero": (lambda f: f["caption_lengths"].__setitem__(5, 0), "caption_lengths outside"),
    "image_size_float": (lambda f: f.attrs.__setitem__("image_size", 32.5), "attribute image_size is 32.5"),
    "cpi_string": (lambda f: f.attrs.__setitem__("captions_per_image", "five"), "attribute captions_per_image"),
    "images_not_square": (lambda f: (f.__delitem__("images"), f.create_dataset(
        "images", data=np.zeros((16, 3, 32, 16), np.uint8), **pdc.CHECKSUMS)), "images is uint8 (16, 3, 32, 16)"),
    "no_captions": (lambda f: f.__delitem__("captions"), "KeyError"),
    "no_checksums": (lambda f: (f.__delitem__("meta"), f.create_dataset("meta", data=[b"{}"] * 16)),
                     "meta has no checksums"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_split_file_field_out_of_range_is_refused_on_open(data: Path, edit: str) -> None:
    """Caption indices outside the vocabulary, lengths out of range, attributes of the wrong type, a missing
    dataset, a file without checksums: a UserError naming the file when a dataset opens it, not a crash later."""
    change, needle = EDITS[edit]
    with h5py.File(data / "val.h5", "r+") as f:
        change(f)
    for cls in (ImageDataset, CaptionDataset):
        with pytest.raises(UserError) as err:
            cls(data / "val.h5")
        msg = str(err.value)
        assert f"{data / 'val.h5'}: not a readable make_dataset.py split file" in msg and needle in msg, msg
        assert "\n" not in msg and "rebuild it with make_dataset.py" in msg


def test_damaged_metadata_is_refused_on_open(data: Path) -> None:
    damage(data / "val.h5", "metadata", "captions")
    with pytest.raises(UserError, match="checksum mismatch") as err:
        ImageDataset(data / "val.h5")
    assert str(data / "val.h5") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_image_is_one_line_where_it_is_read(data: Path, workers: int) -> None:
    """Zeroed bytes inside one stored image: the fletcher32 checksum fails when that image is read, also in a
    DataLoader worker process, as one line naming the file (DamagedFile), not a traceback text or a hang."""
    damage(data / "val.h5", "data")
    ds = ImageDataset(data / "val.h5")  # opening reads no image
    assert ds[2][0].shape == (3, 32, 32)  # the other images read as before
    with pytest.raises(pdc.DamagedFile) as err:
        list(DataLoader(ds, batch_size=4, num_workers=workers))
    msg = str(err.value)
    assert msg.startswith(f"{data / 'val.h5'}: damaged, truncated or corrupt (checksum mismatch: ")
    assert msg.endswith("; rebuild it with make_dataset.py") and "\n" not in msg and "Traceback" not in msg


def test_feature_file_without_checksums_or_damaged(data: Path, tmp_path: Path) -> None:
    feats = tmp_path / "features.h5"
    with h5py.File(feats, "w") as f:
        f["features"] = np.zeros((16, 4, 6), dtype=np.float16)
    with pytest.raises(UserError, match="no checksummed float16 'features' dataset with 16 rows"):
        ImageDataset(data / "val.h5", feats)
    with h5py.File(feats, "w", libver=pdc.HDF5_FORMAT) as f:
        f.create_dataset("features", data=np.ones((16, 4, 6), dtype=np.float16), chunks=(1, 4, 6), **pdc.CHECKSUMS)
    damage(feats, "data", "features")
    ds = CaptionDataset(data / "val.h5", feats)
    with pytest.raises(pdc.DamagedFile, match="delete it: train.py --cache-features builds it again"):
        ds[3 * 5]  # image 3


@pytest.mark.parametrize("name, text, needle", [
    ("references", b"[[1, 2]]", "references holds something else than lists of token lists"),
    ("references", b"[[\"a\"", "references is not JSON text"),
    ("meta", b"[]", "meta holds something else than JSON objects"),
])
def test_references_and_meta_of_the_wrong_kind(data: Path, name: str, text: bytes, needle: str) -> None:
    with h5py.File(data / "val.h5", "r+") as f:
        del f[name]
        f.create_dataset(name, data=np.array([text] * 16), **pdc.CHECKSUMS)
    ds = ImageDataset(data / "val.h5")
    with pytest.raises(UserError, match=needle):
        ds.references() if name == "references" else ds.meta()


def test_images_of_another_size_than_the_attribute_says(data: Path) -> None:
    """image_size says 64, the images are 32 px: refused where an image is read (callers compare the attribute
    with a checkpoint's image size first, and say so)."""
    with h5py.File(data / "val.h5", "r+") as f:
        f.attrs["image_size"] = 64
    ds = ImageDataset(data / "val.h5")
    with pytest.raises(pdc.DamagedFile, match="holds 32 px images, but its image_size attribute says 64"):
        ds[0]


def test_a_small_split_is_read_whole_and_gives_the_same_items(data: Path, monkeypatch) -> None:
    """A split under IN_MEMORY_BYTES is read into memory once per process; its items are those read one by one."""
    whole = ImageDataset(data / "val.h5")
    items = [whole[i] for i in range(len(whole))]
    assert set(whole._arrays) == {"images", "captions", "caption_lengths"}
    monkeypatch.setattr(pdc, "IN_MEMORY_BYTES", 0)
    one_by_one = ImageDataset(data / "val.h5")
    for i, item in enumerate(items):
        for got, want in zip(one_by_one[i], item, strict=True):
            assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want
    assert one_by_one._arrays == {}
