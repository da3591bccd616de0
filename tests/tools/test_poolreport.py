"""The pool report of a checkpoint (tools/poolreport.py): the attention it reads is the attention
the blocks computed, it equals the uniform share under uniform attention, and a tiny run's
checkpoint gets its report."""

import json
import math

import pytest
import torch

import train
from ptunifier_min.config import PRESETS
from ptunifier_min.model import PTUnifier
from test_poolwatch import batch, tiny_cfg
from test_train import synth_root  # noqa: F401  (the tiny pre-training world, shared)
from tools import poolreport


def test_attention_maps_are_the_attention_the_blocks_computed():
    """Recomputing each block from the captured maps gives the next block's input:
    they are the real attention."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = PTUnifier(cfg.model).eval()
    b = batch()
    inputs = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
             for blk in model.blocks]
    enc, maps = poolreport._attention_maps(model, input_ids=b["input_ids"],
                                           attention_mask=b["attention_mask"], heads_mean=False)
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
    report = poolreport.attention_report(model, b["image"], b["input_ids"], b["attention_mask"])
    for name in ("image_only", "text_only"):
        r = report[name]
        assert r["cls_to_prompts"] == pytest.approx(r["uniform_cls_to_prompts"], abs=1e-5)
        assert (r["prompts_to_present_modality"]
                == pytest.approx(r["uniform_prompts_to_present_modality"], abs=1e-5))
    k_l = cfg.model.k_l
    assert report["image_only"]["uniform_cls_to_prompts"] == pytest.approx(k_l / (1 + 16 + k_l + 2))


def test_a_run_logs_the_pool_diagnostics_and_the_command_reports_on_its_checkpoint(
        synth_root, tmp_path, capsys):
    train.main(["--preset", "tiny", "--synth-root", synth_root, "--out", str(tmp_path),
                "--eval-pairs", "0", "--steps", "10", "--log-every", "5"])
    with open(tmp_path / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert ({"pool_grad_norm_visual", "pool_grad_norm_textual", "pool_pull", "pool_balance"}
            <= set(logged[0]))
    assert 0 <= logged[1]["probe_topk_changed_textual"] <= 1
    report = poolreport.main([str(tmp_path), "--pairs", "8", "--out", str(tmp_path / "ps.json")])
    with open(tmp_path / "ps.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    pools = report["pools"]["textual"]
    assert 1 <= pools["rows_in_use"] <= PRESETS["tiny"]["pool_size"]
    assert 0 <= pools["entropy"] <= math.log(PRESETS["tiny"]["pool_size"]) + 1e-9
    assert set(report["attention"]) == {"image_only", "text_only"}
    assert "textual pool:" in capsys.readouterr().out
