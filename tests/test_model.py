"""The single-tower model: input kinds, attention kernels, prompts and gradients."""

import pytest
import torch
import torch.nn.functional as F

from ptunifier_min.config import PRESETS, ModelConfig, TrainConfig, build
from ptunifier_min.flops import flops_per_pass
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
    for kw, n_vis, n_txt in [(dict(image=img), P, k_l + 2),
                             (dict(input_ids=ids, attention_mask=mask), 1 + k_v, 7),
                             (dict(image=img, input_ids=ids, attention_mask=mask), P, 7)]:
        enc = model(**kw)
        assert enc.hidden.shape == (3, n_vis + n_txt, cfg.dim)
        assert enc.pooled.shape == (3, 2 * cfg.dim)
        assert enc.n_visual == n_vis
        assert torch.equal(enc.pooled[:, cfg.dim:], enc.hidden[:, n_vis])
    # selected rows are reported only by pools, and only for the missing side
    enc = model(image=img)
    assert (enc.selected_textual is not None) == (mode == "pool") and enc.selected_visual is None


@pytest.mark.parametrize("manual", [False, True])
def test_reading_only_the_pooled_or_textual_states_gives_the_same_states_and_gradients(manual):
    """read="pooled" / "text": the last block computes only those positions. Its states, and
    every parameter's gradient of a loss on them, equal those of the whole pass (the products
    differ in rows only: 1e-6)."""
    cfg = tiny()
    torch.manual_seed(0)
    # train mode: the pool queries of a training pass; tiny's dropout is 0
    model = PTUnifier(cfg).train()
    img, ids, mask = batch()
    for kw in (dict(image=img), dict(input_ids=ids, attention_mask=mask),
               dict(image=img, input_ids=ids, attention_mask=mask)):
        full = model(**kw, manual_attention=manual)
        Tv = full.n_visual
        for read, expected in (("pooled", torch.stack([full.hidden[:, 0], full.hidden[:, Tv]], 1)),
                               ("text", full.hidden[:, Tv:])):
            part = model(**kw, manual_attention=manual, read=read)
            torch.testing.assert_close(part.hidden, expected, atol=1e-6, rtol=1e-5)
            if read == "pooled":
                torch.testing.assert_close(part.pooled, full.pooled, atol=1e-6, rtol=1e-5)
            else:
                assert part.pooled is None
            weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
            grads = []
            for states in (expected, part.hidden):
                model.zero_grad(set_to_none=True)
                (states * weights).sum().backward(retain_graph=True)
                grads.append({n: p.grad.clone()
                              for n, p in model.named_parameters() if p.grad is not None})
            assert grads[0].keys() == grads[1].keys()
            # within 1e-5 of the tensor's largest entry (a key bias's is ~0)
            for n, g in grads[0].items():
                assert ((grads[1][n] - g).abs().max()
                        <= 1e-5 * g.abs().max()), f"{read}: gradient of {n}"


def test_flops_of_a_pass_that_reads_some_rows():
    """All rows: the 6 N T + 12 L D T^2 estimate. Fewer: the last block's key and value projections
    stay for every position, its other products only for the rows computed."""
    cfg = tiny()
    L, D, T, H = cfg.depth, cfg.dim, 50, int(cfg.dim * cfg.mlp_ratio)
    N = L * (4 * D * D + 2 * H * D)
    assert flops_per_pass(cfg, T) == flops_per_pass(cfg, T, T) == 6 * N * T + 12 * L * D * T * T
    # per row computed: query, output, MLP, attention
    last_rows = 6 * (2 * D * D + 2 * H * D) + 12 * D * T
    assert flops_per_pass(cfg, T) - flops_per_pass(cfg, T, 2) == last_rows * (T - 2)


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
    prompts, idx, _ = pool(q)
    expected = torch.argsort(q @ pool.weight.detach().t(), dim=-1, descending=True)[:, :3]
    assert torch.equal(idx, expected)
    assert torch.equal(prompts, pool.weight.detach()[expected])
    prompts.sum().backward()
    touched = pool.weight.grad.abs().sum(1) > 0
    assert torch.equal(touched, torch.isin(torch.arange(10), expected.flatten()))


@pytest.mark.parametrize("keys", ["shared", "separate"])
def test_pool_gradients_are_the_same_on_every_run(keys):
    # Rows chosen by many inputs sum many gradients. Indexing's backward adds them with atomics
    # across threads, in an order that varies from run to run, so identical runs drifted apart;
    # the gather must add them in a fixed order. Two threads: one would hide the race.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        pool = Prompts("pool", pool_size=64, k=8, dim=128, keys=keys)
        torch.nn.init.normal_(pool.weight)
        if pool.key is not None:
            torch.nn.init.normal_(pool.key)
        q, g = torch.randn(256, 128), torch.randn(256, 8, 128)
        grads = set()
        for _ in range(30):
            pool.zero_grad()
            prompts, _, terms = pool(q)
            ((prompts * g).sum() + terms["pull"]).backward()
            grads.add(b"".join(p.grad.numpy().tobytes() for p in pool.parameters()))
    finally:
        torch.set_num_threads(threads)
    assert len(grads) == 1


def test_static_prompts_are_shared_and_none_is_empty():
    static = Prompts("static", pool_size=10, k=3, dim=4)
    p, idx, terms = static(torch.randn(5, 4))
    assert p.shape == (5, 3, 4) and idx is None and terms is None and torch.equal(p[0], p[4])
    p, idx, terms = Prompts("none", 10, 3, 4)(torch.randn(5, 4))
    assert p.shape == (5, 0, 4) and terms is None


def test_cosine_selection_ignores_row_norms_and_dot_does_not():
    """Pool variant: a row scaled up wins every dot-product query but no cosine
    one it did not already win."""
    torch.manual_seed(0)
    # queries in the positive orthant, as is row 7: a positive dot product with each
    q = torch.randn(6, 4).abs()
    dot, cos = Prompts("pool", 10, 2, 4), Prompts("pool", 10, 2, 4, select="cosine")
    with torch.no_grad():
        dot.weight.normal_()
        dot.weight[7] = 1000 * F.normalize(torch.rand(4), dim=0)
        cos.weight.copy_(dot.weight)
    assert (dot(q)[1][:, 0] == 7).all()  # the long row is every query's first choice
    expected = (F.normalize(q, dim=-1)
                @ F.normalize(cos.weight.detach(), dim=-1).t()).topk(2).indices
    assert torch.equal(cos(q)[1], expected) and not (expected[:, 0] == 7).all()


def test_separate_keys_select_and_only_the_pull_term_trains_them():
    """L2P's key-value pool: selection by the keys, the rows inserted; the keys
    get gradient from `pull` only."""
    torch.manual_seed(0)
    pool = Prompts("pool", 10, 3, 4, keys="separate")
    torch.nn.init.normal_(pool.weight)
    torch.nn.init.normal_(pool.key)
    q = torch.randn(5, 4, requires_grad=True)
    prompts, idx, terms = pool(q)
    assert torch.equal(idx, (q @ pool.key.detach().t()).topk(3).indices)
    assert torch.equal(prompts, pool.weight.detach()[idx])
    prompts.sum().backward(retain_graph=True)
    # top-k has no gradient: without the pull term the keys never learn
    assert pool.key.grad is None
    terms["pull"].backward()
    expected = 1 - F.cosine_similarity(q.detach()[:, None], pool.key.detach()[idx], dim=-1).mean()
    torch.testing.assert_close(terms["pull"], expected)
    assert torch.equal(pool.key.grad.abs().sum(1) > 0, torch.isin(torch.arange(10), idx.flatten()))
    # the query is detached in the pull term (L2P: a frozen query)
    assert q.grad is None or not q.grad.abs().sum()


def test_balance_term_is_one_for_uniform_use_and_grows_as_the_pool_collapses():
    pool = Prompts("pool", 4, 1, 4)
    with torch.no_grad():
        pool.weight.copy_(torch.eye(4))
    # each query picks another row and the softmax scores are uniform across the batch: f = P = 1/4
    torch.testing.assert_close(pool(10 * torch.eye(4))[2]["balance"], torch.tensor(1.0))
    # every query picks row 0 with p ~ 1
    collapsed = pool(10 * torch.eye(4)[[0, 0, 0, 0]])[2]["balance"]
    assert collapsed > 3.9  # N * 1 * P_0 ~ 4


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
    # errors name the flag
    with pytest.raises(ValueError, match="--prompt-mode"):
        ModelConfig(prompt_mode="dynamic")


@pytest.mark.parametrize("clip_like", [False, True])
def test_each_pass_feeds_the_blocks_exactly_these_tokens(clip_like):
    """The sequence each pass kind hands to the first block, written out position by position from
    the parameters: a change of convention (a position or type embedding dropped or added, prompts
    given positions, another query) fails here. clip_like: norm_pre and the BERT embedding norm."""
    cfg = tiny(prompt_mode="pool",
               **(dict(norm_pre=True, text_norm_eps=1e-12) if clip_like else {}))
    model = PTUnifier(cfg).eval()
    with torch.no_grad():  # no parameter left at its neutral init (zero biases, unit norms)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    img, ids, mask = batch()
    fed = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: fed.append(args[0].detach()))
    m, D = model, cfg.dim
    pos_v, types = m.pos_embed[0], m.token_type_embeddings.weight  # [1 + N, D], [2, D]
    patches = m.patch_embed.proj(img).flatten(2).transpose(1, 2)  # [B, N, D]

    def words(ids):  # [T] ids -> [T, D]: word + position, then the embedding norm if any
        return m.text_norm(m.word_embeddings(ids) + m.position_embeddings.weight[:len(ids)])

    def pick(pool, query, k):  # the pool rows of the k best dot products, best first
        return pool[(pool @ query).topk(k).indices]

    def tower_input(visual, textual):
        x = torch.cat([visual + types[0], textual + types[1]])
        return F.layer_norm(x, (D,), m.norm_pre.weight, m.norm_pre.bias, cfg.norm_eps) \
            if clip_like else x

    with torch.no_grad():
        for b in range(len(img)):
            image_part = torch.cat([m.cls_token[0] + pos_v[:1], patches[b] + pos_v[1:]])
            text = ids[b][mask[b]]  # the real tokens: padding is never a query
            text_part = words(ids[b])  # padding too: masked in attention, still fed
            cls_sep = words(torch.tensor([cfg.cls_id, cfg.sep_id]))
            # image-only: [CLS] (position 0), k_l prompts without positions, [SEP] (position 1)
            prompts_l = pick(m.textual_prompts.weight, (patches[b] + pos_v[1:]).mean(0), cfg.k_l)
            image_only = tower_input(image_part, torch.cat([cls_sep[:1], prompts_l, cls_sep[1:]]))
            # text-only: [IMG_CLS] with its position, k_v prompts without positions
            prompts_v = pick(m.visual_prompts.weight, words(text).mean(0), cfg.k_v)
            text_only = tower_input(torch.cat([m.cls_token[0] + pos_v[:1], prompts_v]), text_part)
            pair = tower_input(image_part, text_part)
            for kw, want in [(dict(image=img[b:b + 1]), image_only),
                             (dict(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]),
                              text_only),
                             (dict(image=img[b:b + 1], input_ids=ids[b:b + 1],
                                   attention_mask=mask[b:b + 1]), pair)]:
                fed.clear()
                model(**kw)
                torch.testing.assert_close(fed[0][0], want, atol=1e-6, rtol=1e-5,
                                           msg=f"{sorted(kw)} of row {b}")
