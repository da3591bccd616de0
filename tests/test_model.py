"""The single-tower model: input kinds, attention kernels, prompts and gradients."""

import pytest
import torch

from ptunifier_min.config import PRESETS, ModelConfig, TrainConfig, build
from ptunifier_min.model import PTUnifier, Prompts


def tiny(**kw):
    return build(TrainConfig, {**PRESETS["tiny"], **kw}).model


def batch(B=3, T=7, pad=True):
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    if pad:
        mask[0, 4:] = False
        ids[0, 4:] = 0
    return torch.randn(B, 3, 32, 32), ids, mask


@pytest.mark.parametrize("mode", ["none", "static", "pool"])
def test_shapes_for_three_input_kinds(mode):
    cfg = tiny(prompt_mode=mode)
    model = PTUnifier(cfg).eval()
    img, ids, mask = batch()
    P = 1 + (32 // 8) ** 2
    k_v, k_l = (0, 0) if mode == "none" else (cfg.k_v, cfg.k_l)
    for kw, n_vis, n_txt in [(dict(image=img), P, k_l + 2), (dict(input_ids=ids, attention_mask=mask), 1 + k_v, 7),
                             (dict(image=img, input_ids=ids, attention_mask=mask), P, 7)]:
        enc = model(**kw)
        assert enc.hidden.shape == (3, n_vis + n_txt, cfg.dim)
        assert enc.pooled.shape == (3, 2 * cfg.dim)
        assert enc.n_visual == n_vis
        assert torch.equal(enc.pooled[:, cfg.dim:], enc.hidden[:, n_vis])
    # selected rows are reported only by pools, and only for the missing side
    enc = model(image=img)
    assert (enc.selected_textual is not None) == (mode == "pool") and enc.selected_visual is None


def test_padding_is_masked():
    """Changing what sits under padding must not change any real position's output."""
    model = PTUnifier(tiny()).eval()
    img, ids, mask = batch()
    a = model(image=img, input_ids=ids, attention_mask=mask).hidden
    ids2 = ids.clone()
    ids2[0, 4:] = 77
    b = model(image=img, input_ids=ids2, attention_mask=mask).hidden
    real = torch.cat([torch.ones(17, dtype=torch.bool), mask[0]])
    torch.testing.assert_close(a[0, real], b[0, real])
    assert not torch.allclose(a[0, ~real], b[0, ~real])


@pytest.mark.parametrize("pad", [False, True])
def test_sdpa_equals_manual_attention(pad):
    model = PTUnifier(tiny()).eval()
    img, ids, mask = batch(pad=pad)
    for kw in [dict(image=img), dict(input_ids=ids, attention_mask=mask),
               dict(image=img, input_ids=ids, attention_mask=mask)]:
        fused = model(**kw).hidden
        manual = model(**kw, manual_attention=True).hidden
        torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


def test_prompt_pool_selects_top_k_and_trains_exactly_those_rows():
    torch.manual_seed(0)
    pool = Prompts("pool", pool_size=10, k=3, dim=4)
    torch.nn.init.normal_(pool.weight)
    q = torch.randn(2, 4)
    prompts, idx = pool(q)
    expected = torch.argsort(q @ pool.weight.detach().t(), dim=-1, descending=True)[:, :3]
    assert torch.equal(idx, expected)
    assert torch.equal(prompts, pool.weight.detach()[expected])
    prompts.sum().backward()
    touched = pool.weight.grad.abs().sum(1) > 0
    assert torch.equal(touched, torch.isin(torch.arange(10), expected.flatten()))


def test_static_prompts_are_shared_and_none_is_empty():
    static = Prompts("static", pool_size=10, k=3, dim=4)
    p, idx = static(torch.randn(5, 4))
    assert p.shape == (5, 3, 4) and idx is None and torch.equal(p[0], p[4])
    p, idx = Prompts("none", 10, 3, 4)(torch.randn(5, 4))
    assert p.shape == (5, 0, 4)


def test_missing_text_with_no_prompts_is_the_empty_text():
    """prompt_mode none: an image-only pass equals the pair with the text '[CLS] [SEP]'."""
    cfg = tiny(prompt_mode="none")
    model = PTUnifier(cfg).eval()
    img = torch.randn(2, 3, 32, 32)
    empty = torch.tensor([[cfg.cls_id, cfg.sep_id]] * 2)
    torch.testing.assert_close(model(image=img).hidden, model(image=img, input_ids=empty).hidden)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="--prompt-mode"):  # the flag's name (issue 9: errors name the flag)
        ModelConfig(prompt_mode="dynamic")
