"""Where the model looks: a map over a film for a sentence (phrase grounding, as MS-CXR scores it).

    heat = patch_maps(model, pixels, ids, mask, method="gradcam")  # [B, g, g], the patch grid
    img_map = to_image(heat[0], width, height)                        # [H, W], the film's pixels
    overlay(film, img_map, boxes).save("overlay.png")

The single tower is a dual and a fusion encoder, so it offers two kinds of map:
- "similarity" (as BioViL): the dual-encoder passes. Each patch's final state of the image-only pass
  takes the place of [IMG_CLS] in the pooled state that the ITC image head projects
  ([patch ++ CLS] -> itc_image_proj), and the map is its cosine with the sentence's ITC embedding
  (text-only pass). No gradient, one image pass per film.
- "gradcam" (as ALBEF): the fusion pass of film and sentence, scored by the ITM head (matched logit
  minus not-matched). Grad-CAM on the patch states that enter the last block, the states the
  pooled [IMG_CLS] and [CLS] are read from: channel weights = the mean over patches of the score's
  gradient, map = ReLU(sum over channels of weight x state). One fused pass and one backward pass.

Maps are computed on the model's input (the film resized and center-cropped to a square) and
brought back to the film's pixels by to_image: bilinear upsampling onto the central square the
crop kept, the margins the crop cut off at the map's minimum (no evidence there).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import data, distributed, metrics
from .distributed import autocast
from .images import ImageTransform, load_image
from .tokenizer import encode_texts

METHODS = ("similarity", "gradcam")
DEFAULT = "gradcam"  # the headline method and the API's: the steadier CNR (docs/grounding.md)
BATCH = 32  # films per pass; under torchrun, the unit of a rank's share


def patch_maps(model, pixels, input_ids, attention_mask, method=DEFAULT):
    """[B, g, g] maps of B films (uint8 pixels [B, 1, S, S], the model's input) for B sentences
    (input_ids, attention_mask [B, T]), by `method` (METHODS). model: the backbone (PTUnifier)."""
    g = model.cfg.image_size // model.cfg.patch_size
    N = g * g
    if method == "similarity":
        with torch.no_grad():
            enc = model(image=pixels)  # [B, 1 + N + k_l + 2, D]
            patches, cls = enc.hidden[:, 1:1 + N], enc.hidden[:, enc.n_visual]  # [B, N, D], [B, D]
            pooled = torch.cat([patches, cls[:, None].expand(-1, N, -1)], -1)  # [B, N, 2D]
            zi = F.normalize(model.itc_image_proj(pooled).float(), dim=-1)  # [B, N, d]
            zt = model.itc_embed(model(input_ids=input_ids, attention_mask=attention_mask,
                                       read="pooled"))  # [B, d]
            heat = (zi * zt[:, None]).sum(-1)  # [B, N] cosines
    elif method == "gradcam":
        seen = {}

        def keep(block, args):  # the last block's input, made a leaf whose gradient we read
            seen["x"] = args[0].detach().requires_grad_(True)
            return (seen["x"], *args[1:])

        hook = model.blocks[-1].register_forward_pre_hook(keep)
        try:
            with torch.enable_grad():
                enc = model(image=pixels, input_ids=input_ids, attention_mask=attention_mask,
                            read="pooled")
                logits = model.itm_logits(enc.pooled).float()  # [B, 2]
                (grad,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), seen["x"])
        finally:
            hook.remove()
        states, grad = seen["x"].detach()[:, 1:1 + N].float(), grad[:, 1:1 + N].float()
        weights = grad.mean(1, keepdim=True)  # [B, 1, D]
        heat = F.relu((weights * states).sum(-1))  # [B, N]
    else:
        raise ValueError(f"grounding method must be one of {', '.join(METHODS)}, got {method!r}")
    return heat.view(-1, g, g)


def to_image(heat, width, height):
    """A [g, g] map of the model's input -> [height, width] over the original film: the input was
    the central min(width, height) square, resized (images.ImageTransform's center crop), so the
    map is upsampled bilinearly onto that square; the rest, cut off by the crop, gets the map's
    minimum."""
    m = min(width, height)
    left, top = (width - m) // 2, (height - m) // 2
    square = F.interpolate(heat[None, None].float(), size=(m, m), mode="bilinear",
                           align_corners=False)[0, 0]  # [m, m]
    out = torch.full((height, width), float(heat.min()), dtype=torch.float32)
    out[top:top + m, left:left + m] = square
    return out


def box_prior(boxes_per_film, sizes, grid=64):
    """The dataset's mean box prior: the mean over films of their boxes' union mask, on a
    [grid, grid] map of normalised image coordinates ([0, 1] x [0, 1] of each film)."""
    prior = np.zeros((grid, grid), dtype=np.float64)
    for boxes, (w, h) in zip(boxes_per_film, sizes):
        mask = np.zeros((grid, grid), dtype=bool)
        for x, y, bw, bh in boxes:
            mask[int(y / h * grid):int(np.ceil((y + bh) / h * grid)),
                 int(x / w * grid):int(np.ceil((x + bw) / w * grid))] = True
        prior += mask
    return (prior / max(1, len(sizes))).tolist()


def prior_map(prior, width, height):
    """A box prior (box_prior's [grid, grid] list) as a [height, width] map of one film."""
    grid = torch.tensor(prior, dtype=torch.float32)
    return F.interpolate(grid[None, None], size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0]


def evaluate(model, records, tok, prior, *, image_size, max_text_len, device, precision="fp32",
             proc=None):
    """Mean CNR and mIoU (metrics.cnr, metrics.miou) over MS-CXR records (text, boxes, width,
    height) of each map method and of two baselines: a uniform map (no contrast; it selects the
    whole film) and the box prior (box_prior of the train split). Each map is brought to the film's
    pixels (to_image) before it is scored. Under torchrun (proc) each rank maps its share."""
    proc = proc or distributed.Dist()
    was_training = model.training
    model.eval()
    transform, scores = ImageTransform(image_size), []
    lo, hi = distributed.shard(len(records), proc, BATCH)
    for i in range(lo, hi, BATCH):
        batch = records[i:min(i + BATCH, hi)]
        pixels = torch.stack([transform.pixels(load_image(data.image_path(r)))
                              for r in batch]).to(device)
        ids, mask = encode_texts(tok, [r["text"] for r in batch], max_text_len)
        with autocast(precision, device):
            maps = {m: patch_maps(model, pixels, ids.to(device), mask.to(device), m).float().cpu()
                    for m in METHODS}
        for j, r in enumerate(batch):
            w, h = r["width"], r["height"]
            boxes = metrics.box_mask(r["boxes"], w, h)
            film = {m: to_image(maps[m][j], w, h) for m in METHODS}
            film.update(uniform=torch.zeros(h, w), box_prior=prior_map(prior, w, h))
            scores.append({m: (metrics.cnr(x, boxes), metrics.miou(x, boxes))
                           for m, x in film.items()})
    model.train(was_training)
    # every rank's share, in rank order
    scores = [s for part in distributed.gather_objects(scores, proc) for s in part]
    out = {m: {"cnr": float(np.mean([s[m][0] for s in scores])),
               "miou": float(np.mean([s[m][1] for s in scores]))} for m in scores[0]}
    out.update(cnr=out[DEFAULT]["cnr"], miou=out[DEFAULT]["miou"], method=DEFAULT,
               pairs=len(scores))
    return out


def write_overlays(model, records, tok, image_size, max_text_len, device, folder):
    """For each record, <folder>/<id>.png: the film (the original file, at its own size) once per
    map method side by side, each with its map as a heat overlay and the sentence's boxes; returns
    the paths."""
    os.makedirs(folder, exist_ok=True)
    transform, paths = ImageTransform(image_size), []
    for r in records:
        film = load_image(r["image"])
        pixels = transform.pixels(load_image(data.image_path(r)))[None].to(device)
        ids, mask = encode_texts(tok, [r["text"]], max_text_len)
        panels = [overlay(film, to_image(patch_maps(model, pixels, ids.to(device), mask.to(device),
                                                    m)[0].float().cpu(), *film.size), r["boxes"])
                  for m in METHODS]
        out = Image.new("RGB", (sum(p.width for p in panels), film.height))
        for k, p in enumerate(panels):
            out.paste(p, (k * film.width, 0))
        paths.append(os.path.join(folder, f"{r['id']}.png"))
        out.save(paths[-1])
    return paths


def overlay(film, heat, boxes=(), alpha=0.45):
    """A PIL RGB image: the film, the map as a heat overlay (blue low, red high; min-max scaled)
    and the boxes ([x, y, w, h] pixels) in green."""
    h = heat.float()
    h = (h - h.min()) / (h.max() - h.min()) if h.max() > h.min() else torch.zeros_like(h)
    h = h.numpy()
    # a simple blue -> red ramp, brighter in the middle
    colour = np.stack([h, 1 - np.abs(2 * h - 1), 1 - h], -1) * 255  # [H, W, 3]
    base = np.asarray(film.convert("RGB"), dtype=np.float32)
    img = Image.fromarray(((1 - alpha) * base + alpha * colour).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for x, y, w, bh in boxes:
        draw.rectangle([x, y, x + w - 1, y + bh - 1], outline=(0, 255, 0), width=2)
    return img
