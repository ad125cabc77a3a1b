"""Attention-map pictures: each word's attention over the image, upsampled, smoothed and overlaid.

inference.py --attention-map writes them as PNG files; the web page (app.py) shows the same panels; train.py
--tensorboard logs one picture per epoch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from files import atomic_path, writing

if TYPE_CHECKING:
    from PIL import Image

MAP_PANEL_PX = 128  # side of one panel of the attention-map picture
MAP_COLUMNS = 5
MAP_OVERLAY_ALPHA = 0.6
# The tEXt chunk that marks the attention maps inference.py writes: only such a PNG may be overwritten.
MAP_SOFTWARE = "imcap inference.py attention map"


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


def attention_picture(image: np.ndarray, words: list[str], alphas: torch.Tensor,
                      title: str | None = None) -> Image.Image:
    """The attention-map picture as a PIL RGB image: the image, then one panel per word, in a grid.

    image: uint8 (3, S, S) as preprocess_image gives it; alphas: (len(words), P). Each word's
    panel is the image with the word's attention (attention_panels), the word above it; `title`
    (the caption) heads the picture. Composed with PIL rather than matplotlib figures: 50x faster,
    which matters for a folder of images. save_attention_map writes it; train.py --tensorboard logs it.
    """
    from PIL import Image, ImageDraw

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
    return canvas


def save_attention_map(image: np.ndarray, words: list[str], alphas: torch.Tensor, path: str | os.PathLike,
                       title: str | None = None) -> Path:
    """Write the attention-map picture (attention_picture) atomically as a 256-colour PNG (a 10-word
    picture of a photo is about 100 KB). image: uint8 (3, S, S); alphas: (len(words), P)."""
    from PIL import Image, PngImagePlugin

    canvas = attention_picture(image, words, alphas, title)
    marker = PngImagePlugin.PngInfo()
    marker.add_text("Software", MAP_SOFTWARE)  # lets a later run overwrite this file, and no other
    path = Path(path)
    with atomic_path(path) as tmp, writing(path):
        canvas.quantize(256, method=Image.Quantize.FASTOCTREE).save(tmp, format="PNG", optimize=True, pnginfo=marker)
    return path
