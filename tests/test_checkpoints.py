"""checkpoints.py: a checkpoint round trip with weights_only, and crafted checkpoints refused in one line before a
model is built, while every real kind still loads."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from helpers import tiny_lite0_checkpoint
from tiny_models import WORD_MAP, V, captions_batch, images, tiny_config

from all_models import Captioner
from checkpoints import check_fits, load_checkpoint, model_from_checkpoint, save_checkpoint
from cli import UserError


def test_checkpoint_round_trip_weights_only(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(position="learned", deep_output=True, dropout=0.5)
    model = Captioner(cfg)
    with torch.no_grad():
        model.decoder.pos_table.normal_()  # not zero, so it must be saved and loaded
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"format_version": 1, "model_config": cfg.__dict__.copy(),
                           "model_state": model.state_dict(), "word_map": WORD_MAP, "epoch": 3,
                           "history": [{"epoch": 1, "val_bleu4": 0.1}], "best_score": float("-inf")})
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["epoch"] == 3
    loaded, word_map = model_from_checkpoint(load_checkpoint(path))
    assert word_map == WORD_MAP and not loaded.training
    model.eval()
    caps, lens = captions_batch([6, 3])
    x = images(2)
    with torch.no_grad():
        ours, theirs = model(x, caps, lens), loaded(x, caps, lens)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.alphas, theirs.alphas)


def tiny_checkpoint(**config) -> dict:
    """The checkpoint dict of a tiny random model (as load_checkpoint returns one)."""
    torch.manual_seed(0)
    cfg = tiny_config(**config)
    return {"format_version": 1, "model_config": asdict(cfg), "model_state": Captioner(cfg).state_dict(),
            "word_map": dict(WORD_MAP), "image_size": 32, "dataset": "shapes", "word_map_sha1": "0" * 40,
            "train_config": {}}


def _edit(key: str, sub: str | None, value):
    """An edit of a checkpoint dict: ck[key] = value, or ck[key][sub] = value; DELETE deletes it instead."""
    def edit(ck: dict) -> None:
        d, last = (ck, key) if sub is None else (ck[key], sub)
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


DELETE = object()
CRAFTED = [  # (id, edit, what the error line says after "--checkpoint PATH: ")
    ("config-list", _edit("model_config", None, [1]), "its model_config is not a dict but [1]"),
    ("config-no-vocab", _edit("model_config", "vocab_size", DELETE), "its model_config has no vocab_size"),
    ("grid-float", _edit("model_config", "encoded_size", 4.0),
     "its model option encoded_size must be an integer, got 4.0"),
    ("grid-str", _edit("model_config", "encoded_size", "4"), "encoded_size must be an integer, got '4'"),
    ("embed-bool", _edit("model_config", "embed_dim", True), "embed_dim must be an integer, got True"),
    ("deep-output-str", _edit("model_config", "deep_output", "yes"), "deep_output must be true or false, got 'yes'"),
    ("fine-tune-int", _edit("model_config", "fine_tune_encoder", 1), "fine_tune_encoder must be true or false, got 1"),
    ("dropout-str", _edit("model_config", "dropout", "0.5"), "dropout must be a number, got '0.5'"),
    ("dropout-nan", _edit("model_config", "dropout", float("nan")), "model option dropout must be in [0, 1), got nan"),
    ("encoder-int", _edit("model_config", "encoder", 3), "encoder must be a string, got 3"),
    ("encoder-vgg", _edit("model_config", "encoder", "vgg"), "model option encoder must be one of resnet18"),
    ("grid-huge", _edit("model_config", "encoded_size", 100_000), "encoded_size must be in [1, 64], got 100000"),
    ("grid-zero", _edit("model_config", "encoded_size", 0), "encoded_size must be in [1, 64], got 0"),
    ("vocab-huge", _edit("model_config", "vocab_size", 10**9), "vocab_size must be in [1, 1000000], got 1000000000"),
    ("decoder-dim-huge", _edit("model_config", "decoder_dim", 10**6), "decoder_dim must be in [1, 16384], got 1000000"),
    ("attention-dim-zero", _edit("model_config", "attention_dim", 0), "attention_dim must be in [1, 16384], got 0"),
    ("word-map-list", _edit("word_map", None, ["<pad>"]), "its word_map is not a {word: index} dict"),
    ("word-map-str-index", _edit("word_map", "w0", "4"), "its word_map is not a {word: index} dict"),
    ("word-map-bool-index", _edit("word_map", "<pad>", False), "its word_map is not a {word: index} dict"),
    ("word-map-no-start", _edit("word_map", "<start>", DELETE), "its word_map lacks <start>, which decoding needs"),
    ("word-map-no-end", _edit("word_map", "<end>", DELETE), "its word_map lacks <end>"),
    ("word-map-no-pad", _edit("word_map", "<pad>", DELETE), "its word_map lacks <pad>"),
    ("word-map-gap", _edit("word_map", "w0", V + 5), f"the word map's indices are not 0..{V - 1}"),
    ("word-map-longer", _edit("word_map", "zebra", V), f"the word map has {V + 1} words, the model {V}"),
    ("image-size-huge", _edit("image_size", None, 10**6), "its image_size must be an integer in [1, 4096], got 10000"),
    ("image-size-str", _edit("image_size", None, "32"), "its image_size must be an integer in [1, 4096], got '32'"),
    ("image-size-zero", _edit("image_size", None, 0), "its image_size must be an integer in [1, 4096], got 0"),
    ("dataset-int", _edit("dataset", None, 5), "its dataset must be a str, got 5"),
    ("train-config-list", _edit("train_config", None, []), "its train_config must be a dict, got []"),
    ("format-2", _edit("format_version", None, 2), "format_version 2 is not one this version of imcap reads"),
    ("format-str", _edit("format_version", None, "1"), "format_version '1' is not one"),
    ("state-str", _edit("model_state", None, "weights"), "the weights do not fit its model config ("),
    ("state-shape", _edit("model_config", "embed_dim", 32), "the weights do not fit its model config (size mismatch"),
    ("state-missing", _edit("model_state", "decoder.fc.bias", DELETE), "(missing weights: decoder.fc.bias)"),
    ("state-extra", _edit("model_state", "decoder.extra", torch.zeros(1)), "(unexpected weights: decoder.extra)"),
    ("state-not-tensor", _edit("model_state", "decoder.fc.bias", [0.0]), "the weights do not fit its model config ("),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_crafted_checkpoint_is_refused_in_one_line_before_a_model_is_built(tmp_path, edit, message) -> None:
    ck = tiny_checkpoint()
    edit(ck)
    path = tmp_path / "crafted.pt"
    torch.save(ck, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    line = str(err.value)
    assert line.startswith(f"--checkpoint {path}: ") and message in line and "\n" not in line, line
    assert err.value.code == 1
    with pytest.raises(UserError, match="^checkpoint: "):  # a dict handed over directly: the same checks
        model_from_checkpoint(ck)


def test_a_config_too_large_to_build_is_refused_without_building_it(tmp_path) -> None:
    """Within every bound, a model of these sizes would take ~13 GB; its weights say it is not that model, and
    the check builds nothing real (the meta device): refused without taking the memory."""
    ck = tiny_checkpoint()
    ck["model_config"].update(embed_dim=16384, attention_dim=16384, decoder_dim=16384, encoded_size=64)
    torch.save(ck, path := tmp_path / "big.pt")
    with pytest.raises(UserError, match="the weights do not fit its model config"):
        load_checkpoint(path)


def test_every_checked_kind_of_checkpoint_still_loads(tmp_path) -> None:
    """The checks refuse nothing real: a learned-position deep-output model, one with coordinates, a released
    model without its packaged encoder (tiny_lite0_checkpoint), a checkpoint without the optional fields."""
    for cfg in ({"position": "learned", "deep_output": True}, {"position": "coords"}):
        save_checkpoint(tmp_path / "m.pt", tiny_checkpoint(**cfg))
        model, word_map = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
        assert word_map == WORD_MAP and model.config.position == cfg["position"]
    ck = load_checkpoint(tiny_lite0_checkpoint(tmp_path / "lite0.pt", WORD_MAP))
    assert not any(k.startswith("encoder.") for k in ck["model_state"])
    minimal = {k: v for k, v in tiny_checkpoint().items() if k in ("model_config", "model_state", "word_map")}
    save_checkpoint(tmp_path / "minimal.pt", minimal)
    assert load_checkpoint(tmp_path / "minimal.pt")["word_map"] == WORD_MAP


def test_a_checkpoint_from_before_hard_attention_loads_as_soft(tmp_path) -> None:
    """A model config without `attention` (every checkpoint written before hard attention) is a soft model,
    unchanged: the same outputs as the model it was saved from, and it fits the soft options."""
    ck = tiny_checkpoint()
    del ck["model_config"]["attention"]
    save_checkpoint(path := tmp_path / "old.pt", ck)
    loaded = load_checkpoint(path)
    model, _ = model_from_checkpoint(loaded)
    assert model.config.attention == "soft"
    check_fits(loaded, path, "--init-from", tmp_path, word_map=WORD_MAP, model_cfg=tiny_config())
    torch.manual_seed(0)
    original = Captioner(tiny_config()).eval()
    caps, lens = captions_batch([5, 4])
    with torch.no_grad():
        assert torch.equal(model(images(2), caps, lens).logits, original(images(2), caps, lens).logits)
    with pytest.raises(UserError, match="attention 'soft' \\(checkpoint\\) vs 'hard' \\(options\\)"):
        check_fits(loaded, path, "--init-from", tmp_path, word_map=WORD_MAP, model_cfg=tiny_config(attention="hard"))
