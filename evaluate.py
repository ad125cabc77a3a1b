"""Score a checkpoint on a split with the COCO caption metrics, for several beam sizes.

    python evaluate.py --checkpoint model_files/<run>/best.pt --data data/processed/shapes \\
        --split test --beam-sizes 1 3 5
    python evaluate.py --checkpoint run_a/last.pt run_b/last.pt --out-dir runs/ensemble_ab ...   # an ensemble

Every image of the split is decoded once per beam size (batched beam search; beam 1 is the
greedy caption) and scored against all its raw reference captions (the Karpathy tokens stored in
the split file, never mapped to `<unk>`):
- pycocoevalcap BLEU-1..4, METEOR, ROUGE-L and CIDEr after the PTB tokenizer, as the COCO caption
  evaluation computes them (SPICE is left out: it downloads models at run time). Without `java`,
  one line says so, captions are tokenized in Python and METEOR is skipped (see metrics.py);
- nltk's corpus BLEU-4 on the raw tokens, the number the sgrvinod tutorial reports;
- for the shapes dataset, exact correctness from the generator's ground truth: objects right
  (every object's colour and shape, % of images), relation right (% of two-object images), and
  all right (% of images);
- diversity: distinct captions (different captions per 100 images) and the share of the model's vocabulary
  (special tokens left out) that the captions use.

Several checkpoints score as one ensemble (decoding.Ensemble, as in inference.py: --ensemble-mean); they must
share the word map, image size and grid, and --out-dir is required, so that the files of a member are never
replaced by the ensemble's.

Output: a markdown table on stdout (rows: beam size; scores x 100, as in the paper's tables), and
beside the checkpoint (or in --out-dir), written atomically:
- `results_<split>.json`: every number, with the settings that produced it (the length penalty used:
  --length-penalty, else the one a released model stores, else 0; release.py passes it on to the release);
- `predictions_<split>_beam<k>.json`: `[{"image_id", "caption"}]` in the COCO results format;
- `references_<split>.json`: the references in the COCO caption annotation format, so anyone can
  rescore the predictions with their own tools (pycocotools' COCO(...).loadRes works on the pair).
`image_id` is the image's filename stem (its index in the split when stems repeat). With
--max-images N the split name in these file names becomes `<split>_first<N>`.

The checkpoint must have been trained on this data's word map and image size: a mismatch is
refused, as is a data folder whose word_map.json is not the one its split file was built with.
User mistakes (a missing, corrupt or untrusted checkpoint, missing or truncated data, options out of
range, --device cuda/mps where there is none) end with one line on stderr: exit 2 for options, 1 for
input. Checkpoints are read with `torch.load(weights_only=True)`: a file that would run code when
unpickled is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from all_models import Captioner
from checkpoints import Loaded, check_fits, load_ensemble
from cli import (
    EXIT_BAD_OPTION,
    Parser,
    UserError,
    int_in,
    pick_device,
    positive_int,
    run_cli,
    workers_int,
)
from decoding import (
    DecodeConfig,
    Ensemble,
    add_decode_options,
    add_ensemble_option,
    beam_search,
    check_limit,
)
from files import atomic_write_texts, check_output_kinds, require_dir, writable_dir
from metrics import (
    JAVA_MISSING,
    NLTK_BLEU4,
    SHAPES_KEYS,
    coco_metrics_many,
    diversity,
    format_report,
    java_available,
    nltk_bleu4,
    shapes_correctness,
)
from pytorch_dataset_class import ImageDataset, Vocab, to_model_input

SPLITS = ("train", "val", "test")


def _json_text(obj: object) -> str:
    return json.dumps(obj, indent=1) + "\n"


def check_data_word_map(attrs: dict, h5_path: Path) -> None:
    """Refuse a data folder whose word_map.json is not the one `h5_path` was built with.

    Scoring needs only the split file (its references are raw tokens), so a folder without
    word_map.json is fine; an edited or foreign one means the folder was mixed up.
    """
    wm_file = h5_path.parent / "word_map.json"
    built_with = str(attrs.get("word_map_sha1") or "")
    if not wm_file.is_file() or not built_with:
        return
    sha1 = Vocab.hash(wm_file)
    if sha1 != built_with:
        raise UserError(f"--data {h5_path.parent}: word_map.json (sha1 {sha1[:12]}) is not the word map "
                        f"{h5_path.name} was built with (sha1 {built_with[:12]}); rebuild the folder with "
                        "make_dataset.py")


def image_ids(filenames: Sequence[str]) -> list[str]:
    """COCO image_id of each image: the filename stem, or the index in the split when stems repeat."""
    stems = [Path(f).stem for f in filenames]
    return stems if len(set(stems)) == len(stems) else [str(i) for i in range(len(stems))]


@torch.no_grad()
def decode_split(model: Captioner | Ensemble, vocab: Vocab | dict[str, int], loader: DataLoader, n_images: int,
                 decode: DecodeConfig, progress: bool | None = None) -> tuple[list[list[str]], float]:
    """Beam-search captions (word lists, in split order) of every image in `loader`, and images/s.

    The batches are the loader's, not `decode.batch_size`."""
    device = next(model.parameters()).device
    vocab = Vocab.of(vocab)
    captions: list[list[str] | None] = [None] * n_images  # indexed by the image's index in the split
    start = time.perf_counter()
    with tqdm(total=n_images, desc=f"beam {decode.beam_size}", unit="img",
              disable=None if progress is None else not progress, file=sys.stderr) as bar:
        for x, _, _, index in loader:
            with decode.autocast(device):
                a = model.annotations(to_model_input(x, device))  # (B, P, D)
                caps = beam_search(model.decoder, a, vocab, decode.beam_size, decode.max_len, decode.penalty,
                                   decode.hard_context)
            for i, cap in zip(index.tolist(), caps):
                captions[i] = [w.lower() for w in vocab.decode(cap.tokens)]
            bar.update(len(caps))
    seconds = time.perf_counter() - start
    assert all(c is not None for c in captions)
    return captions, n_images / max(seconds, 1e-9)


def evaluate(checkpoint: str | os.PathLike | Sequence[str | os.PathLike], data: str | os.PathLike,
             split: str = "test", decode: DecodeConfig | None = None, *, beam_sizes: Sequence[int] = (1, 3, 5),
             workers: int = 2, device: str = "auto", max_images: int | None = None,
             out_dir: str | os.PathLike | None = None, java: bool | None = None, progress: bool | None = None,
             ensemble_mean: str = "log-prob", meteor: bool = True) -> dict:
    """Decode `split` of `data` with each beam size, score it, write the files; return results.json's dict.

    checkpoint: one path, or several for an ensemble (then `out_dir` is required; ensemble_mean: how their
    next-word distributions are averaged, decoding.ENSEMBLE_MEANS).
    decode: max_len, batch_size and the length penalty (unset: the checkpoint's, else 0); each of `beam_sizes`
    replaces its beam_size (None: DecodeConfig's defaults). java: None = use Java when it is on PATH (the PTB
    tokenizer and METEOR); False = Python tokenizer, no METEOR. meteor=False: no METEOR, the other scores the
    same (metrics.coco_metrics_many). Scores are fractions (1.0 = perfect);
    "images_per_s" is each beam size's decoding speed; "length_penalty" is the one used.
    """
    paths = [Path(checkpoint)] if isinstance(checkpoint, (str, os.PathLike)) else [Path(c) for c in checkpoint]
    data = require_dir(data, "processed data", "--data")
    beam_sizes = _check_options(paths, split, beam_sizes, out_dir)
    h5_path = data / f"{split}.h5"
    if not h5_path.is_file():
        raise UserError(f"--data {data}: no {split}.h5 (run make_dataset.py first)")
    dev = pick_device(device)
    out_dir = Path(out_dir) if out_dir is not None else paths[0].parent
    dataset = ImageDataset(h5_path)
    loaded = _load_fitting(paths, dataset, dev, decode if decode is not None else DecodeConfig(), ensemble_mean)
    # before decoding, not after minutes of it
    writable_dir(out_dir, "--out-dir", "the results go beside the checkpoint unless --out-dir says otherwise")

    images = _Images.read(dataset, split, max_images)
    check_output_kinds(output_paths(out_dir, images.tag, beam_sizes).values(),
                       hint="; evaluate.py writes its results there: move it away, or choose another --out-dir")
    loader = DataLoader(images.subset, batch_size=loaded.decode.batch_size, shuffle=False,
                        num_workers=workers if images.n > loaded.decode.batch_size else 0,
                        pin_memory=dev.type == "cuda")
    predictions = {}
    speed = {}
    for k in beam_sizes:
        predictions[k], speed[k] = decode_split(loaded.model, loaded.vocab, loader, images.n,
                                                replace(loaded.decode, beam_size=k), progress)

    settings = {
        "checkpoint": str(paths[0]) if len(paths) == 1 else [str(p) for p in paths],
        **({"ensemble_mean": ensemble_mean} if len(paths) > 1 else {}),
        "data": str(data), "split": split, "dataset": dataset.attrs.get("dataset"),
        "n_images": images.n, "beam_sizes": beam_sizes, "max_len": loaded.decode.max_len,
        "length_penalty": loaded.decode.length_penalty, "hard_context": loaded.decode.hard_context,
        "device": str(dev), "precision": loaded.precision,
    }
    results, refs = _score(settings, predictions, speed, images, loaded.vocab, java, out_dir, meteor)
    atomic_write_texts(_output_files(results, predictions, images, refs))
    return results


def _check_options(paths: list[Path], split: str, beam_sizes: Sequence[int],
                   out_dir: str | os.PathLike | None) -> list[int]:
    """The options that need no file, checked before any file is read: -> the beam sizes, each once."""
    if len(paths) > 1 and out_dir is None:
        raise UserError(f"--checkpoint: {len(paths)} checkpoints score as an ensemble; say where its files go with "
                        "--out-dir (beside a member they would replace its own results)", EXIT_BAD_OPTION)
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}", EXIT_BAD_OPTION)
    beam_sizes = list(dict.fromkeys(int(k) for k in beam_sizes))
    if not beam_sizes:
        raise UserError("--beam-sizes: give at least one beam size", EXIT_BAD_OPTION)
    for k in beam_sizes:
        check_limit("beam_size", k)
    return beam_sizes


def _load_fitting(paths: list[Path], dataset: ImageDataset, device: torch.device, decode: DecodeConfig,
                  ensemble_mean: str) -> Loaded:
    """The checkpoints' model, once each is known to fit the split's data (its word map and image size)."""
    attrs, h5_path = dataset.attrs, dataset.h5_path
    check_data_word_map(attrs, h5_path)
    try:  # scoring needs only the split file: the folder may lack word_map.json
        data_word_map = json.loads((h5_path.parent / "word_map.json").read_text())
    except (OSError, ValueError):
        data_word_map = None

    def fits(ckpt: dict, path: Path) -> None:
        check_fits(ckpt, path, "--checkpoint", h5_path, word_map=data_word_map,
                   word_map_sha1=attrs.get("word_map_sha1"), vocab_size=attrs.get("vocab_size"),
                   image_size=attrs.get("image_size"), fix="evaluate on the data the model was trained on")

    return load_ensemble(paths, device, decode, check=fits, mean=ensemble_mean)


@dataclass
class _Images:
    """The images of the split that are scored (the first n) and what they are scored against."""

    n: int
    tag: str  # the split's name in the file names: "test", or "test_first<n>" for a part of it
    subset: Dataset  # the dataset, or its first n images
    references: list[list[list[str]]]  # per image: token lists
    ids: list[str]  # COCO image_id of each image
    truths: list[dict]  # per image: the shapes ground truth ({} for real data)
    is_shapes: bool

    @classmethod
    def read(cls, dataset: ImageDataset, split: str, max_images: int | None) -> _Images:
        n_total = len(dataset)
        n = min(max_images, n_total) if max_images else n_total
        if n == 0:
            raise UserError(f"{dataset.h5_path}: the split holds no images")
        references, ids, truths = dataset.references()[:n], image_ids(dataset.filenames()[:n]), dataset.meta()[:n]
        is_shapes = dataset.attrs.get("dataset") == "shapes" and all(isinstance(t, dict) and "objects" in t
                                                                     for t in truths)
        subset = dataset if n == n_total else Subset(dataset, range(n))
        return cls(n, split if n == n_total else f"{split}_first{n}", subset, references, ids, truths, is_shapes)


def _score(settings: dict, predictions: dict[int, list[list[str]]], speed: dict[int, float], images: _Images,
           vocab: Vocab, java: bool | None, out_dir: Path, meteor: bool = True) -> tuple[dict, dict[str, list[str]]]:
    """results.json's dict (the `settings` that produced the numbers, then the numbers of each beam size) and the
    references as raw strings per image_id."""
    if java is None:
        java = java_available()
        if not java:
            print(JAVA_MISSING, file=sys.stderr)
    info: dict = {}
    refs = {i: [" ".join(t) for t in r] for i, r in zip(images.ids, images.references)}
    beam_sizes = list(predictions)
    coco = coco_metrics_many(refs, [{i: " ".join(c) for i, c in zip(images.ids, predictions[k])} for k in beam_sizes],
                             java=java, info=info, meteor=meteor)
    paths = output_paths(out_dir, images.tag, beam_sizes)
    results = {**settings, "tokenizer": info.get("tokenizer"), "meteor": info.get("meteor"),
               "references": str(paths["references"]), "metrics": {}}
    vocabulary = [w.lower() for w in vocab.word_map if w not in Vocab.SPECIAL]
    for k, scores in zip(beam_sizes, coco):
        m = results["metrics"][str(k)] = _metrics(scores, predictions[k], images, vocabulary, results)
        m.update(images_per_s=speed[k], predictions=str(paths[k]))
    results["results"] = str(paths["results"])
    return results, refs


def output_paths(out_dir: Path, tag: str, beam_sizes: Sequence[int]) -> dict[str | int, Path]:
    """The files evaluate writes: "references", "results", and each beam size's predictions."""
    return {"references": out_dir / f"references_{tag}.json", "results": out_dir / f"results_{tag}.json",
            **{k: out_dir / f"predictions_{tag}_beam{k}.json" for k in beam_sizes}}


def _metrics(scores: dict[str, float], predictions: list[list[str]], images: _Images, vocabulary: list[str],
             results: dict) -> dict:
    """One beam size's numbers: the COCO `scores`, nltk's BLEU-4, the shapes correctness (whose count of
    two-object images goes to `results`) and the diversity."""
    m = dict(scores)
    m[NLTK_BLEU4] = nltk_bleu4(images.references, predictions)
    if images.is_shapes:
        sc = shapes_correctness(predictions, images.truths)
        m.update(zip(SHAPES_KEYS, (sc["objects_right"], sc["relation_right"], sc["all_right"])))
        results["n_two_objects"] = sc["n_two_objects"]
    m.update(diversity(predictions, vocabulary))
    return m


def _output_files(results: dict, predictions: dict[int, list[list[str]]], images: _Images,
                  refs: dict[str, list[str]]) -> dict[Path, str]:
    """Every file evaluate writes (path -> text), written together: a full disk leaves the previous ones as they
    were."""
    outputs: dict[Path, str] = {}
    for k, m in zip(results["beam_sizes"], results["metrics"].values()):
        outputs[Path(m["predictions"])] = _json_text([{"image_id": i, "caption": " ".join(c)}
                                                      for i, c in zip(images.ids, predictions[k])])
    ann = [{"image_id": i, "id": j, "caption": c}
           for j, (i, c) in enumerate((i, c) for i, cs in refs.items() for c in cs)]
    outputs[Path(results["references"])] = _json_text(
        {"info": {"description": f"{results['dataset']} {results['split']} references"}, "licenses": [],
         "type": "captions", "images": [{"id": i} for i in images.ids], "annotations": ann})
    outputs[Path(results["results"])] = _json_text(results)
    return outputs


def parse_args(argv: list[str] | None = None):
    p = Parser(description="COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) of a checkpoint on a "
                           "split, for several beam sizes.")
    p.add_argument("--checkpoint", required=True, type=Path, nargs="+",
                   help="a checkpoint written by train.py (best.pt), or several for an ensemble")
    p.add_argument("--data", required=True, type=Path, help="processed data folder (data/processed/<name>)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split to score")
    p.add_argument("--beam-sizes", type=int_in(1, DecodeConfig.LIMITS["beam_size"]), nargs="+", default=[1, 3, 5],
                   help="beam sizes to compare")
    add_decode_options(p, skip=("beam_size",))
    add_ensemble_option(p)
    p.add_argument("--workers", type=workers_int, default=2, help="DataLoader processes (0 = main process)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--max-images", type=positive_int, default=None, help="score only the first N images")
    p.add_argument("--out-dir", type=Path, default=None, help="where the files go (default: the checkpoint's folder)")
    p.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=True,
                   help="score METEOR (needs java); --no-meteor saves the 10 s its Java process takes to start on a "
                        "2-core CPU, and changes no other score")
    args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = evaluate(args.checkpoint, args.data, args.split, DecodeConfig.from_args(args),
                       beam_sizes=args.beam_sizes, workers=args.workers, device=args.device,
                       max_images=args.max_images, out_dir=args.out_dir, ensemble_mean=args.ensemble_mean,
                       meteor=args.meteor)
    print(format_report(results))
    return results


if __name__ == "__main__":
    run_cli(main)
