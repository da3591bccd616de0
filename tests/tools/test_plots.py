"""The tools' PNG figures: a line chart draws each series in its colour, inside the axes."""

import pytest
from PIL import Image, ImageColor

from tools.plots import COLOURS, LEFT, RIGHT, TOP, BOTTOM, W, H, line_chart


def test_a_line_chart_draws_every_series_in_its_colour(tmp_path):
    path = line_chart(str(tmp_path / "c.png"), {"rising": [(0, 0), (10, 5)],
                                                "flat": [(0, 2), (10, 2)], "none": []},
                      "title", "step", "loss")
    img = Image.open(path).convert("RGB")
    assert img.size == (W, H)
    inside = img.crop((LEFT + 1, TOP + 1, W - RIGHT, H - BOTTOM))
    colours = {c for _, c in inside.getcolors(W * H)}
    assert {ImageColor.getrgb(COLOURS[0]), ImageColor.getrgb(COLOURS[1])} <= colours
    # the flat series is one horizontal line, 2/5 of the way up from the bottom of the plot
    y = round(H - BOTTOM - 2 / 5 * (H - TOP - BOTTOM))
    assert img.getpixel(((LEFT + W - RIGHT) // 2, y)) == ImageColor.getrgb(COLOURS[1])
    with pytest.raises(ValueError, match="nothing to draw"):
        line_chart(str(tmp_path / "e.png"), {"none": []}, "t", "x", "y")
