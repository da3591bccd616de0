"""The pool watch train.py logs (ptunifier_min/poolwatch.py) and the pool variants' switches."""

import pytest
import torch

from ptunifier_min import poolwatch
from ptunifier_min.config import PRESETS, TrainConfig, build
from ptunifier_min.model import PTUnifier
from ptunifier_min.objectives import pretraining_loss


ITC_DRAWS = {"rank": 0, "world": 1}  # ITC alone draws nothing on the host (objectives.draw_step)


def tiny_cfg(**kw):
    return build(TrainConfig, {**PRESETS["tiny"], "objectives": "itc", **kw})


def batch(B=6, T=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    return {"image": torch.randint(0, 256, (B, 1, 32, 32), dtype=torch.uint8, generator=g),
            "input_ids": ids, "attention_mask": mask, "image_id": torch.arange(B)}


def watched_model():
    """(config, a tiny pool model, the probe batch, a PoolWatch on it)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = PTUnifier(cfg.model)
    b = batch()
    return cfg, model, b, poolwatch.PoolWatch(model, b, "fp32", torch.device("cpu"))


def test_watch_reads_the_gradient_that_reaches_each_pool_and_the_selection_histogram():
    cfg, model, b, watch = watched_model()
    loss, _, selected = pretraining_loss(model, b, ITC_DRAWS, cfg)
    loss.backward()
    watch.count(selected)
    expected = {k: getattr(model, f"{k}_prompts").weight.grad.norm().item()
                for k in ("visual", "textual")}
    hist = {k: torch.bincount(selected[k].flatten(), minlength=cfg.model.pool_size)
            for k in selected}
    rec = watch.read(model)
    for k in ("visual", "textual"):
        assert (rec[f"pool_grad_norm_{k}"] == pytest.approx(expected[k], rel=1e-5)
                and expected[k] > 0)
        assert ((rec[f"selected_{k}_rows"], rec[f"selected_{k}_entropy"])
                == poolwatch.pool_usage(hist[k]))
        assert f"probe_topk_changed_{k}" not in rec  # nothing to compare with at the first read
    assert watch.read(model)["probe_topk_changed_visual"] == 0  # same weights, same selection


def test_watch_counts_the_share_of_probe_slots_whose_row_changed():
    _, model, _, watch = watched_model()
    watch.read(model)
    before = watch.probe_selection(model)["textual"]
    # move one chosen row away from every query: each input loses it from its top-k
    with torch.no_grad():
        row = before[0, 0]
        model.textual_prompts.weight[row] = -100 * model.textual_prompts.weight[row].sign()
    after = watch.probe_selection(model)["textual"]
    changed = 1 - sum(len(set(a.tolist()) & set(c.tolist()))
                      for a, c in zip(before, after)) / before.numel()
    assert 0 < changed < 1
    assert watch.read(model)["probe_topk_changed_textual"] == pytest.approx(changed)


def test_final_query_is_the_first_token_after_a_pass_of_the_modality_alone():
    cfg = tiny_cfg(pool_query="final")
    torch.manual_seed(0)
    model = PTUnifier(cfg.model).eval()
    with torch.no_grad():
        # then the image alone is exactly a plain ViT pass
        model.token_type_embeddings.weight.zero_()
    image = batch()["image"]
    query = model._query(model.embed_image(image), None, 0)
    torch.testing.assert_close(query, model.forward_vision(image)[:, 0])
    assert not query.requires_grad  # L2P's query: no gradient through the selection's input
    enc = model(image=image)
    expected = (query @ model.textual_prompts.weight.detach().t()).topk(cfg.model.k_l).indices
    assert torch.equal(enc.selected_textual, expected)


@pytest.mark.parametrize("flags, message", [
    (dict(pool_keys="separate"), "--w-pool-pull"),
    (dict(w_pool_balance=0.1, objectives="mlm,itm"), "need itc"),
    (dict(w_pool_pull=0.1, prompt_mode="static"), "--prompt-mode pool"),
    (dict(pool_select="cosine", prompt_mode="none"),
     "--pool-select cosine only apply to --prompt-mode pool"),
])
def test_pool_variant_flags_that_cannot_work_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(**flags)


def test_weighted_pool_terms_enter_the_loss_and_separate_keys_learn_through_them():
    cfg = tiny_cfg(pool_keys="separate", w_pool_pull=0.5, w_pool_balance=0.25)
    torch.manual_seed(0)
    model = PTUnifier(cfg.model)
    loss, stats, _ = pretraining_loss(model, batch(), ITC_DRAWS, cfg)
    expected = stats["itc_loss"] + 0.5 * stats["pool_pull"] + 0.25 * stats["pool_balance"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert (model.visual_prompts.key.grad.abs().sum() > 0
            and model.textual_prompts.key.grad.abs().sum() > 0)
