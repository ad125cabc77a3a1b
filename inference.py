"""Caption images with a trained checkpoint: greedy and beam-search captions, attention-map pictures.

    python inference.py --checkpoint model_files/<run>/best.pt photo.jpg [more.jpg a_folder ...]
    python inference.py --checkpoint run_a/last.pt run_b/last.pt photo.jpg   # an ensemble of two

For each image it prints the caption without beam search and the caption with beam search:

    photo.jpg
      greedy: a dog runs on the grass
      beam 5: a dog runs through the grass (score -4.21)

or, with --json, one JSON object per line:
{"image", "greedy", "beam", "beam_size", "score", "attention_map" (the PNG's path or null)}.

- A folder argument stands for its image files (by extension, sorted by name, not recursive).
- Images go through `pytorch_dataset_class.preprocess_image`, the function that built the training
  data, at the checkpoint's image size, and are decoded in batches (--batch-size) on --device by
  `imcap.Captioner`, the Python API that app.py uses too.
- The checkpoint alone is needed: the model config, the word map and the image size are in it, and for a
  released model the length penalty it was scored with (used unless --length-penalty says otherwise).
- Several checkpoints (`--checkpoint A.pt B.pt ...`: the list ends at the first argument that is not a .pt
  or .pth file, or at `--`) caption as one ensemble (decoding.Ensemble, docs/training.md, "Ensembles").
- --attention-map PATH writes one PNG per image: the image, then for each word of the beam caption
  the image with that word's attention (upsampled, smoothed, overlaid) and the word as title.
  With one image PATH is the PNG file (unless it is an existing folder or ends with "/"); with
  several it is a folder, holding <image stem>.png (a repeated stem gets _2, _3, ...). A map never
  replaces an input (an image, the checkpoint) or a file that inference.py did not write (its PNGs
  carry a tEXt chunk saying so): such a PATH is refused in one line before anything is written.
- An image that cannot be read (not an image, empty, truncated, over 200 megapixels) is reported on
  stderr as one warning line naming the file and skipped; the others are still captioned (exit 0).
  The exit code is 1 only when no image could be captioned: a single unreadable image is then just
  one error line naming it. A path that does not exist, or a folder without images, is an error
  before anything runs (exit 1); so is a missing, corrupt or untrusted checkpoint (it is read with
  `torch.load(weights_only=True)`: a file that would run code when unpickled is refused). Bad options
  (a beam size, --max-len or --batch-size below 1, --device cuda/mps where there is none) exit 2.
- Any image mode is captioned: 16-bit, CMYK, palette, grey, with transparency (composited on white),
  1 x 1 pixel, up to 200 megapixels (a 12000 x 12000 PNG decodes at full size: 576 MB, 3 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import imcap
from attention_maps import MAP_PANEL_PX, MAP_SOFTWARE, save_attention_map
from checkpoints import RELEASED_MODEL
from cli import EXIT_BAD_OPTION, Parser, UserError, printable, run_cli, workers_int
from decoding import DecodeConfig, add_decode_options, add_ensemble_option
from files import check_output_kinds
from imcap import Result
from pytorch_dataset_class import IMAGE_EXTENSIONS, preprocess_image

CHECKPOINT_SUFFIXES = (".pt", ".pth")  # what --checkpoint A B ... takes as a further checkpoint, not an image


class PathList(list):
    """--checkpoint's value: shown in --help as its paths, not as a list of PosixPath reprs."""

    def __repr__(self) -> str:
        return " ".join(map(str, self))


# ----------------------------------------------------------------------------------------------
# Inputs


def collect_images(args: list[str | os.PathLike]) -> list[Path]:
    """Expand folders to their image files (sorted by name); a missing path is a UserError."""
    paths: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(q for q in p.iterdir()
                           if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith("."))
            if not found:
                raise UserError(f"{p}: folder holds no images ({' '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif p.is_file():
            paths.append(p)  # named explicitly: tried whatever its extension
        else:
            raise UserError(f"{p}: no such file or folder")
    return paths


class ImageFiles(Dataset):
    """Image files -> (uint8 image (3, S, S) or None, index, error message or None), read in DataLoader workers
    as imcap.Captioner.preprocess reads a photo (preprocess_image at the checkpoint's size).

    Errors are returned, not raised, so that one unreadable file does not stop the others.
    """

    def __init__(self, paths: list[Path], image_size: int) -> None:
        self.paths, self.image_size = paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            return torch.from_numpy(preprocess_image(self.paths[i], self.image_size)), i, None  # (3, S, S)
        except UserError as err:
            return None, i, str(err)


def _collate(items: list) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """-> uint8 images (b, 3, S, S) of the readable ones, their indices, (index, error) of the others."""
    ok = [(x, i) for x, i, err in items if err is None]
    images = torch.stack([x for x, _ in ok]) if ok else None  # (b, 3, S, S)
    return images, [i for _, i in ok], [(i, err) for _, i, err in items if err is not None]


# ----------------------------------------------------------------------------------------------
# Decoding


def caption_images(captioner: imcap.Captioner, paths: list[Path], workers: int = 2,
                   progress: bool | None = None) -> Iterator[tuple[int, Result | str]]:
    """Yield, in order, (index in `paths`, Result) for each readable image and (index, error) for each other one."""
    batch_size = captioner.decode.batch_size
    workers = workers if len(paths) > batch_size else 0  # one batch: nothing for a worker to overlap
    loader = DataLoader(ImageFiles(paths, captioner.image_size), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=captioner.device.type == "cuda")
    with tqdm(total=len(paths), desc="caption", unit="img", disable=None if progress is None else not progress,
              file=sys.stderr) as bar:
        for images, indices, errors in loader:
            yield from errors
            if images is not None:
                yield from zip(indices, captioner.batch(images, sources=[paths[i] for i in indices]))
            bar.update(len(indices) + len(errors))


# ----------------------------------------------------------------------------------------------
# Attention-map files


def attention_map_paths(target: str | os.PathLike, images: list[Path]) -> list[Path]:
    """Where each image's picture goes: target itself for one image, target/<stem>.png for several."""
    target_text = str(target)
    target = Path(target)
    if len(images) == 1 and not target.is_dir() and not target_text.endswith(("/", os.sep)):
        return [target]
    if target.exists() and not target.is_dir():
        raise UserError(f"--attention-map {target}: is a file, but {len(images)} images need a folder",
                        EXIT_BAD_OPTION)
    used: set[str] = set()  # casefolded: X.png and x.png are one file on macOS and Windows
    out = []
    for p in images:
        name, k = f"{p.stem}.png", 1
        while name.casefold() in used:  # x.jpg, x.png and x_2.jpg -> x.png, x_2.png, x_2_2.png
            k += 1
            name = f"{p.stem}_{k}.png"
        used.add(name.casefold())
        out.append(target / name)
    return out


def written_by_inference(path: Path) -> bool:
    """Whether `path` is an attention-map PNG that inference.py wrote (its tEXt chunk says so)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.text.get("Software") == MAP_SOFTWARE
    except Exception:  # not an image, unreadable, a folder: not ours
        return False


def check_map_targets(map_paths: list[Path], inputs: list[Path]) -> None:
    """Refuse, before anything is written, an attention-map path that is an input (an image, the checkpoint),
    or an existing file that inference.py did not write: an output never destroys what it did not make.
    Inputs are compared by device and inode, so a link or another spelling of the path is caught too."""
    ids: dict[tuple[int, int], Path] = {}
    for p in inputs:
        with contextlib.suppress(OSError):
            st = p.stat()
            ids[st.st_dev, st.st_ino] = p
    for target in map_paths:
        try:
            st = target.stat()
        except OSError:  # nothing there yet (or in the way: saving says so)
            continue
        if (st.st_dev, st.st_ino) in ids:
            raise UserError(f"--attention-map {target}: is the input {ids[st.st_dev, st.st_ino]}; the map would "
                            "replace it (choose another path)", EXIT_BAD_OPTION)
        if not written_by_inference(target):
            raise UserError(f"--attention-map {target}: exists and is not an attention map inference.py wrote; "
                            "not overwriting it (move it or choose another path)", EXIT_BAD_OPTION)
    check_output_kinds(map_paths, label="--attention-map ")  # a file where a folder above a map goes


# ----------------------------------------------------------------------------------------------
# CLI


def format_text(r: Result) -> str:
    unfinished = "" if r.beam_finished else ", no <end> within --max-len"
    return (f"{printable(str(r.image))}\n  greedy: {r.greedy}\n"
            f"  beam {r.beam_size}: {r.beam} (score {r.beam_score:.2f}{unfinished})")


def format_json(r: Result, attention_map: Path | None) -> str:
    return json.dumps({"image": str(r.image), "greedy": r.greedy, "beam": r.beam, "beam_size": r.beam_size,
                       "score": round(r.beam_score, 6), "attention_map": str(attention_map) if attention_map else None})


def parse_args(argv: list[str] | None = None):
    p = Parser(description="Caption images (files or folders) with a trained checkpoint: greedy and beam search.")
    p.add_argument("images", nargs="*", help="image files or folders of images")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=PathList([RELEASED_MODEL]),
                   help="a checkpoint written by train.py (best.pt), or several (.pt or .pth files) for an ensemble; "
                        "the default is the released Flickr8k model")
    add_decode_options(p)
    add_ensemble_option(p)
    p.add_argument("--workers", type=workers_int, default=2,
                   help="DataLoader processes reading images (0 = main process)")
    p.add_argument("--attention-map", type=Path, default=None, metavar="PATH",
                   help="write attention-map PNGs: a file for one image, a folder for several")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = p.parse_intermixed_args(argv)
    typed = p.typed
    if "--" not in typed:
        # `--checkpoint A.pt photo.jpg`: nargs="+" took the photo too. The checkpoints are the first file and the
        # .pt/.pth files right after it; from the first other file on they are images ("--" says it explicitly).
        n = next((i for i, c in enumerate(args.checkpoint) if i and c.suffix.lower() not in CHECKPOINT_SUFFIXES),
                 len(args.checkpoint))
        images = [*args.images, *map(str, args.checkpoint[n:])]
        args.checkpoint, args.images = args.checkpoint[:n], sorted(images, key=lambda x: typed.index(str(x)))
    if not args.images:
        p.error("the following arguments are required: images")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    decode = DecodeConfig.from_args(args)
    paths = collect_images(args.images)
    map_paths = attention_map_paths(args.attention_map, paths) if args.attention_map else None
    if map_paths is not None:
        check_map_targets(map_paths, [*paths, *args.checkpoint])
    captioner = imcap.load(args.checkpoint, args.device, ensemble_mean=args.ensemble_mean, **asdict(decode))
    started, done, failed = time.perf_counter(), 0, 0
    for i, r in caption_images(captioner, paths, args.workers):
        if not isinstance(r, Result):
            failed += 1
            if len(paths) == 1:  # nothing else to caption: the error line below is all there is to say
                raise UserError(r)
            tqdm.write(f"{Path(sys.argv[0]).name}: warning: skipped {printable(r)}", file=sys.stderr)
            continue
        done += 1
        map_path = None
        if map_paths is not None:
            map_path = map_paths[i]
            display = preprocess_image(r.image, max(captioner.image_size, MAP_PANEL_PX))  # (3, S', S')
            try:
                save_attention_map(display, r.beam_words, r.attention.flatten(1), map_path,  # (T, P)
                                   title=f"beam {r.beam_size}: {r.beam}")
            except OSError as err:
                why = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
                raise UserError(f"--attention-map {map_path}: cannot write it ({why})") from None
        line = format_json(r, map_path) if args.json else format_text(r)
        tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
    if done == 0:
        raise UserError(f"none of the {len(paths)} images could be read (see the warnings above)")
    seconds = time.perf_counter() - started
    print(f"captioned {done} of {len(paths)} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} images/s, "
          f"{captioner.precision})" + (f", {failed} unreadable" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
