"""A synthetic mirror of the nine datasets PTUnifier uses, and of MS-CXR (phrase grounding on
MIMIC-CXR films), each in its official on-disk layout.

Real MIMIC-CXR, CheXpert, ROCO, ... are credentialed or large; this module samples one small latent
world from a seed and writes it out in the release formats, so that `prepare`, pre-training and
every downstream task run offline:

    # `python train.py`'s world: ~50 s, 2 cores
    python -m ptunifier_min.datasets.synth --out data/raw --scale default
    # trivial baselines of a prepared world
    python -m ptunifier_min.datasets.synth --floors data/prepared
    # real-size images (~2,500 px)
    python -m ptunifier_min.datasets.synth --out data/raw_real --scale tiny --real-size

    from ptunifier_min.datasets.synth import generate
    counts = generate("data/raw", seed=0, scale="tiny")  # what prepare must keep / drop

The world has two kinds of things. Chest radiograph studies (MIMIC-CXR, CheXpert, RSNA, RadNLI)
carry a latent state: findings with side, zone and severity, co-occurring through shared causes
(heart failure, infection, intensive care), a view, and a report written from that state with
paraphrase, negation and hedging; CheXpert-style labels come from the sentences of the report
(hedged -> -1.0); MS-CXR boxes the findings of some MIMIC-CXR films where the renderer drew them.
Medical figures (ROCO, MedICaT, VQA-RAD, SLAKE, VQA-Med) carry a modality, organ,
plane and a localised finding, rendered in a per-modality style, and captions / questions name them.
Every finding is a localised pattern on randomly posed anatomy, so a linear model on raw pixels
stays well below what a small ViT can learn (see `--floors`). Ids, file names, image sizes, row
order and JPEG sizes are drawn independently of every label. Everything is a function of the seed:
one numpy Generator per (seed, dataset, item), never global state.

Counting conventions for synth_counts.json, where the contract leaves a choice (the most literal
reading):
- rules apply in the order the contract lists them, and a record is counted under the first rule
  that drops it;
- texts are counted per record: MIMIC short_text counts each short section once per kept frontal
  image, MedICaT short_text counts the s2_caption and each inline reference of radiology figures;
  null references are not texts;
- MIMIC: a "section" is the text under FINDINGS: / IMPRESSION:; mimic_sum drops a study without
  findings as no_findings, else a study whose impression is missing or has < 3 words as
  no_impression; a findings section always has >= 3 words;
- roco_retrieval reports the same dropped counts as roco (it is made from the same filtered pool);
- rsna box_rows_merged = label rows - patients (every row beyond a patient's first is folded
  into it);
- splits prepare draws with its own seed (MedICaT val/test, CheXpert val, RSNA, VQA-RAD val) are
  reported as {"total": n};
- ms_cxr has no entry: prepare keeps every phrase of its CSV, no rule drops one.
Patient side is radiological: a patient's right is on the image's left.
"""

import argparse
import csv
import gzip
import io
import json
import math
import os
import shutil
import textwrap
import time
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from .workers import deferred_stop, ordered_map

DATASETS = ("roco", "medicat", "mimic_cxr", "chexpert", "rsna", "radnli", "vqa_rad", "slake",
            "medvqa2019", "ms_cxr")

# roco: radiology pairs per split (train, val, test); medicat: radiology figures; mimic: studies per
# split; chexpert: (train rows, valid rows); rsna: patients; radnli: (mli_train, dev, test);
# vqa_rad: images (~10 QA each); slake: images per split (~10 English QA each); medvqa: images per
# split (4 QA each for train/val, 1 for test); ms_cxr: MIMIC films per split (train, validate,
# test; all there are, when fewer), ~1.6 phrases each.
SCALES = {
    "tiny": dict(roco=(24, 8, 8), medicat=40, mimic=(14, 5, 5), chexpert=(40, 12), rsna=30,
                 radnli=(24, 12, 12), vqa_rad=5, slake=(3, 2, 2), medvqa=(6, 3, 10),
                 ms_cxr=(6, 3, 3)),
    "small": dict(roco=(1200, 150, 500), medicat=800, mimic=(900, 60, 120), chexpert=(1000, 234),
                  rsna=500, radnli=(500, 120, 120), vqa_rad=80, slake=(60, 12, 12),
                  medvqa=(150, 30, 60), ms_cxr=(120, 20, 40)),
    "default": dict(roco=(5000, 500, 2100), medicat=3500, mimic=(3900, 240, 480),
                    chexpert=(3000, 234), rsna=2000, radnli=(2000, 480, 480), vqa_rad=350,
                    slake=(230, 50, 50), medvqa=(600, 100, 200), ms_cxr=(300, 80, 160)),
}


# ------------------------------------------------------------------------------------------ helpers

def _rng(seed, *keys):
    """An independent stream per (seed, dataset, item): a file never depends on what was generated
    before it."""
    return np.random.default_rng([seed, *keys])


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _choose(rng, options, p):
    """One of options with probabilities p (a scalar draw; Generator.choice with p= costs ~20x more
    per call)."""
    r = rng.random()
    for option, q in zip(options, p):
        r -= q
        if r < 0:
            return option
    return options[-1]


def _ids(rng, n, lo, hi):
    """n distinct random integers in [lo, hi): ids carry no order or label."""
    return [int(i) + lo for i in rng.choice(hi - lo, size=n, replace=False)]


def _hex(rng, groups, sep="-"):
    return sep.join("".join(f"{b:02x}" for b in rng.integers(0, 256, g // 2)) for g in groups)


def _force(cases, values):
    """Make the first entries take the given values so that every drop rule occurs at least once at
    any scale."""
    cases[:len(values)] = values[:len(cases)]
    return cases


def _write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def _csv_text(header, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_gz(path, text):
    # mtime=0 and no file name in the header keep the gzip bytes a function of the content alone
    with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
        g.write(text.encode("utf-8"))


def _save(arr, path, rng):
    """Write uint8 pixels; JPEG quality is drawn at random so file sizes follow the noise, not the
    findings."""
    path, img = Path(path), Image.fromarray(arr)
    # fast zlib for PNG: the default level costs more than rendering the image
    options = (dict(compress_level=1) if path.suffix == ".png"
               else dict(quality=int(rng.integers(85, 96))))
    # a stop signal waits for the file to be whole (a worker has the signals' default actions)
    with deferred_stop():
        try:
            img.save(path, **options)
        except FileNotFoundError:  # first file of its folder (cheaper than a mkdir call per image)
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, **options)


def _size(rng, hs=(128, 144), ws=(112, 128, 144)):
    return int(_pick(rng, hs)), int(_pick(rng, ws))


# ----------------------------------------------------------------------------- rendering primitives

def _grid(h, w):
    """Pixel centres normalised so that the shorter side spans [-1, 1];
    u grows rightwards, v downwards."""
    s = min(h, w) / 2
    u = ((np.arange(w) + 0.5 - w / 2) / s).astype(np.float32)
    v = ((np.arange(h) + 0.5 - h / 2) / s).astype(np.float32)
    return np.meshgrid(u, v)


def _pose(u, v, rng, rot=7.0, scale=(0.86, 1.04), shift=0.07):
    """Random rotation / scale / shift of the body: image coords (u, v) -> body coords (x, y), plus
    the forward map."""
    a, s = math.radians(rng.uniform(-rot, rot)), rng.uniform(*scale)
    tx, ty = map(float, rng.uniform(-shift, shift, 2))
    c, sn = math.cos(a), math.sin(a)
    x = (c / s) * (u - tx) + (sn / s) * (v - ty)
    y = (c / s) * (v - ty) - (sn / s) * (u - tx)

    def forward(px, py):  # body -> image coordinates, the inverse of the map above
        return s * (c * px - sn * py) + tx, s * (sn * px + c * py) + ty
    return x, y, forward


def _radius(x, y, cx, cy, rx, ry, angle=0.0):
    """Normalised elliptic radius: < 1 inside the (rotated) ellipse."""
    # python floats, not numpy float64 scalars, keep the arithmetic in float32 (4x faster)
    c, s, cx, cy, rx, ry = (math.cos(angle), math.sin(angle), float(cx), float(cy), float(rx),
                            float(ry))
    dx, dy = x - cx, y - cy
    if angle == 0.0:
        return np.sqrt((dx * (1 / rx)) ** 2 + (dy * (1 / ry)) ** 2)
    return np.sqrt(((c * dx + s * dy) * (1 / rx)) ** 2 + ((c * dy - s * dx) * (1 / ry)) ** 2)


def _ellipse(x, y, cx, cy, rx, ry, angle=0.0, edge=0.03):
    """Soft-edged filled ellipse in [0, 1]; the edge width is in body units so shapes stay smooth at
    any size."""
    return np.clip((1 - _radius(x, y, cx, cy, rx, ry, angle)) * float(min(rx, ry) / edge) + 0.5,
                   0, 1)


def _step(t):
    """Soft step from 0 (t < -1) to 1 (t > 1): a linear ramp, far cheaper than tanh on every
    pixel."""
    return np.clip(0.5 + 0.5 * t, 0, 1)


def _segment(x, y, p0, p1, width):
    """Gaussian profile around the segment p0-p1 (a tube, a wire, a fracture line, a band of
    atelectasis)."""
    (x0, y0), (x1, y1) = map(float, p0), map(float, p1)
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) * (1 / (dx * dx + dy * dy + 1e-9)), 0, 1)
    return np.exp(((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2) * float(-1 / (width * width)))


@lru_cache(maxsize=64)
def _interp(n, cells):
    """Linear interpolation matrix (n x cells+1) that upsamples a coarse random grid to n pixels."""
    t = np.linspace(0, cells, n)
    i = np.minimum(t.astype(int), cells - 1)
    m = np.zeros((n, cells + 1), np.float32)
    m[np.arange(n), i], m[np.arange(n), i + 1] = 1 - (t - i), t - i
    return m


def _smooth_noise(rng, shape, cells):
    """Zero-mean, unit-scale random field varying over about 1/cells of the image (matrix
    upsampling, no loops)."""
    g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return _interp(shape[0], cells) @ g @ _interp(shape[1], cells).T


def _blur(img, sigma):
    """Separable Gaussian blur as sums of shifted slices: BLAS matrix products thrash on a busy
    2-core machine."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).tolist()
    for axis in (0, 1):
        pad = np.pad(img, [(r, r) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        n = img.shape[axis]
        img = sum(kk * (pad[i:i + n] if axis == 0 else pad[:, i:i + n]) for i, kk in enumerate(k))
    return img


def _to_uint8(img):
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- chest radiograph world

CXR_FINDINGS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "pneumothorax",
                "nodule", "devices")
LABEL_OF = dict(atelectasis="Atelectasis", cardiomegaly="Cardiomegaly",
                consolidation="Consolidation", edema="Edema", effusion="Pleural Effusion",
                pneumothorax="Pneumothorax", nodule="Lung Lesion", devices="Support Devices")
# mimic-cxr-2.0.0-chexpert.csv: alphabetical;
# CheXpert train.csv / valid.csv: the release's own order
MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
                "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
                "Support Devices"]
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                   "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                   "Support Devices"]
FRONTAL = ("PA", "AP")
# how often a report states that an absent finding is absent ("No pleural effusion.")
SAID_ABSENT = dict(effusion=0.7, pneumothorax=0.6, consolidation=0.5, edema=0.35, cardiomegaly=0.5,
                   atelectasis=0.05, nodule=0.05)
ZONE_Y = {"upper": -0.38, "middle": -0.08, "lower": 0.2}  # body-space height of each lung zone


def sample_study(rng, view=None, exclude=()):
    """Latent state of one chest study: findings (side, zone, severity) and how the report will word
    each one.

    Three hidden causes (heart failure, infection, intensive care) raise related findings together,
    which gives the plausible but imperfect co-occurrence of real data (edema with cardiomegaly and
    effusion, devices on AP films).
    """
    hf, inf, icu = rng.random(3) < (0.25, 0.2, 0.25)
    p = dict(atelectasis=0.1 + 0.15 * inf + 0.15 * icu, cardiomegaly=0.06 + 0.45 * hf,
             consolidation=0.04 + 0.5 * inf, edema=0.05 + 0.45 * hf + 0.1 * icu,
             effusion=0.08 + 0.35 * hf + 0.15 * inf + 0.1 * icu, pneumothorax=0.02 + 0.06 * icu,
             nodule=0.06, devices=0.04 + 0.7 * icu)
    attrs, status, found = {}, {}, {}
    for f in CXR_FINDINGS:
        a = {"severity": rng.uniform(0.25, 1.0),
             "zone": _choose(rng, ("upper", "middle", "lower"), (0.25, 0.3, 0.45)),
             "side": _choose(rng, ("right", "left", "bilateral"), (0.45, 0.35, 0.2))}
        if f in ("consolidation", "pneumothorax", "nodule") and a["side"] == "bilateral":
            a["side"] = _pick(rng, ("right", "left"))
        if f == "edema":
            a["side"] = "bilateral"
        if f == "atelectasis" and a["side"] == "bilateral":
            a["zone"] = "lower"  # bibasilar
        if f == "devices":
            a["items"] = [d for d in ("ett", "line", "leads") if rng.random() < 0.5] or ["leads"]
        attrs[f] = a
        r = rng.random()
        if f not in exclude and rng.random() < p[f]:
            # drawn; mild findings are often hedged in the report, and still drawn (faintly)
            found[f] = a
            status[f] = ("unc" if f != "devices" and r < (0.45 if a["severity"] < 0.5 else 0.06)
                         else "pos")
        elif f != "devices":
            # absent: usually said to be absent, sometimes hedged ("cannot exclude"),
            # or not mentioned
            status[f] = "unc" if r < 0.03 else "neg" if r < SAID_ABSENT[f] else None
    # cardiothoracic ratio: radiologists call cardiomegaly above ~0.5,
    # so the two groups meet at the threshold
    ctr = min(rng.normal(0.44, 0.03), 0.51)
    if "cardiomegaly" in found:
        ctr = 0.5 + 0.1 * found["cardiomegaly"]["severity"]
    if view is None:
        view = "AP" if icu or rng.random() < 0.2 else "PA"
    return dict(view=view, attrs=attrs, status=status, found=found, ctr=float(ctr),
                sex=_pick(rng, ("M", "F")), age=int(rng.integers(20, 91)))


def _sides(side):
    return ("right", "left") if side == "bilateral" else (side,)


def _patchy(x, y, rng, cx, cy, sx, sy):
    """Patchy airspace opacity: a few blobs inside a region of half-size (sx, sy), broken up by a
    random texture."""
    k = int(rng.integers(3, 7))
    patch = np.zeros_like(x)
    for dx, dy, r in zip(rng.uniform(-sx, sx, k), rng.uniform(-sy, sy, k),
                         rng.uniform(0.05, 0.1, k)):
        patch += np.exp(-((x - cx - dx) ** 2 + (y - cy - dy) ** 2) / (r * r))
    return np.clip(patch, 0, 1) * np.clip(0.55 + 0.7 * _smooth_noise(rng, x.shape, 24), 0, 1)


def render_cxr(st, rng, h, w, n_boxes=0):
    """Grayscale radiograph of a study state; returns (uint8 H x W image, pneumonia boxes
    [x, y, w, h] in pixels, {finding: its boxes [x, y, w, h] in pixels}).

    Anatomy (body habitus, heart, lungs, ribs, clavicles, spine) is randomly posed and every finding
    is drawn where it lives (effusion at the base of its side, consolidation in its zone, ...),
    faint when mild. n_boxes > 0 adds patchy pneumonia opacities in the lungs (RSNA) and returns
    their bounding boxes. Every drawn finding of a frontal film but the devices comes with the
    boxes of what was drawn for it (one per side; see _extent): MS-CXR's boxes. They are read off
    the arrays already drawn, never from the random stream, so the film is the same with or
    without them.
    """
    u, v = _grid(h, w)
    x, y, fwd = _pose(u, v, rng, rot=10, scale=(0.8, 1.08), shift=0.12)
    if st["view"] in FRONTAL:
        img, boxes, drawn = _frontal(st, x, y, rng, n_boxes)
    else:
        img, boxes, drawn = _lateral(st, x, y, rng), [], {}
    px = [_pixel_box(b, fwd, h, w) for b in boxes]
    # a box of pixel centres, grown by half a pixel to cover the pixels themselves
    found = {k: [_pixel_box(b, fwd, h, w, pad=0.5) for b in v if b] for k, v in drawn.items()}
    return _finish_xray(img, rng), px, {k: v for k, v in found.items() if v}


def _pixel_box(box, fwd, h, w, pad=0.0):
    """A body-space box (x0, y0, x1, y1) -> [x, y, w, h] in pixels, to 0.1 px: the bounding box of
    its posed corners (fwd, then the inverse of _grid), grown by `pad` pixels, clipped to the
    image."""
    x0, y0, x1, y1 = box
    s = min(h, w) / 2
    cu, cv = fwd(np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]))
    j, i = cu * s + w / 2, cv * s + h / 2
    j0, j1 = np.clip(j.min() - pad, 0, w), np.clip(j.max() + pad, 0, w)
    i0, i1 = np.clip(i.min() - pad, 0, h), np.clip(i.max() + pad, 0, h)
    return [round(float(j0), 1), round(float(i0), 1), round(float(j1 - j0), 1),
            round(float(i1 - i0), 1)]


SEEN = 0.1  # a box covers where a finding's drawing reaches a tenth of its full strength


def _extent(shape, x, y):
    """The body-space box (x0, y0, x1, y1) of the pixel centres where a finding's drawing `shape`
    (in [0, 1]) reaches SEEN; None where it reaches it nowhere on the film. A soft edge or a
    Gaussian tail has no end, so a box needs a level: a tenth is where the drawing fades into the
    film's noise and texture."""
    seen = shape >= SEEN
    if not seen.any():
        return None
    return (float(x[seen].min()), float(y[seen].min()), float(x[seen].max()),
            float(y[seen].max()))


def _lung(x, y, cx, lw, top, bot):
    """One lung field: an ellipse cut off below by the dome of its hemidiaphragm (at height bot)."""
    dome = bot - 0.12 * np.clip(1 - ((x - cx) / lw) ** 2, 0, 1)
    return (_ellipse(x, y, cx, (top + bot) / 2 + 0.06, lw, (bot - top) / 2 + 0.12, edge=0.04)
            * _step((dome - y) / 0.02))


def _frontal(st, x, y, rng, n_boxes):
    """(image, pneumonia boxes, {finding: boxes}) of a frontal film, boxes in body space."""
    f, ap = st["found"], st["view"] == "AP"
    drawn = {}  # finding -> the body-space boxes of what was drawn for it, one per side
    bw = rng.uniform(0.68, 0.92)  # body habitus: the thorax half-width
    body = np.maximum(_ellipse(x, y, 0, 0.12, bw, 1.0, edge=0.08),
                      _ellipse(x, y, 0, -0.95, 0.22, 0.3, edge=0.06))
    img = 0.05 + 0.42 * body
    # an AP film (taken front to back, often supine) magnifies the heart
    # and shows lower lung volumes
    hwid = st["ctr"] * bw * (1.1 if ap else 1.0)
    heart = _ellipse(x, y, 0.3 * hwid - 0.06, 0.18, hwid, 0.2 + 0.25 * hwid, edge=0.04)
    soft = np.maximum(heart, _ellipse(x, y, 0.02, -0.3, 0.1, 0.5, edge=0.04))  # heart + mediastinum
    if "cardiomegaly" in f:
        drawn["cardiomegaly"] = [_extent(heart, x, y)]
    lungs, geo, lifted = {}, {}, {}
    # radiological convention: the patient's right is image left
    for side, sgn in (("right", -1), ("left", 1)):
        bot = (0.36 if side == "right" else 0.42) - 0.06 * ap
        cx, lw, top = sgn * 0.43 * bw, 0.29 * bw, -0.66
        at = f.get("atelectasis")
        # volume loss lifts the hemidiaphragm
        lift = 0.1 * at["severity"] if at and at["side"] in (side, "bilateral") else 0.0
        lungs[side] = _lung(x, y, cx, lw, top, bot - lift)
        if lift:  # atelectasis drew this too: where the lung was and is no more
            lifted[side] = np.abs(lungs[side] - _lung(x, y, cx, lw, top, bot))
        geo[side] = (sgn, cx, lw, bot - lift)
    lung = np.maximum(lungs["right"], lungs["left"]) * (1 - soft)
    ptx = np.zeros_like(x)
    # the lung collapses towards the hilum, leaving dark air without markings + a pleural line
    if "pneumothorax" in f:
        a = f["pneumothorax"]
        sgn, cx, lw, _ = geo[a["side"]]
        k = 0.15 + 0.25 * a["severity"]
        r = _radius(x, y, cx - sgn * 0.3 * k * lw, -0.05 + 0.1 * k, lw * (1 - k),
                    0.64 * (1 - 0.5 * k))
        ptx = lungs[a["side"]] * _step((r - 1) * 20)
        line = np.exp(-(((r - 1) * lw * (1 - k)) / 0.012) ** 2)
        img += (0.15 * line * lungs[a["side"]] - 0.08 * ptx)
        drawn["pneumothorax"] = [_extent(np.maximum(ptx, line * lungs[a["side"]]), x, y)]
    vessels = np.clip(1 - np.abs(_smooth_noise(rng, x.shape, 18)) * 2.5, 0, 1) ** 2
    hilum = np.exp(-((np.abs(x) - 0.15) ** 2 + (y + 0.02) ** 2) / 0.2)
    # congestion: prominent vessels
    vamp = 0.05 * (1 + f["edema"]["severity"]) if "edema" in f else 0.05
    img += vamp * vessels * (0.4 + hilum) * lung * (1 - ptx) - 0.3 * lung + 0.14 * soft * body
    freq, phase = rng.uniform(4.5, 6.0), rng.uniform(0, 2 * np.pi)
    # posterior ribs slope down
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * freq * (y - 0.3 * np.abs(x)) + phase)) ** 6
    img += 0.07 * ribs * body * (np.abs(x) > 0.1) * (y < 0.45)
    # spine
    img += 0.1 * np.exp(-(x / 0.06) ** 2) * body * (0.85 + 0.15 * np.cos(2 * np.pi * 7 * y))
    for sgn in (-1, 1):
        # clavicles
        img += 0.12 * _segment(x, y, (sgn * 0.08, -0.64), (sgn * 0.78 * bw, -0.76), 0.03)
        if ap:
            # scapulae over the lungs
            img += 0.05 * _ellipse(x, y, sgn * 0.8 * bw, -0.45, 0.18, 0.3, edge=0.05)
    if "effusion" in f:
        a = f["effusion"]
        for side in _sides(a["side"]):
            sgn, cx, lw, bot = geo[side]
            # 1 at the chest wall, where the meniscus climbs
            lateral = np.clip(sgn * (x - cx) / lw, 0, 1)
            level = bot - 0.04 - 0.36 * a["severity"]
            fluid = _step((y - level + 0.18 * a["severity"] * lateral ** 2) / 0.025)
            # fluid replaces basal air
            img += (0.22 + 0.15 * a["severity"]) * fluid * lungs[side] * (1 - soft)
            drawn.setdefault("effusion", []).append(
                _extent(fluid * lungs[side] * (1 - soft), x, y))
    if "consolidation" in f:
        a = f["consolidation"]
        sgn, cx, lw, _ = geo[a["side"]]
        patch = _patchy(x, y, rng, cx + rng.uniform(-0.3, 0.3) * lw,
                        ZONE_Y[a["zone"]] + rng.uniform(-0.05, 0.05), 0.1, 0.08)
        img += (0.2 + 0.2 * a["severity"]) * patch * lungs[a["side"]] * (1 - soft)
        drawn["consolidation"] = [_extent(patch * lungs[a["side"]] * (1 - soft), x, y)]
    if "atelectasis" in f:  # a band-like opacity in the zone (plus the volume loss above)
        a = f["atelectasis"]
        for side in _sides(a["side"]):
            sgn, cx, lw, bot = geo[side]
            cy, ang = (min(ZONE_Y[a["zone"]], bot - 0.15) + rng.uniform(-0.04, 0.04),
                       rng.uniform(-0.35, 0.35))
            d = (0.5 * lw * math.cos(ang), 0.5 * lw * math.sin(ang))
            band = _segment(x, y, (cx - d[0], cy - d[1]), (cx + d[0], cy + d[1]),
                            0.03 + 0.025 * a["severity"])
            img += (0.16 + 0.16 * a["severity"]) * band * lungs[side] * (1 - soft)
            drawn.setdefault("atelectasis", []).append(
                _extent(np.maximum(band * lungs[side] * (1 - soft), lifted[side]), x, y))
    if "edema" in f:  # bilateral perihilar haze
        haze = np.exp(-((np.abs(x) - 0.18) ** 2 / 0.06 + y ** 2 / 0.12))
        img += (0.04 + 0.1 * f["edema"]["severity"]) * haze * lung
        drawn["edema"] = [_extent(haze * lungs[side] * (1 - soft), x, y)
                          for side in ("right", "left")]
    if "nodule" in f:
        a = f["nodule"]
        sgn, cx, lw, _ = geo[a["side"]]
        r = 0.045 + 0.035 * a["severity"]
        blob = _ellipse(x, y, cx + rng.uniform(-0.45, 0.45) * lw,
                        ZONE_Y[a["zone"]] + rng.uniform(-0.06, 0.06), r,
                        r * rng.uniform(0.85, 1.15), edge=0.012)
        img += (0.22 + 0.14 * a["severity"]) * blob
        drawn["nodule"] = [_extent(blob, x, y)]
    if "devices" in f:  # metal is far denser than tissue
        metal, items = np.zeros_like(x), f["devices"]["items"]
        if "ett" in items:  # endotracheal tube: two parallel walls ending above the carina
            tip, jx = rng.uniform(-0.45, -0.3), rng.uniform(-0.03, 0.03)
            for o in (-0.018, 0.018):
                metal = np.maximum(metal, _segment(x, y, (jx + o, -1.3), (jx + o, tip), 0.008))
        if "line" in items:  # central venous line from the shoulder to the superior vena cava
            sg = _pick(rng, (-1, 1))
            pts = [(sg * 0.8 * bw, -0.85), (sg * 0.25, -0.62), (0.02, rng.uniform(-0.3, -0.2))]
            for p0, p1 in zip(pts, pts[1:]):
                metal = np.maximum(metal, _segment(x, y, p0, p1, 0.012))
        if "leads" in items:  # ECG electrodes (rings) with their wires
            for lx, ly in zip(rng.uniform(-0.6, 0.6, 3), rng.uniform(-0.55, 0.35, 3)):
                ring = np.exp(-(((_radius(x, y, lx, ly, 0.035, 0.035) - 1) * 0.035) / 0.008) ** 2)
                metal = np.maximum(metal, np.maximum(
                    ring, 0.7 * _segment(x, y, (lx, ly), (lx * 1.6, -1.3), 0.006)))
        img += 0.5 * metal
    boxes = []
    # RSNA pneumonia: patchy opacity in a box
    for side in [_pick(rng, ("right", "left")) for _ in range(n_boxes)]:
        sgn, cx, lw, _ = geo[side]
        bx, by, sx, sy = (cx + rng.uniform(-0.25, 0.25) * lw, rng.uniform(-0.35, 0.1),
                          rng.uniform(0.06, 0.1), rng.uniform(0.08, 0.16))
        img += (rng.uniform(0.2, 0.35) * _patchy(x, y, rng, bx, by, sx, sy) * lungs[side]
                * (1 - soft))
        boxes.append((bx - sx - 0.08, by - sy - 0.08, bx + sx + 0.08, by + sy + 0.08))
    return img, boxes, drawn


def _lateral(st, x, y, rng):
    """Lateral view: one superimposed lung field, the heart in front (image left), the spine behind
    (image right)."""
    f = st["found"]
    body = _ellipse(x, y, 0, 0.1, 0.78, 1.0, edge=0.08)
    dome = 0.4 - 0.1 * np.clip(1 - (x / 0.6) ** 2, 0, 1)
    hw = st["ctr"] * 0.75
    heart = _ellipse(x, y, -0.38 + 0.3 * hw, 0.22, hw, 0.28, edge=0.04)
    lung = (_ellipse(x, y, 0.0, -0.08, 0.56, 0.62, edge=0.04) * _step((dome - y) / 0.02)
            * (1 - heart))
    img = 0.05 + 0.42 * body - 0.28 * lung + 0.12 * heart * body
    vertebrae = (np.abs(x - 0.62) < 0.09) * (0.55 + 0.45 * (np.cos(2 * np.pi * 7 * y) > -0.6))
    # spine, sternum
    img += 0.22 * vertebrae * body + 0.12 * _segment(x, y, (-0.7, -0.7), (-0.74, 0.2), 0.02)
    if "effusion" in f:  # fluid fills the posterior costophrenic sulcus first
        level = 0.35 - 0.35 * f["effusion"]["severity"]
        img += 0.28 * _step((y - level) / 0.03) * _step((x - 0.05) / 0.05) * lung
    if "edema" in f:
        img += ((0.06 + 0.14 * f["edema"]["severity"]) * np.exp(-(x ** 2 + (y + 0.05) ** 2) / 0.12)
                * lung)
    if "consolidation" in f:
        img += 0.3 * _patchy(x, y, rng, rng.uniform(-0.3, 0.3), ZONE_Y[f["consolidation"]["zone"]],
                             0.08, 0.07) * lung
    return img


def _finish_xray(img, rng):
    """Acquisition: uneven exposure, blur, window/gamma and noise, all drawn independently of the
    findings."""
    img = img + rng.uniform(0.0, 0.1) * _smooth_noise(rng, img.shape, 3)
    img = _blur(img, rng.uniform(0.5, 1.1))
    c, b, g = rng.uniform(0.8, 1.25), rng.uniform(-0.08, 0.08), rng.uniform(0.8, 1.25)
    img = np.clip((img - 0.35) * c + 0.35 + b, 0, 1) ** g
    return _to_uint8(img + rng.uniform(0.004, 0.045)
                     * rng.standard_normal(img.shape, dtype=np.float32))


# ------------------------------------------------------------------------------------------ reports

SEVERITY = dict(effusion=("small", "moderate", "large"),
                pneumothorax=("small", "moderate", "large"),
                cardiomegaly=("mild", "moderate", "severe"), edema=("mild", "moderate", "severe"),
                atelectasis=("minimal", "mild", "moderate"),
                consolidation=("patchy", "patchy", "dense"))
NEG_NAME = dict(effusion="pleural effusion", pneumothorax="pneumothorax",
                consolidation="focal consolidation", edema="pulmonary edema",
                atelectasis="atelectasis", nodule="suspicious pulmonary nodule",
                cardiomegaly="cardiomegaly")
INDICATIONS = ("cough", "shortness of breath", "fever", "chest pain", "hypoxia",
               "evaluation of line placement", "a fall", "weakness")
# merging mentions of one label: positive > uncertain > negative (CheXpert labeler)
RANK = {0.0: 0, -1.0: 1, 1.0: 2}


def _sev(f, a):
    return SEVERITY[f][0 if a["severity"] < 0.5 else 1 if a["severity"] < 0.8 else 2]


def _lobe(a):
    if a["zone"] == "middle":
        return "right middle lobe" if a["side"] == "right" else "lingula"
    return f"{a['side']} {a['zone']} lobe"


def _cap(text):
    return text[0].upper() + text[1:]


def _say(f, a, status, rng):
    """One sentence about finding f (attributes a), certain ('pos') or hedged ('unc'); returns
    (text, {label: value}).

    A sentence states one status only, so a labeler (or a test) can read the label back from its cue
    words.
    """
    side, pl = a["side"], a["side"] == "bilateral"
    s, sev = "s" * pl, _sev(f, a) if f in SEVERITY else ""
    if f == "effusion":
        np_ = f"{side} pleural effusion{s}"
        pos = [f"{sev} {np_}.", f"there {'are' if pl else 'is a'} {sev} {np_}.",
               f"{sev} {np_} with blunting of the costophrenic angle{s}."]
        unc = [f"possible small {np_}.",
               f"{'small' if pl else 'a small'} {np_} cannot be excluded.",
               f"blunting of the {side} costophrenic angle{s} may represent "
               f"{'small effusions' if pl else 'a small effusion'}."]
    elif f == "cardiomegaly":
        adv = dict(mild="mildly", moderate="moderately", severe="markedly")[sev]
        pos = [f"{sev} cardiomegaly.", f"the heart size is {adv} enlarged.",
               f"the cardiac silhouette is {adv} enlarged."]
        unc = ["possible mild cardiomegaly.",
               "the cardiac silhouette is borderline enlarged, cardiomegaly cannot be excluded."]
    elif f == "consolidation":
        loc = _lobe(a)
        pos = [f"{sev} consolidation in the {loc}.", f"focal consolidation is seen in the {loc}.",
               f"airspace consolidation in the {loc}."]
        unc = [f"possible consolidation in the {loc}.",
               f"opacity in the {loc} may represent consolidation.",
               f"consolidation in the {loc} cannot be excluded."]
    elif f == "atelectasis":
        where = "at both lung bases" if pl else f"in the {_lobe(a)}"
        pos = [f"{sev} atelectasis {where}.", f"linear atelectasis {where}.",
               f"volume loss {where}, consistent with atelectasis."]
        unc = [f"streaky opacity {where} may represent atelectasis.",
               f"possible atelectasis {where}."]
    elif f == "edema":
        pos = [f"{sev} pulmonary edema.", f"{sev} interstitial pulmonary edema.",
               f"pulmonary vascular congestion with {sev} interstitial edema."]
        unc = [f"possible {sev} pulmonary edema.", "perihilar haziness may represent mild edema.",
               "mild interstitial edema cannot be excluded."]
    elif f == "pneumothorax":
        pos = [f"{sev} {side} apical pneumothorax.", f"there is a {sev} {side} pneumothorax.",
               f"{sev} {side} pneumothorax with a visible pleural line."]
        unc = [f"possible tiny {side} apical pneumothorax.",
               f"a small {side} pneumothorax cannot be excluded."]
    elif f == "nodule":
        mm, loc = int(9 + 14 * a["severity"]), _lobe(a)
        pos = [f"a {mm} mm nodule in the {loc}.",
               f"{mm}-mm rounded nodule projecting over the {loc}."]
        unc = [f"possible {mm} mm nodule in the {loc}.",
               f"a nodular density in the {loc} may represent a nipple shadow or a true nodule."]
    else:  # support devices, always stated as present
        said = dict(ett=f"endotracheal tube terminates {int(rng.integers(2, 7))} cm above the "
                        "carina.",
                    line=f"{_pick(rng, ('right', 'left'))} internal jugular central venous "
                         "catheter ends in the mid SVC.",
                    leads="cardiac monitoring leads overlie the chest.")
        pos = unc = [" ".join(_cap(said[d]) for d in a["items"])]
    text = _cap(_pick(rng, pos if status == "pos" else unc))
    value = 1.0 if status == "pos" else -1.0
    effects = {LABEL_OF[f]: value}
    if "opacit" in text:  # the CheXpert labeler reads "opacity" as Lung Opacity
        effects["Lung Opacity"] = value
    return text, effects


def _negatives(fs, rng):
    """Absent findings, grouped into one to three per sentence ("No pleural effusion or
    pneumothorax.")."""
    out, fs = [], [fs[i] for i in rng.permutation(len(fs))]
    while fs:
        k = int(rng.integers(1, 4))
        grp, fs = fs[:k], fs[k:]
        if grp == ["cardiomegaly"]:
            text = _pick(rng, ("Heart size is normal.", "The cardiac silhouette is normal in size.",
                               "No cardiomegaly."))
        else:
            names = [NEG_NAME[g] for g in grp]
            lst = (" or ".join(names) if len(names) < 3
                   else ", ".join(names[:-1]) + ", or " + names[-1])
            text = _pick(rng, (f"No {lst}.", f"There is no {lst}.", f"No evidence of {lst}."))
        out.append((text, {LABEL_OF[g]: 0.0 for g in grp}))
    return out


def _fillers(st, rng):
    """Statements about normal structures that name none of the findings."""
    out, said = [], {f for f, v in st["status"].items() if v in ("pos", "unc")}
    if not said - {"cardiomegaly", "devices"} and rng.random() < 0.6:
        out.append((_pick(rng, ("The lungs are clear.", "Lungs are well expanded and clear.")), {}))
    if "cardiomegaly" not in said and rng.random() < 0.5:
            out.append(("The cardiomediastinal silhouette is normal.",
                        {"Enlarged Cardiomediastinum": 0.0}))
    if rng.random() < 0.3:
        out.append((_pick(rng, ("No acute osseous abnormality.",
                                "The hila are unremarkable.")), {}))
    if rng.random() < 0.1:
        out.append(("No displaced rib fractures are seen.", {"Fracture": 0.0}))
    return out


def write_report(st, rng, case="full", lateral=False):
    """Sections and labels of one study: (findings or None, impression or None,
    {label: 1.0 | 0.0 | -1.0}).

    case: "full"; "no_findings" (every statement goes to the impression); "no_impression";
    "short_impression" (findings + a one- or two-word impression); "short_only" (only a short
    impression). Labels come from the sentences that were written (positive > uncertain > negative
    per label, unmentioned = absent from the dict); "No Finding" is 1.0 when no other label is
    positive or uncertain.
    """
    mentions, said = [], []
    for f in CXR_FINDINGS:
        if st["status"].get(f) in ("pos", "unc"):
            said.append((f, st["status"][f]))
            mentions.append(_say(f, st["attrs"][f], st["status"][f], rng))
            if f == "consolidation" and rng.random() < 0.4:
                sure = st["status"][f] == "pos" and rng.random() < 0.5
                mentions.append((f"Findings {'are consistent with' if sure else 'may represent'} "
                                 "pneumonia.",
                                 {"Pneumonia": 1.0 if sure else -1.0}))
    body = ([mentions[i] for i in rng.permutation(len(mentions))]
            + _negatives([f for f in CXR_FINDINGS if st["status"].get(f) == "neg"], rng)
            + _fillers(st, rng))
    if rng.random() < 0.3:  # radiologists mostly lead with the positives, but not always
        body = [body[i] for i in rng.permutation(len(body))]
    if st["view"] == "AP":
        opening = _pick(rng, ("Portable AP view of the chest.",
                              "Single frontal view of the chest was obtained."))
    else:
        opening = _pick(rng, ("PA and lateral views of the chest provided." if lateral else
                              "PA view of the chest provided.",
                              "Frontal and lateral views of the chest were obtained." if lateral
                              else "Single PA view of the chest was obtained."))
    findings, impression = [(opening, {})] + body, None
    if case in ("short_impression", "short_only"):
        impression = [(_pick(rng, ("No change.", "Unchanged.", "Stable.")), {})]
    elif case == "no_findings":
        impression = body or [(_pick(rng, ("No acute cardiopulmonary process.",
                                           "Normal chest radiograph.")), {})]
    elif case != "no_impression":
        # the impression names the diseases, not the tubes
        said = [fs for fs in said if fs[0] != "devices"]
        keep = (sorted(rng.permutation(len(said))[:int(rng.integers(1, len(said) + 1))]) if said
                else [])
        impression = ([_say(said[i][0], st["attrs"][said[i][0]], said[i][1], rng) for i in keep]
                      or [(_pick(rng, ("No acute cardiopulmonary process.",
                                       "No acute intrathoracic process.",
                                       "Normal chest radiograph.",
                                       "No acute cardiopulmonary abnormality.")), {})])
    if case in ("no_findings", "short_only"):
        findings = None
    labels = {}
    for _, eff in (findings or []) + (impression or []):
        for k, v in eff.items():
            labels[k] = v if k not in labels else max(labels[k], v, key=RANK.get)
    if not any(v != 0.0 for v in labels.values()):
        labels["No Finding"] = 1.0
    join = lambda sents: " ".join(t for t, _ in sents) if sents else None  # noqa: E731
    return join(findings), join(impression), labels


def _report_text(st, findings, impression, rng, lateral):
    """A MIMIC-CXR style free-text report: optional EXAMINATION / INDICATION / COMPARISON, then the
    sections."""
    exam = ("CHEST (PORTABLE AP)" if st["view"] == "AP" else "CHEST (PA AND LAT)" if lateral
            else "CHEST (PA)")
    parts = [" " * 33 + "FINAL REPORT"]
    if rng.random() < 0.8:
        parts.append(f" EXAMINATION:  {exam}")
    if rng.random() < 0.8:
        parts.append(f" INDICATION:  ___-year-old {'man' if st['sex'] == 'M' else 'woman'} with "
                     f"{_pick(rng, INDICATIONS)}.")
    if rng.random() < 0.6:
        parts.append(f" COMPARISON:  {_pick(rng, ('___', 'None.', 'Chest radiograph from ___.'))}")
    for name, text in (("FINDINGS", findings), ("IMPRESSION", impression)):
        if text is None:
            continue
        # the text starts after a blank line or on the header line, as in the release
        if rng.random() < 0.6:
            parts.append(f" {name}:\n \n"
                         + textwrap.fill(text, 78, initial_indent=" ", subsequent_indent=" "))
        else:
            parts.append(textwrap.fill(f"{name}:  {text}", 78, initial_indent=" ",
                                       subsequent_indent=" "))
    return "\n \n".join(parts) + "\n"


# ------------------------------------------------------------------------------------- figure world

BG, FAT, SOFT, PAR, FLUID, AIR, BONE = range(7)  # tissue classes of the anatomy tables
# organ -> {geometry: [(class, cx, cy, rx, ry, angle in degrees, role)]}, painted in order;
# role "host" = where a lesion may sit, "bone" = where a fracture may run. x grows to the patient's
# left (radiological convention).
ANATOMY = {
    "head": {
        "axial": [(FAT, 0, 0, .8, .92, 0, ""), (BONE, 0, 0, .75, .87, 0, "bone"),
                  (PAR, 0, 0, .68, .8, 0, "host"),
                  (FLUID, -.1, -.05, .05, .22, 12, ""), (FLUID, .1, -.05, .05, .22, -12, "")],
        "coronal": [(FAT, 0, -.05, .78, .85, 0, ""), (BONE, 0, -.05, .73, .8, 0, "bone"),
                    (PAR, 0, -.1, .66, .66, 0, "host"), (SOFT, 0, .55, .14, .35, 0, ""),
                    (FLUID, -.12, -.1, .06, .16, 20, ""), (FLUID, .12, -.1, .06, .16, -20, "")]},
    "chest": {
        "axial": [(FAT, 0, 0, .92, .66, 0, ""), (BONE, 0, 0, .86, .6, 0, "bone"),
                  (SOFT, 0, 0, .82, .56, 0, ""),
                  (AIR, -.4, 0, .32, .44, 0, "host"), (AIR, .4, 0, .32, .44, 0, "host"),
                  (SOFT, .1, -.12, .24, .22, 0, ""), (BONE, 0, .45, .09, .09, 0, "bone"),
                  (FLUID, -.05, .22, .06, .06, 0, "")],
        "coronal": [(FAT, 0, .05, .86, .92, 0, ""), (SOFT, 0, .05, .82, .88, 0, ""),
                    (AIR, -.4, -.1, .3, .62, 0, "host"), (AIR, .4, -.1, .3, .62, 0, "host"),
                    (SOFT, .1, .3, .26, .24, 0, ""), (BONE, 0, 0, .06, .95, 0, "bone"),
                    (BONE, -.45, -.75, .3, .035, 8, "bone"),
                    (BONE, .45, -.75, .3, .035, -8, "bone")]},
    "abdomen": {
        "axial": [(FAT, 0, 0, .9, .68, 0, ""), (SOFT, 0, 0, .84, .62, 0, ""),
                  (PAR, -.38, -.12, .36, .34, 0, ""),
                  (PAR, .45, -.05, .16, .22, 0, ""), (PAR, -.32, .28, .12, .17, 20, "host"),
                  (PAR, .32, .28, .12, .17, -20, "host"), (BONE, 0, .42, .11, .1, 0, "bone"),
                  (FLUID, .05, .22, .05, .05, 0, ""), (AIR, .1, -.32, .1, .07, 0, ""),
                  (AIR, -.05, -.4, .07, .05, 0, "")],
        "coronal": [(FAT, 0, 0, .88, .92, 0, ""), (SOFT, 0, 0, .82, .86, 0, ""),
                    (PAR, -.4, -.4, .38, .3, 0, ""),
                    (PAR, .45, -.4, .18, .25, 0, ""), (PAR, -.35, .1, .13, .25, 0, "host"),
                    (PAR, .35, .1, .13, .25, 0, "host"), (BONE, 0, .2, .08, .75, 0, "bone"),
                    (AIR, .1, .5, .12, .08, 0, "")]},
    "pelvis": {
        "axial": [(FAT, 0, 0, .92, .62, 0, ""), (SOFT, 0, 0, .86, .56, 0, "host"),
                  (BONE, -.55, .05, .15, .3, 20, "bone"), (BONE, .55, .05, .15, .3, -20, "bone"),
                  (FLUID, 0, -.15, .2, .16, 0, ""), (BONE, 0, .42, .1, .06, 0, "bone")],
        "coronal": [(FAT, 0, 0, .92, .85, 0, ""), (SOFT, 0, 0, .86, .8, 0, "host"),
                    (BONE, -.45, -.3, .3, .2, 25, "bone"), (BONE, .45, -.3, .3, .2, -25, "bone"),
                    (BONE, -.45, .35, .1, .1, 0, "bone"), (BONE, .45, .35, .1, .1, 0, "bone"),
                    (FLUID, 0, .15, .17, .14, 0, ""), (BONE, 0, -.45, .12, .2, 0, "bone")]},
    "spine": {
        "axial": [(FAT, 0, 0, .9, .65, 0, ""), (SOFT, 0, 0, .84, .6, 0, ""),
                  (SOFT, -.4, .2, .2, .25, 0, ""), (SOFT, .4, .2, .2, .25, 0, ""),
                  (BONE, 0, -.1, .22, .2, 0, "host bone"),
                  (FLUID, 0, .22, .09, .08, 0, ""), (BONE, 0, .42, .05, .12, 0, "bone")],
        "coronal": [(FAT, 0, 0, .62, .98, 0, ""), (SOFT, 0, 0, .56, .98, 0, "")]
        + [(BONE, 0, yy, .25, .1, 0, "host bone") for yy in (-.7, -.42, -.14, .14, .42, .7)]},
    "knee": {
        "axial": [(FAT, 0, 0, .6, .55, 0, ""), (SOFT, 0, 0, .55, .5, 0, ""),
                  (BONE, 0, 0, .35, .28, 0, "host bone"), (BONE, 0, -.42, .12, .06, 0, "bone")],
        "coronal": [(FAT, 0, 0, .55, .98, 0, ""), (SOFT, 0, 0, .5, .98, 0, ""),
                    (BONE, 0, -.52, .28, .5, 0, "host bone"),
                    (BONE, 0, .52, .26, .46, 0, "host bone"),
                    (BONE, .33, .5, .07, .35, 0, "bone")]},
}
# tissue class -> brightness per modality (and sequence / contrast phase);
# the modality's look comes from here
LUT = {"CT": (0.0, 0.22, 0.48, 0.56, 0.38, 0.03, 0.97),
       "CT+c": (0.0, 0.22, 0.48, 0.7, 0.4, 0.03, 0.97),
       "MRI-t1": (0.0, 0.85, 0.4, 0.52, 0.12, 0.02, 0.15),
       "MRI-t2": (0.0, 0.6, 0.3, 0.42, 0.95, 0.02, 0.12),
       "X-ray": (0.03, 0.25, 0.36, 0.4, 0.4, 0.1, 0.92),
       "US": (0.0, 0.5, 0.36, 0.48, 0.03, 0.9, 0.95)}
LESION_VALUE = {"mass": dict(CT=0.34, MRI_t1=0.32, MRI_t2=0.78, X=0.62, US=0.18),
                "cyst": dict(CT=0.28, MRI_t1=0.1, MRI_t2=0.98, X=0.5, US=0.0),
                "calcification": dict(CT=1.0, MRI_t1=0.0, MRI_t2=0.0, X=1.0, US=1.0)}
MODALITY_ORGANS = {"CT": ("head", "chest", "abdomen", "pelvis", "spine", "knee"),
                   "MRI": ("head", "abdomen", "pelvis", "spine", "knee"),
                   "X-ray": ("head", "chest", "abdomen", "pelvis", "spine", "knee"),
                   "US": ("abdomen", "pelvis")}
PLANES = {"CT": ("axial", "coronal", "sagittal"), "MRI": ("axial", "coronal", "sagittal"),
          "X-ray": ("frontal", "lateral"), "US": ("transverse", "longitudinal")}
GEOMETRY = dict(axial="axial", coronal="coronal", sagittal="sagittal", frontal="coronal",
                lateral="sagittal", transverse="axial", longitudinal="sagittal")
FIG_FINDINGS = ("mass", "cyst", "fracture", "calcification", "normal")
# organs whose left and right can be told apart in the image
BILATERAL = ("head", "chest", "abdomen", "pelvis")


def sample_figure(rng, modalities=tuple(MODALITY_ORGANS), organs=None):
    """Latent state of one figure: modality (+ contrast / sequence), organ, plane, finding, side,
    count and size."""
    while True:
        mod = _pick(rng, modalities)
        allowed = [o for o in MODALITY_ORGANS[mod] if organs is None or o in organs]
        if allowed:
            break
    organ, plane = _pick(rng, allowed), _pick(rng, PLANES[mod])
    finding = "normal" if rng.random() < 0.2 else _pick(rng, [
        f for f in FIG_FINDINGS[:4]
        # a fracture needs bone and a bone view
        if not (f == "fracture" and (mod == "US" or organ == "abdomen"))
        and not (f == "cyst" and mod == "X-ray") and not (f == "calcification" and mod == "MRI")])
    side = None
    if finding != "normal" and organ in BILATERAL and GEOMETRY[plane] != "sagittal":
        side = _pick(rng, ("right", "left"))
    count = (_choose(rng, (1, 2, 3), (0.6, 0.25, 0.15))
             if finding in ("mass", "cyst", "calcification") else int(finding == "fracture"))
    return dict(modality=mod, organ=organ, plane=plane, finding=finding, side=side, count=count,
                size=_pick(rng, ("small", "large")),
                contrast=bool(rng.random() < 0.5) if mod == "CT" else False,
                sequence=_pick(rng, ("t1", "t2")) if mod == "MRI" else None)


def _anatomy(organ, geometry):
    """Structures of an organ in a geometry; a sagittal cut keeps one side of the coronal table,
    narrowed."""
    if geometry != "sagittal":
        return ANATOMY[organ][geometry]
    return [(c, 0.5 * cx, cy, 0.75 * rx, ry, ang, role)
            for c, cx, cy, rx, ry, ang, role in ANATOMY[organ]["coronal"] if cx > -0.02]


def render_figure(fig, rng, scale=1):
    """Grayscale figure of a figure state: anatomy painted from the tables, lesions placed inside
    their host tissue on the stated side, then the modality's acquisition look (CT table and round
    field of view, MRI bias field and Rician noise, radiograph blur, ultrasound fan and speckle).
    Size is drawn independently of the content, and multiplied by `scale` (see REAL_SIZE)."""
    h, w = _size(rng, (112, 128, 144), (112, 128, 144))
    u, v = _grid(h * scale, w * scale)
    x, y, _ = _pose(u, v, rng, rot=10, scale=(0.8, 1.02), shift=0.08)
    geometry, mod = GEOMETRY[fig["plane"]], fig["modality"]
    if geometry == "sagittal":
        # sagittal profiles curve (lordosis, the face, the abdominal wall)
        x = x + 0.18 * y * y - 0.08
    key = {"CT": "CT+c" if fig["contrast"] else "CT", "MRI": f"MRI-{fig['sequence']}"}.get(mod, mod)
    lut = LUT[key]
    img = np.full(x.shape, lut[BG], np.float32)
    host, bone = np.zeros(x.shape, bool), np.zeros(x.shape, bool)
    for cls, cx, cy, rx, ry, ang, role in _anatomy(fig["organ"], geometry):
        m = _ellipse(x, y, cx, cy, rx, ry, math.radians(ang), edge=0.02)
        img += (lut[cls] - img) * m
        inside = m > 0.5
        host = host & ~inside | (inside if "host" in role else False)
        bone = bone & ~inside | (inside if "bone" in role else False)
    if fig["side"] is not None:  # the patient's right is on the image's left
        half = (x < -0.04) if fig["side"] == "right" else (x > 0.04)
        host, bone = host & half, bone & half
    f = fig["finding"]
    where = np.flatnonzero(bone if f == "fracture" else host)
    if f != "normal" and len(where):
        lkey = {"CT": "CT", "MRI": f"MRI_{fig['sequence']}", "X-ray": "X", "US": "US"}[mod]
        for k in where[rng.integers(len(where), size=fig["count"])]:
            px, py = float(x.flat[k]), float(y.flat[k])
            big = fig["size"] == "large"
            if f == "fracture":  # a lucent gap across the bone, wide enough to survive 64x64 inputs
                ang, half_len = rng.uniform(0, np.pi), 0.16 if big else 0.1
                d = (half_len * math.cos(ang), half_len * math.sin(ang))
                gap = _segment(x, y, (px - d[0], py - d[1]), (px + d[0], py + d[1]),
                               0.035 if big else 0.028)
                img += (lut[SOFT] - img) * gap * bone
            else:
                r = ((0.06 if f == "calcification" else 0.12 if big else 0.075)
                     * rng.uniform(0.85, 1.15))
                rr = _radius(x, y, px, py, r, r * rng.uniform(0.75, 1.0), rng.uniform(0, np.pi))
                # solid tumours are lobulated and heterogeneous; cysts are round, smooth and uniform
                if f == "mass":
                    rr = rr + 0.3 * _smooth_noise(rng, x.shape, 12)
                m = np.clip((1 - rr) * (r / 0.01) + 0.5, 0, 1)
                if f == "mass":
                    m = m * (0.75 + 0.25 * np.clip(_smooth_noise(rng, x.shape, 20), -1, 1))
                img += (LESION_VALUE[f][lkey] - img) * m
    return _finish_figure(img, mod, u, v, rng)


def _finish_figure(img, mod, u, v, rng):
    """The acquisition look of each modality, then a random window (contrast / brightness)."""
    if mod == "CT":
        # the scanner table
        img = img + 0.35 * np.exp(-((v - 0.93) / 0.025) ** 2) * (np.abs(u) < 0.8)
        img = _blur(img, 0.5) * (u * u + v * v < 1.1)  # reconstruction field of view
        img = img + rng.uniform(0.01, 0.035) * rng.standard_normal(img.shape, dtype=np.float32)
    elif mod == "MRI":
        # coil sensitivity bias field
        img = _blur(img, 0.8) * (1 + 0.25 * _smooth_noise(rng, img.shape, 2))
        s = rng.uniform(0.015, 0.04)
        n1, n2 = s * rng.standard_normal((2,) + img.shape, dtype=np.float32)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # magnitude images have Rician noise
    elif mod == "X-ray":
        # a projection: every structure is seen through the others
        img = _blur(img, rng.uniform(1.0, 1.6))
        img = img + rng.uniform(0.005, 0.03) * rng.standard_normal(img.shape, dtype=np.float32)
        img[:6, -6:] = 0.95  # the side marker in the corner
    else:  # ultrasound: a fan from a probe at the top, speckle, and gain falling with depth
        r, theta = np.sqrt(u * u + (v + 1.3) ** 2), np.arctan2(u, v + 1.3)
        fan = (_step((0.55 - np.abs(theta)) / 0.02) * _step((r - 0.45) / 0.02)
               * _step((2.45 - r) / 0.02))
        speckle = _blur(rng.gamma(2.0, 0.5, img.shape).astype(np.float32), 0.7)
        img = _blur(img, 0.7) * speckle * (1.2 - 0.25 * r) * fan
    c, b = rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05)
    return _to_uint8((img - 0.5) * c + 0.5 + b)


def render_nonradiology(rng, scale=1):
    """A figure that is not a radiograph (a bar chart or a stained micrograph): what the radiology
    filters drop."""
    h, w = _size(rng, (112, 128, 144), (112, 128, 144))
    u, v = _grid(h * scale, w * scale)
    if rng.random() < 0.5:
        img = np.full(u.shape, 0.97, np.float32)
        edges = np.linspace(-0.8, 0.8, int(rng.integers(3, 8)) + 1)
        for x0, x1, top in zip(edges[:-1], edges[1:], rng.uniform(-0.7, 0.6, len(edges) - 1)):
            img[(u > x0 + 0.03) & (u < x1 - 0.03) & (v > top) & (v < 0.8)] = rng.uniform(0.1, 0.6)
        img[(np.abs(v - 0.8) < 0.015) | (np.abs(u + 0.85) < 0.015) & (v < 0.8)] = 0.0  # axes
    else:
        img = 0.75 + 0.2 * _smooth_noise(rng, u.shape, 6)
        for cx, cy in rng.uniform(-1, 1, (int(rng.integers(15, 40)), 2)):
            # nuclei
            img -= 0.4 * _ellipse(u, v, cx, cy, 0.06, 0.045, rng.uniform(0, np.pi), edge=0.01)
    return _to_uint8(img + 0.02 * rng.standard_normal(img.shape, dtype=np.float32))


# --------------------------------------------------------------------------- captions and questions

MOD_WORDS = {"CT": ("CT", "computed tomography", "CT scan"),
             "MRI": ("MRI", "MR image", "magnetic resonance imaging"),
             "X-ray": ("radiograph", "X-ray", "plain film"),
             "US": ("ultrasound", "sonography", "ultrasound image")}
ORGAN_WORDS = dict(head=("head", "brain"), chest=("chest", "thorax"), abdomen=("abdomen",),
                   pelvis=("pelvis",), spine=("lumbar spine", "spine"), knee=("knee",))
HOST_WORDS = dict(head="cerebral hemisphere", chest="lung", abdomen="kidney", pelvis="hemipelvis",
                  spine="vertebral body", knee="knee")
BONE_WORDS = dict(head="calvarium", chest="rib", pelvis="iliac bone", spine="vertebral body",
                  knee="knee")
FINDING_WORDS = dict(mass=(("mass", "masses"), ("tumor", "tumors"), ("lesion", "lesions")),
                     cyst=(("cyst", "cysts"), ("cystic lesion", "cystic lesions")),
                     calcification=(("calcification", "calcifications"),
                                    ("calcified focus", "calcified foci")),
                     fracture=(("fracture", "fractures"),))
SIZE_WORDS = dict(small=("small", "tiny"), large=("large", "big"))
NUMBER = {2: ("two",), 3: ("three", "multiple")}


def _an(word):
    return "an" if word[0] in "aeiou" else "a"


def caption(fig, rng, noise=True):
    """A ROCO / MedICaT style caption naming modality, plane, organ, finding, size, count and side,
    in paraphrase.

    With noise, some attributes are left out and some figure numbers / demographics are added, as in
    real captions.
    """
    drop = lambda p: noise and rng.random() < p  # noqa: E731
    mod = _pick(rng, MOD_WORDS[fig["modality"]])
    if fig["contrast"] and not drop(0.3):
        mod = "contrast-enhanced " + mod
    if fig["sequence"] and not drop(0.3):
        mod = f"{fig['sequence'].upper()}-weighted {mod}"
    plane = "" if drop(0.15) else fig["plane"]
    organ, f = _pick(rng, ORGAN_WORDS[fig["organ"]]), fig["finding"]
    if f == "normal":
        text = _pick(rng, (f"{plane} {mod} of the {organ} showing no abnormality.",
                           f"normal {plane} {mod} of the {organ}.",
                           f"{plane} {mod} of the {organ} with unremarkable findings."))
    else:
        side = "" if fig["side"] is None or drop(0.1) else fig["side"]
        loc = f"{side} {(BONE_WORDS if f == 'fracture' else HOST_WORDS)[fig['organ']]}"
        one, many = _pick(rng, FINDING_WORDS[f])
        size = "" if drop(0.1) else _pick(rng, SIZE_WORDS[fig["size"]])
        thing = f"{_an(size or one)} {size} {one}" if fig["count"] == 1 else \
            f"{_pick(rng, NUMBER[fig['count']])} {size} {many}"
        paren = f" ({plane} view)" if plane else ""
        text = _pick(rng, (f"{plane} {mod} of the {organ} showing {thing} in the {loc}.",
                           f"{mod} of the {organ}{paren} demonstrates {thing} in the {loc} "
                           "(arrow).",
                           f"{thing} in the {loc} on {plane} {mod}.",
                           f"{plane} {mod}: {thing} of the {loc}."))
    text = _cap(" ".join(text.split()))  # dropped words leave double spaces
    if drop(0.1):
        text = f"Figure {int(rng.integers(1, 7))}: {text}"
    if drop(0.05):
        text = (f"{text[:-1]} in a {int(rng.integers(18, 90))}-year-old "
                f"{_pick(rng, ('man', 'woman'))}.")
    return text


SHORT_CAPTIONS = ("CT scan.", "Axial MRI.", "Figure 3", "Radiograph.", "(a)", "Ultrasound image.",
                  "Follow-up CT.")
NONRAD_CAPTIONS = ("Photograph of the resected specimen showing a well-circumscribed tumor.",
                   "Histopathology of the lesion (hematoxylin and eosin stain, x200).",
                   "Bar chart of the response rates in the two treatment groups.",
                   "Intraoperative photograph showing the exposed lesion.",
                   "Kaplan-Meier survival curves of the study cohort.")
MOD_ANSWER = {"CT": "CT", "MRI": "MRI", "X-ray": "X-ray", "US": "Ultrasound"}
ORGAN_ANSWER = dict(head="Brain", chest="Chest", abdomen="Abdomen", pelvis="Pelvis", spine="Spine",
                    knee="Knee")


def questions(fig, rng):
    """Candidate VQA pairs about a figure, answers read off the latent state (so they agree with the
    pixels).

    Each is (question, answer, closed, VQA-RAD question_type, SLAKE content_type).
    """
    f, mod = fig["finding"], fig["modality"]
    other = _pick(rng, [m for m in MOD_ANSWER if m != mod]) if rng.random() < 0.5 else mod
    probe = _pick(rng, FIG_FINDINGS[:4]) if rng.random() < 0.5 or f == "normal" else f
    yn = lambda b: "Yes" if b else "No"  # noqa: E731
    ask_normal = rng.random() < 0.5
    qa = [(_pick(rng, ("What imaging modality was used?", "What modality is shown?",
                       "How was this image taken?")),
           MOD_ANSWER[mod], False, "MODALITY", "Modality"),
          (f"Is this {'an' if other in ('MRI', 'X-ray') else 'a'} {MOD_ANSWER[other]} image?"
           if other != "US" else "Is this an ultrasound image?",
           yn(other == mod), True, "MODALITY", "Modality"),
          (_pick(rng, ("Which organ is shown in this image?", "What part of the body is imaged?")),
           ORGAN_ANSWER[fig["organ"]], False, "ORGAN", "Organ"),
          (_pick(rng, ("In which plane was this image taken?", "What is the imaging plane?")),
           _cap(fig["plane"]), False, "PLANE", "Plane"),
          ("Is this image normal?" if ask_normal else "Is there an abnormality in this image?",
           yn((f == "normal") == ask_normal), True, "ABN", "Abnormality"),
          (f"Is there {_an(probe)} {probe} in this image?", yn(probe == f), True, "PRES",
           "Abnormality")]
    if f != "normal":
        qa.append((_pick(rng, ("What is the abnormality?", "What abnormality is seen?")), _cap(f),
                   False, "ABN", "Abnormality"))
        if fig["side"]:
            probe_side = _pick(rng, ("left", "right"))
            qa += [(_pick(rng, (f"Which side is the {f} on?", "On which side is the lesion?")),
                    _cap(fig["side"]), False, "POS", "Position"),
                   (f"Is the {f} on the {probe_side} side?", yn(probe_side == fig["side"]), True,
                    "POS", "Position")]
        if f != "fracture":
            qa += [(f"How many {FINDING_WORDS[f][0][1]} are there?", str(fig["count"]), False,
                    "COUNT", "Quantity"),
                   (f"Is the {f} large?", yn(fig["size"] == "large"), True, "SIZE", "Size")]
    return qa


# ---------------------------------------------------------------------------------- image rendering

# real_size=True multiplies every drawn image size by these: chest films of 2,352-3,024 px a side
# (MIMIC-CXR's JPEGs are about 2,500 x 3,000), figures of 896-1,152 px (ROCO's and MedICaT's are
# about 500-1,500). Everything is drawn in body coordinates, so the same world is rendered at more
# pixels: labels, texts and ids stay; pixel sizes (MIMIC-CXR's Rows / Columns, RSNA's boxes) scale
# with the images.
REAL_SIZE = dict(cxr=21, figure=8)


def _render_job(job, real_size=False):
    """Render and save one image; job = (kind, latent state, rng keys, path).
    Returns ((H, W), pneumonia boxes). Kind "cxr_findings" renders a chest film that another job
    saves (the same keys draw the same film) and returns ((H, W), its findings' boxes)."""
    kind, state, keys, path = job
    rng = np.random.default_rng(keys)
    boxes = None
    if kind in ("cxr", "cxr_findings"):
        h, w = state.get("size") or _size(rng)
        k = REAL_SIZE["cxr"] if real_size else 1
        img, boxes, found = render_cxr(state, rng, h * k, w * k, state.get("n_boxes", 0))
        if kind == "cxr_findings":
            return img.shape, found
    elif kind == "figure":
        img = render_figure(state, rng, REAL_SIZE["figure"] if real_size else 1)
    else:
        img = render_nonradiology(rng, REAL_SIZE["figure"] if real_size else 1)
    _save(img, path, rng)
    return img.shape, boxes


def real_size_films(folder, n, seed=0):
    """n chest films at real size (REAL_SIZE), written as JPEGs into folder; returns their paths
    (bench_loader's)."""
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"film{i}.jpg")
        _render_job(("cxr", sample_study(_rng(seed, 99, i)), (seed, 99, i), path), real_size=True)
        paths.append(path)
    return paths


POOL_MIN_JOBS = 200  # below this, starting worker processes costs more than it saves


def _renderer(workers, progress, real_size=False):
    """render(jobs, desc): _render_job over jobs, in order, on worker processes when there are many
    (workers.ordered_map). Every job carries its own seed, so the files do not depend on the number
    of workers."""
    def render(jobs, desc):
        return ordered_map(partial(_render_job, real_size=real_size), jobs, workers, chunksize=16,
                           min_jobs=POOL_MIN_JOBS,
                           bar=dict(desc=f"synth {desc}", disable=not progress, unit="img"))
    return render


# ---------------------------------------------------------------------------------- dataset writers

SPLIT = dict(train="train", validation="val", validate="val", valid="val", val="val", test="test")
ROCO_CUI = {"CT": ("C0040405", "X-Ray Computed Tomography"),
            "MRI": ("C0024485", "Magnetic Resonance Imaging"),
            "X-ray": ("C1306645", "Plain x-ray"), "US": ("C0041618", "Ultrasonography")}


def _words(text):
    return len(text.split())


def _roco(out, seed, sc, render):
    """ROCO text release + the usual image re-pack; non-radiology entries and too-short captions are
    mixed in."""
    rng, root = _rng(seed, 0), out / "roco" / "data"
    plan = {}
    for split, n in zip(("train", "validation", "test"), sc["roco"]):
        kinds = (["keep"] * n + ["short"] * max(1, round(0.02 * n))
                 + ["nonrad"] * max(1, round(0.1 * n)))
        plan[split] = [kinds[i] for i in rng.permutation(len(kinds))]
    ids = iter(_ids(rng, sum(map(len, plan.values())), 0, 100_000))
    jobs, files = [], {}
    for split, kinds in plan.items():
        for kind in kinds:
            rid, sub = f"ROCO_{next(ids):05d}", "non-radiology" if kind == "nonrad" else "radiology"
            if kind == "nonrad":
                fig, cap, kw = None, _pick(rng, NONRAD_CAPTIONS), ["photograph"]
                cui, cname = "C0031256", "Photography"
            else:
                fig = sample_figure(rng)
                cap = caption(fig, rng) if kind == "keep" else _pick(rng, SHORT_CAPTIONS)
                kw, (cui, cname) = ([fig["modality"].lower(), fig["organ"], fig["finding"]],
                                    ROCO_CUI[fig["modality"]])
            jobs.append(("figure" if fig else "nonrad", fig, (seed, 0, len(jobs)),
                         root / split / sub / "images" / f"{rid}.jpg"))
            pmc = int(rng.integers(1_000_000, 9_000_000))
            rows = files.setdefault((split, sub), {k: [] for k in ("captions", "dlinks", "keywords",
                                                                   "semtypes", "cuis", "licences")})
            rows["captions"].append(f"{rid}\t{cap}")
            rows["dlinks"].append(f"{rid}\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/"
                                  f"{pmc % 97:02x}/{pmc % 89:02x}/PMC{pmc}.tar.gz\t"
                                  f"{_hex(rng, (12,), '')}.jpg")
            rows["keywords"].append(f"{rid}\t" + "\t".join(kw))
            rows["semtypes"].append(f"{rid}\t" + ("T060\tDiagnostic Procedure" if fig
                                                  else "T169\tFunctional Concept"))
            rows["cuis"].append(f"{rid}\t{cui}\t{cname}")
            rows["licences"].append(f"{rid}\t{_pick(rng, ('CC BY', 'CC BY-NC', 'CC0'))}")
    for (split, sub), rows in files.items():
        for name, lines in rows.items():
            _write(root / split / sub / f"{name}.txt", "\n".join(lines) + "\n")
    render(jobs, "roco")
    kept = {SPLIT[s]: k.count("keep") for s, k in plan.items()}
    dropped = dict(non_radiology=sum(k.count("nonrad") for k in plan.values()),
                   short_caption=sum(k.count("short") for k in plan.values()))
    return {"roco": dict(kept=kept, dropped=dropped),
            "roco_retrieval": dict(kept=dict(train=kept["train"], val=min(2000, kept["val"]),
                                             test=min(2000, kept["test"])), dropped=dict(dropped))}


def _medicat(out, seed, sc, render):
    """MedICaT figures of open-access papers; non-radiology figures, short captions and short / null
    inline references are mixed in (the first radiology figures force every text rule to occur)."""
    rng, root = _rng(seed, 1), out / "medicat"
    n_rad = sc["medicat"]
    specs = [dict(rad=True, short_cap=rng.random() < 0.02, refs=None if rng.random() < 0.3 else
                  ["short" if rng.random() < 0.12 else "long"
                   for _ in range(int(rng.integers(1, 4)))])
             for _ in range(n_rad)]
    specs = _force(specs, [dict(rad=True, short_cap=True, refs=None),
                           dict(rad=True, short_cap=True, refs=["long"]),
                           dict(rad=True, short_cap=False, refs=["short", "long"])])
    specs += [dict(rad=False, short_cap=False, refs=None)
              for _ in range(max(1, round(0.12 * n_rad)))]
    specs = [specs[i] for i in rng.permutation(len(specs))]
    lines, jobs, kept, dropped = [], [], 0, dict(non_radiology=0, short_text=0, no_text=0)
    paper, k = None, 0
    for spec in specs:
        if paper is None or rng.random() < 0.4:  # papers hold one to a few figures
            paper, k = _hex(rng, (40,), ""), 0
        k += 1
        fig = sample_figure(rng) if spec["rad"] else None
        if spec["short_cap"]:
            cap = _pick(rng, SHORT_CAPTIONS)
        else:
            cap = caption(fig, rng) if fig else _pick(rng, NONRAD_CAPTIONS)
            cap = cap if cap.startswith("Figure") else f"Figure {k}. {cap}"
        refs = None if spec["refs"] is None else [
            _pick(rng, (f"Figure {k}", f"(Fig. {k})")) if r == "short" else
            f"{caption(fig, rng)[:-1]} (Figure {k})." if fig and rng.random() < 0.7 else
            _pick(rng, (f"The patient underwent surgical resection (Figure {k}).",
                        f"Follow-up imaging was recommended, as shown in Figure {k}."))
            for r in spec["refs"]]
        uri = f"{int(rng.integers(1, 12))}-Figure{k}-1.png"
        jobs.append(("figure" if fig else "nonrad", fig, (seed, 1, len(jobs)),
                     root / "figures" / f"{paper}_{uri}"))
        pmc = int(rng.integers(1_000_000, 9_000_000))
        lines.append(json.dumps(dict(
            pdf_hash=paper, fig_key=f"Figure{k}", fig_uri=uri, s2_caption=cap,
            s2orc_caption=cap if rng.random() < 0.7 else None, s2orc_references=refs,
            radiology=spec["rad"], scope="single-panel",
            predicted_type="Medical images" if fig else "Graphs or photographs",
            oa_info=dict(license="CC BY", pmcid=f"PMC{pmc}",
                         doi=f"10.{int(rng.integers(1000, 9999))}/{pmc}"))))
        if not spec["rad"]:
            dropped["non_radiology"] += 1
            continue
        texts = [cap] + (refs or [])
        good = [t for t in texts if _words(t) >= 3]
        dropped["short_text"] += len(texts) - len(good)
        dropped["no_text"] += not good
        kept += bool(good)
    _write(root / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl",
           "\n".join(lines) + "\n")
    render(jobs, "medicat")
    return {"medicat": dict(kept=dict(total=kept), dropped=dropped)}


MIMIC_CASES = ("full", "no_findings", "no_impression", "short_impression", "short_only")
VIEW_META = dict(PA=("CHEST (PA AND LAT)", "postero-anterior", "Erect"),
                 AP=("CHEST (PORTABLE AP)", "antero-posterior", "Recumbent"),
                 LATERAL=("CHEST (PA AND LAT)", "lateral", "Erect"),
                 LL=("CHEST (PA AND LAT)", "left lateral", "Erect"))


def _fmt(value):
    return "" if value is None else f"{value:.1f}"


def _mimic_studies(root, seed, sc):
    """The MIMIC-CXR world without its pixels: (reports [(path, text)], render jobs, images
    [(dicom, subject, study, split, view, date, clock)] one per job, label rows, counts). A pure
    function of the seed: _ms_cxr reads the same films."""
    rng = _rng(seed, 2)
    n_by = dict(zip(("train", "validate", "test"), sc["mimic"]))
    subjects = iter(_ids(rng, sum(n_by.values()), 10_000_000, 20_000_000))
    studies = iter(_ids(rng, sum(n_by.values()), 50_000_000, 60_000_000))
    reports, jobs, images, label_rows = [], [], [], []
    zero = lambda: dict(train=0, val=0, test=0)  # noqa: E731
    cxr = dict(kept=zero(), dropped=dict(lateral=0, short_text=0, no_text=0))
    gen = dict(kept=zero(), dropped=dict(lateral=0, no_findings=0))
    summ = dict(kept=zero(), dropped=dict(no_findings=0, no_impression=0))
    for split, n in n_by.items():
        cases = rng.choice(len(MIMIC_CASES), n, p=(0.8, 0.1, 0.05, 0.03, 0.02))
        if split == "train":
            cases = _force(cases, [1, 2, 3, 4])
        i, sp = 0, SPLIT[split]
        while i < n:
            subject = next(subjects)
            # one to three studies per patient, one split each
            for _ in range(min(n - i, int(rng.integers(1, 4)))):
                st, case, study = sample_study(rng), MIMIC_CASES[cases[i]], next(studies)
                i += 1
                views = [st["view"]] * (2 if rng.random() < 0.05 else 1)
                if rng.random() < 0.35:
                    views.append("LL" if rng.random() < 0.15 else "LATERAL")
                findings, impression, labels = write_report(st, rng, case, lateral=len(views) > 1)
                folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
                reports.append((folder / f"s{study}.txt",
                                _report_text(st, findings, impression, rng, len(views) > 1)))
                label_rows.append([subject, study] + [_fmt(labels.get(k)) for k in MIMIC_LABELS])
                date = (f"{int(rng.integers(2110, 2200))}{int(rng.integers(1, 13)):02d}"
                        f"{int(rng.integers(1, 29)):02d}")
                clock = (f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}"
                         f"{rng.uniform(0, 60):06.3f}")
                for j in rng.permutation(len(views)):
                    dicom = _hex(rng, (8, 8, 8, 8, 8))
                    jobs.append(("cxr", dict(st, view=views[j]), (seed, 2, len(jobs)),
                                 folder / f"s{study}" / f"{dicom}.jpg"))
                    images.append((dicom, subject, study, split, views[j], date, clock))
                # what prepare must keep and drop (rules in the contract's order, per record)
                nf = sum(v in FRONTAL for v in views)
                texts = [t for t in (findings, impression) if t is not None]
                good = [t for t in texts if _words(t) >= 3]
                cxr["dropped"]["lateral"] += len(views) - nf
                cxr["dropped"]["short_text"] += nf * (len(texts) - len(good))
                cxr["dropped"]["no_text"] += 0 if good else nf
                cxr["kept"][sp] += nf if good else 0
                gen["dropped"]["lateral"] += len(views) - nf
                if findings is None:
                    gen["dropped"]["no_findings"] += nf
                    summ["dropped"]["no_findings"] += 1
                    continue
                gen["kept"][sp] += nf
                if impression is None or _words(impression) < 3:
                    summ["dropped"]["no_impression"] += 1
                else:
                    summ["kept"][sp] += 1
    return reports, jobs, images, label_rows, {"mimic_cxr": cxr, "mimic_gen": gen,
                                               "mimic_sum": summ}


def _mimic(out, seed, sc, render):
    """MIMIC-CXR-JPG images, MIMIC-CXR reports and the three CSVs; laterals and reports without a
    findings section (or with a too-short impression) are what the rules drop."""
    root = out / "mimic_cxr"
    reports, jobs, images, label_rows, counts = _mimic_studies(root, seed, sc)
    for path, text in reports:
        _write(path, text)
    shapes = [r[0] for r in render(jobs, "mimic_cxr")]
    meta, splits = [], []
    # the release is sorted by subject
    by_patient = sorted(zip(images, shapes), key=lambda t: t[0][1:3] + t[0][:1])
    for (dicom, subject, study, split, view, date, clock), (h, w) in by_patient:
        proc, view_name, orient = VIEW_META[view]
        meta.append([dicom, subject, study, proc, view, h, w, date, clock, proc, view_name, orient])
        splits.append([dicom, study, subject, split])
    _write_gz(root / "mimic-cxr-2.0.0-split.csv.gz",
              _csv_text(["dicom_id", "study_id", "subject_id", "split"], splits))
    _write_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", _csv_text(
        ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
         "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
         "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta))
    _write_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz",
              _csv_text(["subject_id", "study_id"] + MIMIC_LABELS, sorted(label_rows)))
    return counts


# MS-CXR's category of each finding it boxes (support devices are none of its eight)
MS_CXR_CATEGORY = dict(atelectasis="Atelectasis", cardiomegaly="Cardiomegaly",
                       consolidation="Consolidation", edema="Edema", effusion="Pleural Effusion",
                       nodule="Lung Opacity", pneumothorax="Pneumothorax")
MS_CXR_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                  "image_width", "image_height", "split"]


def _ms_cxr(out, seed, sc, render):
    """MS-CXR v1.1.0: sentence / box pairs on frontal films of the MIMIC-CXR world, named by their
    paths in its tree (no image of its own). A study whose report states a finding as present gives
    its first frontal film; sc["ms_cxr"] films per MIMIC split are drawn from those, so the split
    is the study's, patient-disjoint as MIMIC's. A film gives one phrase per such finding, in the
    report's words, with the boxes of what the renderer drew for it (render_cxr), in the rows of
    the release: one per box. Nothing for synth_counts.json: prepare keeps every row."""
    rng = _rng(seed, 9)
    _, jobs, images, _, _ = _mimic_studies(out / "mimic_cxr", seed, sc)
    films = {}  # study -> (render job, image, findings to phrase)
    for job, image in zip(jobs, images):
        st = job[1]
        said = [f for f in MS_CXR_CATEGORY if st["status"].get(f) == "pos"]  # "pos": drawn
        if st["view"] in FRONTAL and said:
            films.setdefault(image[2], (job, image, said))
    chosen = []
    for split, k in zip(("train", "validate", "test"), sc["ms_cxr"]):
        pool = [film for film in films.values() if film[1][3] == split]
        chosen += [pool[i] for i in sorted(rng.permutation(len(pool))[:k])]
    drawn = render([("cxr_findings", job[1], job[2], None) for job, _, _ in chosen], "ms_cxr")
    rows = []
    for (job, (dicom, subject, study, split, *_), said), ((h, w), found) in zip(chosen, drawn):
        path = f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg"
        for f in said:
            text = _say(f, job[1]["found"][f], "pos", rng)[0]
            rows += [[dicom, MS_CXR_CATEGORY[f], text, path, *(f"{v:.1f}" for v in box), w, h,
                      SPLIT[split]] for box in found.get(f, [])]  # none: drawn off the film
    _write(out / "ms_cxr" / "MS_CXR_Local_Alignment_v1.1.0.csv", _csv_text(MS_CXR_COLUMNS, rows))
    return {}


def _truth(st):
    """Expert labels of CheXpert's valid.csv: the drawn findings themselves, 0/1 for every column,
    no -1."""
    labels = {k: 0.0 for k in CHEXPERT_LABELS}
    for f in st["found"]:
        labels[LABEL_OF[f]] = 1.0
    labels["Lung Opacity"] = float(any(
        f in st["found"] for f in ("consolidation", "edema", "atelectasis", "nodule")))
    labels["No Finding"] = float(not st["found"])
    return labels


def _chexpert(out, seed, sc, render):
    """CheXpert-v1.0-small: train labels from the reports (with -1 and blanks), valid from the
    latent truth."""
    rng, root = _rng(seed, 3), out / "chexpert"
    n_rows = dict(zip(("train", "valid"), sc["chexpert"]))
    patients = iter(_ids(rng, sum(n_rows.values()), 1, 100_000))
    jobs, rows, lateral = [], dict(train=[], valid=[]), 0
    for split, n in n_rows.items():
        while len(rows[split]) < n:
            pid = next(patients)
            for si in range(1, int(rng.integers(1, 3)) + 1):
                st = sample_study(rng)
                labels = write_report(st, rng)[2] if split == "train" else _truth(st)
                views = [st["view"]] + (["LATERAL"] if rng.random() < 0.25 or not rows[split]
                                        else [])
                for vi, view in enumerate(views[:n - len(rows[split])], 1):
                    kind = "frontal" if view in FRONTAL else "lateral"
                    rel = (f"CheXpert-v1.0-small/{split}/patient{pid:05d}/study{si}/"
                           f"view{vi}_{kind}.jpg")
                    jobs.append(("cxr", dict(st, view=view), (seed, 3, len(jobs)), root / rel))
                    rows[split].append([rel, "Male" if st["sex"] == "M" else "Female", st["age"],
                                        kind.capitalize(), view if kind == "frontal" else ""]
                                       + [_fmt(labels.get(k)) for k in CHEXPERT_LABELS])
                    lateral += kind == "lateral"
                if len(rows[split]) >= n:
                    break
    render(jobs, "chexpert")
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_LABELS
    for split, r in rows.items():
        _write(root / "CheXpert-v1.0-small" / f"{split}.csv", _csv_text(header, sorted(r)))
    total = sum(map(len, rows.values()))
    return {"chexpert": dict(kept=dict(total=total - lateral), dropped=dict(lateral=lateral))}


def _rsna(out, seed, sc, render):
    """RSNA Pneumonia: one label row per box (Target 1) or one blank row (Target 0) per patient, PNG
    images."""
    rng, root = _rng(seed, 4), out / "rsna"
    n = sc["rsna"]
    n_boxes = _force(rng.choice(4, n, p=(0.7, 0.135, 0.15, 0.015)), [2, 0])
    jobs, states = [], []
    for i, nb in enumerate(n_boxes):
        st = sample_study(rng, view=_pick(rng, FRONTAL), exclude=("consolidation",))
        st.update(size=(128, 128), n_boxes=int(nb), pid=_hex(rng, (8, 4, 4, 4, 12)))
        jobs.append(("cxr", st, (seed, 4, i), root / "stage_2_train_images" / f"{st['pid']}.png"))
        states.append(st)
    labels, classes = [], []
    for st, (_, boxes) in zip(states, render(jobs, "rsna")):
        cls = ("Lung Opacity" if boxes else "No Lung Opacity / Not Normal" if st["found"]
               else "Normal")
        for box in boxes or [None]:
            labels.append([st["pid"]]
                          + ([f"{v:.1f}" for v in box] + [1] if box else ["", "", "", "", 0]))
            classes.append([st["pid"], cls])
    _write(root / "stage_2_train_labels.csv",
           _csv_text(["patientId", "x", "y", "width", "height", "Target"], labels))
    _write(root / "stage_2_detailed_class_info.csv", _csv_text(["patientId", "class"], classes))
    return {"rsna": dict(kept=dict(total=n), dropped=dict(box_rows_merged=len(labels) - n))}


NLI_FINDINGS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "pneumothorax",
                "nodule")


def _claim(f, a, present, rng):
    """A hypothesis sentence asserting that finding f is present or absent."""
    if not present:
        name = "pulmonary nodule" if f == "nodule" else NEG_NAME[f]
        return _pick(rng, (f"There is no {name}.", f"No {name} is seen.",
                           f"The study shows no {name}."))
    side = a["side"]
    return _pick(rng, dict(
        effusion=("There are bilateral pleural effusions." if side == "bilateral" else
                  f"There is a {side} pleural effusion.", "There is fluid in the pleural space."),
        cardiomegaly=("The heart is enlarged.", "There is cardiomegaly."),
        consolidation=(f"There is consolidation in the {_lobe(a)}.",
                       "There is an airspace consolidation."),
        atelectasis=("There is atelectasis.", "Some atelectasis is present."),
        edema=("There is pulmonary edema.", "The patient has pulmonary edema."),
        pneumothorax=(f"There is a {side} pneumothorax.", "A pneumothorax is present."),
        nodule=("There is a pulmonary nodule.", f"A nodule is seen in the {_lobe(a)}."))[f])


def _nli_pair(rng):
    """A RadNLI-style pair from one study: the premise states some findings as present or absent;
    the hypothesis restates one (entailment), states its opposite (contradiction) or speaks of one
    not stated (neutral)."""
    label = _pick(rng, ("entailment", "neutral", "contradiction"))
    while True:
        st = sample_study(rng)
        stated = [f for f in NLI_FINDINGS if st["status"].get(f) in ("pos", "neg")]
        unstated = [f for f in NLI_FINDINGS if f not in stated]
        if stated and (label != "neutral" or unstated):
            break
    sents = [_say(f, st["attrs"][f], "pos", rng)[0] for f in stated if st["status"][f] == "pos"]
    sents += [t for t, _ in _negatives([f for f in stated if st["status"][f] == "neg"], rng)]
    premise = " ".join(sents[i] for i in rng.permutation(len(sents)))
    if label == "neutral":
        f = _pick(rng, unstated)
        return premise, _claim(f, st["attrs"][f], rng.random() < 0.5, rng), label
    f = _pick(rng, stated)
    present = st["status"][f] == "pos"
    return premise, _claim(f, st["attrs"][f], present == (label == "entailment"), rng), label


def _radnli(out, seed, sc, render):
    rng, root = _rng(seed, 5), out / "radnli"
    n_train, n_dev, n_test = sc["radnli"]
    numbers = iter(_ids(rng, n_dev + n_test, 0, 100_000))
    for name, n in (("mli_train_v1", n_train), ("radnli_dev_v1", n_dev),
                    ("radnli_test_v1", n_test)):
        rows = []
        for _ in range(n):
            premise, hyp, label = _nli_pair(rng)
            pid = _hex(rng, (8, 4, 4, 4, 12)) if name.startswith("mli") else str(next(numbers))
            rows.append(json.dumps(dict(pair_id=pid, sentence1=premise, sentence2=hyp,
                                        gold_label=label)))
        _write(root / f"{name}.jsonl", "\n".join(rows) + "\n")
    return {"radnli": dict(kept=dict(train=n_train, val=n_dev, test=n_test), dropped={})}


def _vqa_images(rng, seed, ds, n, path_of, render, desc, prefix="synpic", **kw):
    """Figures for a VQA set: names drawn at random, images rendered;
    returns [(name, figure state)]."""
    names = [f"{prefix}{k}" for k in _ids(rng, n, 100, 5_000 if prefix == "xmlab" else 100_000)]
    figs = [sample_figure(rng, **kw) for _ in range(n)]
    render([("figure", fig, (seed, ds, i), path_of(name))
            for i, (name, fig) in enumerate(zip(names, figs))], desc)
    return list(zip(names, figs))


def _vqa_rad(out, seed, sc, render):
    """VQA-RAD: one JSON list; test records are the ones whose phrase_type starts with "test"."""
    rng, root = _rng(seed, 6), out / "vqa_rad"

    images = _vqa_images(rng, seed, 6, sc["vqa_rad"],
                         lambda name: root / "VQA_RAD Image Folder" / f"{name}.jpg",
                         render, "vqa_rad", modalities=("CT", "MRI", "X-ray"),
                         organs=("head", "chest", "abdomen"))
    records = []
    for name, fig in images:
        qa = questions(fig, rng)
        for i in rng.permutation(len(qa))[:int(rng.integers(8, 12))]:
            q, a, closed, qtype, _ = qa[i]
            records.append(dict(
                qid=0, phrase_type=_pick(rng, ("freeform", "para")),
                qid_linked_id=_hex(rng, (8,), ""),
                image_case_url=f"https://medpix.nlm.nih.gov/case?id={_hex(rng, (8, 4, 4, 4, 12))}",
                image_name=f"{name}.jpg",
                image_organ=dict(head="HEAD", chest="CHEST", abdomen="ABD")[fig["organ"]],
                evaluation="not evaluated", question=q, question_rephrase="NULL",
                question_relation="NULL", question_frame="NULL", question_type=qtype, answer=a,
                answer_type="CLOSED" if closed else "OPEN"))
    test = _force(rng.random(len(records)) < 0.13, [True, False])
    records = [records[i] for i in rng.permutation(len(records))]  # qids follow the shuffled order
    for qid, (r, t) in enumerate(zip(records, test), 1):
        r["qid"], r["phrase_type"] = qid, ("test_" if t else "") + r["phrase_type"]
    _write(root / "VQA_RAD Dataset Public.json", json.dumps(records, indent=4) + "\n")
    return {"vqa_rad": dict(kept=dict(total=len(records)), dropped={})}


SLAKE_ZH = (("这张图片的成像方式是什么？",
             lambda f: {"CT": "CT", "MRI": "MRI", "X-ray": "X光"}[f["modality"]], "Modality"),
            ("图中主要是哪个器官？",
             lambda f: dict(head="脑", chest="胸部", abdomen="腹部", pelvis="盆腔")[f["organ"]],
             "Organ"),
            ("这张图片看起来正常吗？", lambda f: "是" if f["finding"] == "normal" else "否", "Abnormality"))


def _slake(out, seed, sc, render):
    """SLAKE: train/validate/test JSON lists of English and Chinese questions about xmlab images."""
    rng, root = _rng(seed, 7), out / "slake"

    images = _vqa_images(rng, seed, 7, sum(sc["slake"]),
                         lambda name: root / "imgs" / name / "source.jpg", render, "slake",
                         prefix="xmlab", modalities=("CT", "MRI", "X-ray"),
                         organs=("head", "chest", "abdomen", "pelvis"))
    qid, kept, zh = 0, {}, 0
    ends = np.cumsum(sc["slake"])
    for split, lo, hi in zip(("train", "validate", "test"), [0, *ends[:-1]], ends):
        records = []
        for name, fig in images[lo:hi]:
            qa = [(q, a, closed, content, "en") for q, a, closed, _, content in questions(fig, rng)]
            qa += [(q, ans(fig), content == "Abnormality", content, "zh")
                   for q, ans, content in SLAKE_ZH if rng.random() < 0.5 or not zh]
            for q, a, closed, content, lang in qa:
                zh += lang == "zh"
                records.append(dict(
                    img_id=int(name[5:]), img_name=f"{name}/source.jpg", question=q, answer=a,
                    q_lang=lang, location=dict(head="Brain", chest="Chest", abdomen="Abdomen",
                                               pelvis="Pelvic Cavity")[fig["organ"]],
                    modality={"X-ray": "X-Ray"}.get(fig["modality"], fig["modality"]),
                    answer_type="CLOSED" if closed else "OPEN", base_type="vqa",
                    content_type=content))
        records = [records[i] for i in rng.permutation(len(records))]
        for r in records:
            qid += 1
            r["qid"] = qid
        kept[SPLIT[split]] = sum(r["q_lang"] == "en" for r in records)
        _write(root / f"{split}.json", json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    return {"slake": dict(kept=kept, dropped=dict(non_english=zh))}


MEDVQA_MODALITY = {"CT": ("ct noncontrast", "ct w/contrast (iv)"),
                   "MRI": ("mr - t1w", "mr - t2 weighted"),
                   "X-ray": ("xr - plain film",) * 2, "US": ("us - ultrasound",) * 2}
MEDVQA_ORGAN = dict(head="skull and contents", chest="lung, mediastinum, pleura",
                    abdomen="gastrointestinal", pelvis="genitourinary", spine="spine and contents",
                    knee="musculoskeletal")
MEDVQA_Q = dict(modality=("what modality was used to take this image?",
                          "what imaging method was used?", "how was this image taken?"),
                plane=("in what plane was this image taken?", "which plane is this image in?",
                       "what plane is demonstrated?"),
                organ=("what organ system is shown in this image?", "which organ system is imaged?",
                       "what part of the body is being imaged?"),
                abnormality=("what is abnormal in this image?",
                             "what is the primary abnormality in this image?",
                             "what abnormality is seen?"))


def _medvqa_answer(fig, category):
    if category == "modality":
        return MEDVQA_MODALITY[fig["modality"]][fig["contrast"] or fig["sequence"] == "t2"]
    if category == "plane":
        return "pa" if fig["plane"] == "frontal" else fig["plane"]
    if category == "organ":
        return MEDVQA_ORGAN[fig["organ"]]
    where = (BONE_WORDS if fig["finding"] == "fracture" else HOST_WORDS)[fig["organ"]]
    return "normal" if fig["finding"] == "normal" else f"{where} {fig['finding']}"


def _medvqa(out, seed, sc, render):
    """ImageCLEF VQA-Med 2019: pipe-separated QA files per category (train/val) and one test file
    with categories."""
    rng, root = _rng(seed, 8), out / "medvqa2019"
    n_train, n_val, n_test = sc["medvqa"]
    names = iter(_ids(rng, n_train + n_val + n_test, 10_000, 100_000))
    kept, abnormal = {}, 0
    cats = ("modality", "plane", "organ", "abnormality")
    for s, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        figs = [(f"synpic{next(names)}", sample_figure(rng)) for _ in range(n)]
        render([("figure", fig, (seed, 8, s, i), root / split / "images" / f"{name}.jpg")
                for i, (name, fig) in enumerate(figs)], f"medvqa2019 {split}")
        if split == "test":  # one question per image, of a random category
            which = _force(rng.integers(0, 4, n), [3, 0])
            lines = [f"{name}|{cats[c]}|{_pick(rng, MEDVQA_Q[cats[c]])}|"
                     f"{_medvqa_answer(fig, cats[c])}"
                     for (name, fig), c in zip(figs, which)]
            _write(root / "test" / "VQAMed2019_Test_Questions_w_Ref_Answers.txt",
                   "\n".join(lines) + "\n")
            abnormal += int((which == 3).sum())
            kept["test"] = int((which != 3).sum())
            continue
        for c, cat in enumerate(cats, 1):
            order = rng.permutation(n)
            lines = [f"{figs[i][0]}|{_pick(rng, MEDVQA_Q[cat])}|{_medvqa_answer(figs[i][1], cat)}"
                     for i in order]
            _write(root / split / "QAPairsByCategory" / f"C{c}_{cat.capitalize()}_{split}.txt",
                   "\n".join(lines) + "\n")
        kept[split], abnormal = 3 * n, abnormal + n
    return {"medvqa2019": dict(kept=kept, dropped=dict(abnormality=abnormal))}


WRITERS = dict(roco=_roco, medicat=_medicat, mimic_cxr=_mimic, chexpert=_chexpert, rsna=_rsna,
               radnli=_radnli, vqa_rad=_vqa_rad, slake=_slake, medvqa2019=_medvqa, ms_cxr=_ms_cxr)


def generate(out_dir, seed=0, scale="default", progress=True, datasets=None, workers=None,
             overwrite=False, real_size=False):
    """Write the synthetic mirror of `datasets` (default: all ten) under out_dir and return the
    synth_counts dict.

    The same seed gives byte-identical files whatever `workers` is (default: up to 2 processes). A
    dataset folder that already has files is an error unless overwrite=True, which deletes it first.
    Datasets added to an existing world keep the others' counts in synth_counts.json.
    real_size=True renders the images at the sizes of the real releases (REAL_SIZE; ~3 s a chest
    film on one core), to exercise and time the input pipeline at real scale (prepare's image cache,
    tools/bench.py); labels, texts and ids stay the same.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    names = list(datasets or DATASETS)
    unknown = [n for n in names if n not in WRITERS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(DATASETS)}")
    out = Path(out_dir)
    for name in names:
        if (out / name).exists() and any((out / name).iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out / name} already has files; remove it, "
                                      "pick another --out, or pass --overwrite")
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    counts_file = out / "synth_counts.json"
    # removed until the new one is written: written last, it marks a complete world
    kept = json.loads(counts_file.read_text()) if datasets and counts_file.exists() else {}
    if counts_file.exists():
        counts_file.unlink()
    render = _renderer(min(2, os.cpu_count() or 1) if workers is None else workers, progress,
                       real_size)
    counts = {}
    for name in names:
        counts.update(WRITERS[name](out, seed, SCALES[scale], render))
    _write(counts_file, json.dumps({**kept, **counts}, indent=1, sort_keys=True) + "\n")
    return counts


# ------------------------------------------------------------------------------------------- floors

def auroc(y, score):
    """Area under the ROC curve as the Mann-Whitney statistic (ties get average ranks); nan if y has
    one class."""
    y = np.asarray(y, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, count = np.unique(np.asarray(score), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(count) - (count - 1) / 2)[inverse]  # 1-based average rank of each score
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logistic_regression(x, y, l2=1e-2, steps=500, lr=0.5):
    """Independent L2-regularised logistic regressions (one per column of y) by full-batch gradient
    descent on standardised features. Returns a function that maps features to probabilities."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.hstack([(x - mu) / sd, np.ones((len(x), 1))])
    w = np.zeros((z.shape[1], y.shape[1]))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-z @ w))
        w -= lr * (z.T @ (p - y) / len(z) + l2 * np.vstack([w[:-1], np.zeros((1, w.shape[1]))]))
    return lambda xs: 1 / (1 + np.exp(-np.hstack([(xs - mu) / sd, np.ones((len(xs), 1))]) @ w))


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _pixels(paths, side=16):
    """Raw pixels of each image, area-downsampled to side x side, in [0, 1]."""
    return np.stack([np.asarray(Image.open(p).convert("L").resize((side, side), Image.BOX),
                                np.float64).ravel() / 255
                     for p in paths])


def floors(prepared_dir):
    """What trivial baselines score on a prepared world, as markdown rows: a linear model on 16x16
    pixels for CheXpert, the majority answer for each VQA set, chance for retrieval. Missing folders
    are reported as such."""
    root, rows = Path(prepared_dir), []
    if (root / "chexpert" / "train.jsonl").exists():
        train, test = (_read_jsonl(root / "chexpert" / "train.jsonl"),
                       _read_jsonl(root / "chexpert" / "test.jsonl"))
        predict = logistic_regression(_pixels([r["image"] for r in train]),
                                      np.array([r["labels"] for r in train], float))
        score, y = (predict(_pixels([r["image"] for r in test])),
                    np.array([r["labels"] for r in test]))
        per = [auroc(y[:, k], score[:, k]) for k in range(y.shape[1])]
        rows.append(("chexpert", "logistic regression on 16x16 pixels: macro AUROC (5 labels)",
                     f"{np.nanmean(per):.3f} ({' / '.join(f'{a:.2f}' for a in per)})"))
    else:
        rows.append(("chexpert", "logistic regression on 16x16 pixels", "not prepared"))
    for name in ("vqa_rad", "slake", "medvqa2019"):
        if not (root / name / "train.jsonl").exists():
            rows.append((name, "majority answer accuracy", "not prepared"))
            continue
        train, test = (_read_jsonl(root / name / "train.jsonl"),
                       _read_jsonl(root / name / "test.jsonl"))
        answers = [r["answer"] for r in train]
        top = max(set(answers), key=lambda a: (answers.count(a), a))
        by_type = {t: [r["answer"] for r in train if r["answer_type"] == t]
                   for t in ("open", "closed")}
        top_t = {t: max(set(a), key=lambda x: (a.count(x), x)) for t, a in by_type.items() if a}
        acc = np.mean([r["answer"] == top for r in test]) if test else float("nan")
        acc_t = (np.mean([r["answer"] == top_t.get(r["answer_type"]) for r in test]) if test
                 else float("nan"))
        rows.append((name, f"majority answer accuracy (one answer {top!r} / one per answer type)",
                     f"{acc:.3f} / {acc_t:.3f}"))
    if (root / "roco_retrieval" / "test.jsonl").exists():
        n = len(_read_jsonl(root / "roco_retrieval" / "test.jsonl"))
        rows.append(("roco_retrieval", f"Recall@1 at chance (1/N, N = {n} test pairs)",
                     f"{1 / max(n, 1):.4f}"))
    else:
        rows.append(("roco_retrieval", "Recall@1 at chance", "not prepared"))
    return "\n".join(["| dataset | floor | value |", "|---|---|---|"]
                     + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the synthetic mirror of the nine PTUnifier "
                                             "datasets and MS-CXR, or print the trivial baselines "
                                             "of a prepared world (--floors).")
    ap.add_argument("--out", help="folder to write the raw mirror into (a sub-folder per dataset "
                                  "+ synth_counts.json)")
    ap.add_argument("--seed", type=int, default=0,
                    help="world seed: the same seed gives byte-identical files")
    ap.add_argument("--scale", choices=list(SCALES), default="default",
                    help="tiny: tests, seconds; small: quick experiments; default: what "
                         "`python train.py` uses")
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, metavar="NAME",
                    help=f"only these datasets (default: all ten: {', '.join(DATASETS)})")
    ap.add_argument("--workers", type=int, help="processes rendering images (default: up to 2)")
    ap.add_argument("--real-size", action="store_true",
                    help="render images at the real releases' sizes "
                         "(chest films ~2,500 x 3,000 px, figures ~900-1,150 px) "
                         "instead of ~128 px: slow (~3 s a film per core); "
                         "use with --scale tiny or small")
    ap.add_argument("--overwrite", action="store_true",
                    help="delete dataset folders under --out that already have files")
    ap.add_argument("--floors", metavar="PREPARED_DIR",
                    help="print a markdown table of trivial baselines for a prepared folder "
                         "(prepare.py output)")
    args = ap.parse_args(argv)
    if not args.out and not args.floors:
        ap.error("give --out (generate) and/or --floors (baselines)")
    if args.out:
        t0 = time.time()
        counts = generate(args.out, args.seed, args.scale, datasets=args.datasets,
                          workers=args.workers, overwrite=args.overwrite, real_size=args.real_size)
        print(f"wrote {len(counts)} prepared-folder counts to "
              f"{Path(args.out) / 'synth_counts.json'} in {time.time() - t0:.1f}s")
    if args.floors:
        print(floors(args.floors))


if __name__ == "__main__":
    main()
