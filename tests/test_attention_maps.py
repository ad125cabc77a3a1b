"""attention_maps.py: the smoothed maps, the panels and the PNG that inference.py, the web page and TensorBoard show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attention_maps import (
    MAP_PANEL_PX,
    MAP_SOFTWARE,
    attention_panels,
    attention_picture,
    save_attention_map,
    smooth_maps,
)


def one_hot_maps(n: int, g: int) -> torch.Tensor:
    """n attention distributions over a g x g grid, the k-th all on region k: (n, g * g)."""
    return torch.eye(g * g)[:n]  # (n, P)


def test_smooth_maps_keep_the_attended_place_and_the_grid_is_checked() -> None:
    g, size = 4, 64
    maps = smooth_maps(one_hot_maps(3, g), size)  # (3, size, size)
    assert maps.shape == (3, size, size)
    assert bool((maps >= 0).all())
    cell = size // g
    for k in range(3):  # region k sits in grid row 0, column k: the map's peak lies in that cell
        row, col = divmod(int(maps[k].argmax()), size)
        assert row // cell == 0 and col // cell == k
    with pytest.raises(ValueError, match="square grid"):
        smooth_maps(torch.full((1, 5), 0.2), size)


def test_panels_are_the_image_then_one_overlay_per_word() -> None:
    image = np.full((3, 32, 32), 200, dtype=np.uint8)  # (3, S, S) as preprocess_image gives it
    panels = attention_panels(image, one_hot_maps(2, 2), side=48)
    assert len(panels) == 3 and all(p.shape == (48, 48, 3) for p in panels)
    assert np.allclose(panels[0], 200.0)  # the first panel is the image itself, resized
    assert not np.allclose(panels[1], panels[2])  # two words that looked at different places differ
    assert len(attention_panels(image, torch.zeros(0, 4), side=48)) == 1  # no word: the image alone


def test_the_picture_has_a_panel_per_word_and_refuses_a_count_mismatch() -> None:
    image = np.zeros((3, 16, 16), dtype=np.uint8)
    words = ["a", "red", "square"]
    picture = attention_picture(image, words, one_hot_maps(3, 2), title="a red square")
    assert picture.mode == "RGB" and picture.width >= 4 * MAP_PANEL_PX  # the image and 3 words in one row
    with pytest.raises(ValueError, match="3 words but 2 attention maps"):
        attention_picture(image, words, one_hot_maps(2, 2))


def test_the_saved_png_is_marked_as_ours_and_leaves_no_temporary_file(tmp_path) -> None:
    path = save_attention_map(np.zeros((3, 16, 16), dtype=np.uint8), ["a", "circle"], one_hot_maps(2, 2),
                              tmp_path / "map.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.text.get("Software") == MAP_SOFTWARE  # inference.py may replace it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]
