"""Prompt-pool diagnostics (poolstats.py) and the pool variants' switches (issue 13)."""

import json
import math

import pytest
import torch

import train
from ptunifier_min import poolstats
from ptunifier_min.config import PRESETS, TrainConfig, build
from ptunifier_min.model import PTUnifier
from ptunifier_min.objectives import pretraining_loss
from test_train import synth_root  # noqa: F401  (the tiny pre-training world, shared)


def tiny_cfg(**kw):
    return build(TrainConfig, {**PRESETS["tiny"], "objectives": "itc", **kw})


def batch(B=6, T=9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    return {"image": torch.randint(0, 256, (B, 1, 32, 32), dtype=torch.uint8, generator=g), "input_ids": ids,
            "attention_mask": mask, "image_id": torch.arange(B)}


def watched_model():
    """(config, a tiny pool model, the probe batch, a PoolWatch on it)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = PTUnifier(cfg.model)
    b = batch()
    return cfg, model, b, poolstats.PoolWatch(model, b, "fp32", torch.device("cpu"))


def test_watch_reads_the_gradient_that_reaches_each_pool_and_the_selection_histogram():
    cfg, model, b, watch = watched_model()
    loss, _, selected = pretraining_loss(model, b, cfg)
    loss.backward()
    watch.count(selected)
    expected = {k: getattr(model, f"{k}_prompts").weight.grad.norm().item() for k in ("visual", "textual")}
    hist = {k: torch.bincount(selected[k].flatten(), minlength=cfg.model.pool_size) for k in selected}
    rec = watch.read(model)
    for k in ("visual", "textual"):
        assert rec[f"pool_grad_norm_{k}"] == pytest.approx(expected[k], rel=1e-5) and expected[k] > 0
        assert (rec[f"selected_{k}_rows"], rec[f"selected_{k}_entropy"]) == poolstats.pool_usage(hist[k])
        assert f"probe_topk_changed_{k}" not in rec  # nothing to compare with at the first read
    assert watch.read(model)["probe_topk_changed_visual"] == 0  # same weights, same selection


def test_watch_counts_the_share_of_probe_slots_whose_row_changed():
    _, model, _, watch = watched_model()
    watch.read(model)
    before = watch.probe_selection(model)["textual"]
    with torch.no_grad():  # move one chosen row away from every query: each input loses it from its top-k
        row = before[0, 0]
        model.textual_prompts.weight[row] = -100 * model.textual_prompts.weight[row].sign()
    after = watch.probe_selection(model)["textual"]
    changed = 1 - sum(len(set(a.tolist()) & set(c.tolist())) for a, c in zip(before, after)) / before.numel()
    assert 0 < changed < 1
    assert watch.read(model)["probe_topk_changed_textual"] == pytest.approx(changed)


def test_attention_maps_are_the_attention_the_blocks_computed():
    """Recomputing each block from the captured maps gives the next block's input: they are the real attention."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = PTUnifier(cfg.model).eval()
    b = batch()
    inputs = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for blk in model.blocks]
    enc, maps = poolstats._attention_maps(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                          heads_mean=False)
    for h in hooks:
        h.remove()
    inputs = inputs[len(model.blocks):]  # the second pass, inside _attention_maps
    outputs = inputs[1:] + [None]
    for blk, x, att, nxt in zip(model.blocks, inputs, maps, outputs):
        B, T, D = x.shape
        v = blk.attn.qkv(blk.norm1(x)).view(B, T, 3, blk.attn.heads, -1).permute(2, 0, 3, 1, 4)[2]
        y = x + blk.attn.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        y = y + blk.mlp(blk.norm2(y))
        if nxt is not None:
            torch.testing.assert_close(y, nxt, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(model.norm(y), enc.hidden, atol=1e-5, rtol=1e-5)


def test_attention_report_equals_the_uniform_share_when_attention_is_uniform():
    cfg = tiny_cfg(prompt_mode="static")
    model = PTUnifier(cfg.model).eval()
    with torch.no_grad():  # q = k = 0: every position attends uniformly to the keys it may see
        for blk in model.blocks:
            blk.attn.qkv.weight[:2 * cfg.model.dim].zero_()
            blk.attn.qkv.bias[:2 * cfg.model.dim].zero_()
    b = batch()
    report = poolstats.attention_report(model, b["image"], b["input_ids"], b["attention_mask"])
    for name in ("image_only", "text_only"):
        r = report[name]
        assert r["cls_to_prompts"] == pytest.approx(r["uniform_cls_to_prompts"], abs=1e-5)
        assert r["prompts_to_present_modality"] == pytest.approx(r["uniform_prompts_to_present_modality"], abs=1e-5)
    k_l = cfg.model.k_l
    assert report["image_only"]["uniform_cls_to_prompts"] == pytest.approx(k_l / (1 + 16 + k_l + 2))


def test_final_query_is_the_first_token_after_a_pass_of_the_modality_alone():
    cfg = tiny_cfg(pool_query="final")
    torch.manual_seed(0)
    model = PTUnifier(cfg.model).eval()
    with torch.no_grad():
        model.token_type_embeddings.weight.zero_()  # then the image alone is exactly a plain ViT pass
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
    (dict(pool_select="cosine", prompt_mode="none"), "--pool-select cosine only apply to --prompt-mode pool"),
])
def test_pool_variant_flags_that_cannot_work_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(**flags)


def test_weighted_pool_terms_enter_the_loss_and_separate_keys_learn_through_them():
    cfg = tiny_cfg(pool_keys="separate", w_pool_pull=0.5, w_pool_balance=0.25)
    torch.manual_seed(0)
    model = PTUnifier(cfg.model)
    loss, stats, _ = pretraining_loss(model, batch(), cfg)
    expected = stats["itc_loss"] + 0.5 * stats["pool_pull"] + 0.25 * stats["pool_balance"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert model.visual_prompts.key.grad.abs().sum() > 0 and model.textual_prompts.key.grad.abs().sum() > 0


def test_a_run_logs_the_pool_diagnostics_and_the_command_reports_on_its_checkpoint(synth_root, tmp_path, capsys):
    train.main(["--preset", "tiny", "--synth-root", synth_root, "--out", str(tmp_path), "--eval-pairs", "0",
                "--steps", "10", "--log-every", "5"])
    with open(tmp_path / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert {"pool_grad_norm_visual", "pool_grad_norm_textual", "pool_pull", "pool_balance"} <= set(logged[0])
    assert 0 <= logged[1]["probe_topk_changed_textual"] <= 1
    report = poolstats.main([str(tmp_path), "--pairs", "8", "--out", str(tmp_path / "ps.json")])
    with open(tmp_path / "ps.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    pools = report["pools"]["textual"]
    assert 1 <= pools["rows_in_use"] <= PRESETS["tiny"]["pool_size"]
    assert 0 <= pools["entropy"] <= math.log(PRESETS["tiny"]["pool_size"]) + 1e-9
    assert set(report["attention"]) == {"image_only", "text_only"}
    assert "textual pool:" in capsys.readouterr().out
