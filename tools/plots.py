"""Line charts as PNG files, drawn with pillow (a runtime dependency already), for the tools'
figures: the pool usage of a run over training (poolreport.py) and the arms' pre-training losses
(ablations.py). Matplotlib would draw nicer ones, but it would be one more dependency for a few
figures whose job is to show a trend at a glance.

    line_chart("losses.png", {"all": [(20, 9.1), (40, 7.2)], "mlm": [...]}, "pre-training loss",
               "step", "loss")
"""

from PIL import Image, ImageDraw, ImageFont

# colour-blind-safe (Okabe-Ito), in the order the series come
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 800, 480, 70, 170, 40, 50  # canvas and margins, pixels


def _ticks(lo, hi, n=5):
    """n + 1 round-ish tick values spanning [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def _label(v):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(path, series, title, xlabel, ylabel):
    """Draw {label: [(x, y), ...]} as lines with a legend, axes and ticks into the PNG `path`; an
    empty series is left out of the axes but kept in the legend."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        raise ValueError(f"nothing to draw in {path}: every series is empty")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    px = lambda x: LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)  # noqa: E731
    py = lambda y: H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)  # noqa: E731
    draw.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    for t in _ticks(x0, x1):
        draw.line([px(t), H - BOTTOM, px(t), H - BOTTOM + 4], fill="black")
        draw.text((px(t) - 12, H - BOTTOM + 6), _label(t), fill="black", font=font)
    for t in _ticks(y0, y1):
        draw.line([LEFT - 4, py(t), LEFT, py(t)], fill="black")
        draw.line([LEFT, py(t), W - RIGHT, py(t)], fill="#e6e6e6")
        draw.text((4, py(t) - 6), _label(t), fill="black", font=font)
    draw.text((LEFT, 12), title, fill="black", font=font)
    draw.text(((LEFT + W - RIGHT) // 2 - 20, H - 18), xlabel, fill="black", font=font)
    draw.text((4, TOP - 16), ylabel, fill="black", font=font)
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = [(px(x), py(y)) for x, y in sorted(pts)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = TOP + 6 + 16 * i
        draw.line([W - RIGHT + 10, ly + 6, W - RIGHT + 30, ly + 6], fill=colour, width=3)
        draw.text((W - RIGHT + 36, ly), str(name)[:20], fill="black", font=font)
    img.save(path)
    return path
