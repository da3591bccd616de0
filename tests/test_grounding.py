"""Phrase grounding: CNR and mIoU pinned on hand-made maps and boxes; the maps of both methods
against their definitions; back to the film's pixels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptunifier_min import grounding, metrics
from ptunifier_min.config import PRESETS, TrainConfig, build
from ptunifier_min.model import PTUnifier


def test_cnr_and_miou_on_hand_made_maps_and_boxes():
    mask = metrics.box_mask([[1, 1, 2, 2]], 4, 4)  # the central 2 x 2 of a 4 x 4 film
    assert mask.sum() == 4 and mask[1:3, 1:3].all()
    perfect = mask.astype(float)
    assert metrics.cnr(perfect, mask) == float("inf")  # contrast without any noise
    noisy = perfect + np.array([[0, .2, 0, .2], [0, 0, 0, 0], [.2, 0, 0, 0], [0, 0, 0, .2]])
    # inside: 1 1 1 1 (var 0); outside: 12 pixels, four at 0.2 (mean 1/15, var 2/225)
    assert metrics.cnr(noisy, mask) == pytest.approx((1 - 1 / 15) / (2 / 225) ** 0.5)
    assert metrics.miou(perfect, mask) == 1.0
    # thresholds 0.1..0.5 of the min-max scaled map: 0.2 is above 0.1 only
    assert metrics.miou(noisy, mask) == pytest.approx((4 / 8 + 1 + 1 + 1 + 1) / 5)
    uniform = np.full((4, 4), 3.0)  # no preference: no contrast, the whole film selected
    assert metrics.cnr(uniform, mask) == 0.0 and metrics.miou(uniform, mask) == 4 / 16
    wrong = 1 - perfect
    assert metrics.miou(wrong, mask) == 0.0
    two = metrics.box_mask([[0, 0, 1, 1], [3, 3, 1, 1]], 4, 4)  # a phrase with two boxes: union
    assert two.sum() == 2 and two[0, 0] and two[3, 3]


def test_a_map_goes_back_onto_the_central_square_the_crop_kept():
    heat = torch.arange(4.0).view(2, 2)  # the model's 2 x 2 patch grid
    film = grounding.to_image(heat, width=6, height=4)  # landscape: the crop kept columns 1..4
    assert film.shape == (4, 6)
    assert (film[:, 0] == 0).all() and (film[:, 5] == 0).all()  # cut off: the map's minimum
    torch.testing.assert_close(film[:, 1:5], F.interpolate(heat[None, None], size=(4, 4),
                                                           mode="bilinear")[0, 0])
    prior = grounding.box_prior([[[0, 0, 5, 5]], [[5, 5, 5, 5]]], [(10, 10), (10, 10)], grid=2)
    assert prior == [[0.5, 0.0], [0.0, 0.5]]


def _model():
    cfg = build(TrainConfig, {**PRESETS["tiny"], "vocab_size": 100})
    torch.manual_seed(0)
    return PTUnifier(cfg.model).eval()


def _inputs(B=3):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (B, 1, 32, 32), dtype=torch.uint8, generator=g)
    ids = torch.randint(5, 100, (B, 6), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return pixels, ids, torch.ones(B, 6, dtype=torch.bool)


def test_the_similarity_map_is_each_patch_in_the_itc_image_head_against_the_sentence():
    model, (pixels, ids, mask) = _model(), _inputs()
    heat = grounding.patch_maps(model, pixels, ids, mask, "similarity")
    assert heat.shape == (3, 4, 4)
    with torch.no_grad():
        enc = model(image=pixels)
        zt = model.itc_embed(model(input_ids=ids, attention_mask=mask))
        for b in range(3):
            for i in range(16):  # patch i: in place of [IMG_CLS] in the pooled state
                pooled = torch.cat([enc.hidden[b, 1 + i], enc.hidden[b, enc.n_visual]])
                zi = F.normalize(model.itc_image_proj(pooled), dim=-1)
                assert heat[b].flatten()[i] == pytest.approx(float(zi @ zt[b]), abs=1e-5)


def test_the_gradcam_map_weighs_the_last_blocks_patch_inputs_by_the_itm_gradient():
    model, (pixels, ids, mask) = _model(), _inputs()
    heat = grounding.patch_maps(model, pixels, ids, mask, "gradcam")
    assert heat.shape == (3, 4, 4) and (heat >= 0).all()
    # the same by hand: perturb the last block's input along each patch state and read the score
    inputs = {}
    hook = model.blocks[-1].register_forward_pre_hook(
        lambda block, args: inputs.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(image=pixels, input_ids=ids, attention_mask=mask, read="pooled")
    hook.remove()
    x = inputs["x"].requires_grad_(True)
    h = x
    logits = model.itm_logits(model.norm(model.blocks[-1](h, None, False,
                                                         slice(0, 17 + 1, 17)))
                              .flatten(1))
    (grad,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), x)
    weights = grad[:, 1:17].mean(1, keepdim=True)
    expected = F.relu((weights * x.detach()[:, 1:17]).sum(-1)).view(3, 4, 4)
    torch.testing.assert_close(heat, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="grounding method must be one of similarity, gradcam"):
        grounding.patch_maps(model, pixels, ids, mask, "saliency")
