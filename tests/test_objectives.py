"""MLM masking, ITM negatives, the ITC loss against a hand computation, and gradients for every objective set."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ptunifier_min.config import PRESETS, TrainConfig, build
from ptunifier_min.model import PTUnifier
from ptunifier_min.objectives import (IGNORE, freeze_unused, itc_loss, itm_negatives, mask_tokens,
                                      pretraining_loss)

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIAL = {"ids": [CLS, SEP, PAD], "mask": MASK}
OBJECTIVE_SETS = [",".join(c) for r in (1, 2, 3) for c in itertools.combinations(["mlm", "itm", "itc"], r)]


def text_batch(B=64, T=40, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    lengths = torch.randint(5, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    ids[~mask] = PAD
    return ids, mask


def test_mlm_masking_statistics():
    ids, mask = text_batch(B=512)
    out, labels = mask_tokens(ids, mask, SPECIAL["ids"], 1000, torch.Generator().manual_seed(1), 0.15, MASK)
    chosen = labels != IGNORE
    candidates = mask & (ids != CLS) & (ids != SEP)
    assert not (chosen & ~candidates).any(), "CLS, SEP or padding was chosen"
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (out == MASK) & chosen
    kept = (out == ids) & chosen
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(kept.sum() / n - 0.1) < 0.02 + 0.001  # a random replacement can hit the same id (1 in 1000)
    assert torch.equal(out[~chosen], ids[~chosen])


def test_whole_word_masking_masks_words_together():
    ids, mask = text_batch(B=256)
    continuation = torch.zeros(1000, dtype=torch.bool)
    continuation[500:] = True  # ids >= 500 are '##' pieces
    ids[:, 1] = 7  # position 1 always starts a word
    _, labels = mask_tokens(ids, mask, SPECIAL["ids"], 1000, torch.Generator().manual_seed(2), 0.15, MASK,
                            continuation)
    chosen = labels != IGNORE
    cand = mask & (ids != CLS) & (ids != SEP)
    piece = continuation[ids] & cand
    prev_chosen = torch.cat([torch.zeros(len(ids), 1, dtype=torch.bool), chosen[:, :-1]], 1)
    prev_cand = torch.cat([torch.zeros(len(ids), 1, dtype=torch.bool), cand[:, :-1]], 1)
    inner = piece & prev_cand  # a continuation whose predecessor is part of the same word
    assert torch.equal(chosen[inner], prev_chosen[inner])
    assert 0.1 < chosen.sum() / cand.sum() < 0.2


def test_itc_loss_equals_hand_computation():
    torch.manual_seed(0)
    zi = F.normalize(torch.randn(4, 8), dim=-1)
    zt = F.normalize(torch.randn(4, 8), dim=-1)
    scale = 1 / 0.07
    loss, _ = itc_loss(zi, zt, torch.tensor(scale))
    s = (zi @ zt.t()).tolist()
    i2t = sum(-math.log(math.exp(scale * s[i][i]) / sum(math.exp(scale * s[i][j]) for j in range(4)))
              for i in range(4)) / 4
    t2i = sum(-math.log(math.exp(scale * s[i][i]) / sum(math.exp(scale * s[j][i]) for j in range(4)))
              for i in range(4)) / 4
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-4


def test_itm_negatives_never_pick_the_same_image():
    index = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    g = torch.Generator().manual_seed(0)
    for sim in (None, torch.randn(8, 8)):
        for _ in range(50):
            neg = itm_negatives(index, g, sim)
            assert (index[neg] != index).all()
    with pytest.raises(ValueError, match="two different images"):
        itm_negatives(torch.tensor([5, 5]), g)


def fake_batch(B=6):
    ids, mask = text_batch(B=B, T=12, V=100)
    torch.manual_seed(1)
    return {"image": torch.randn(B, 3, 32, 32), "input_ids": ids, "attention_mask": mask,
            "index": torch.arange(B)}


@pytest.mark.parametrize("objectives", OBJECTIVE_SETS)
def test_every_trainable_parameter_gets_a_gradient(objectives):
    cfg = build(TrainConfig, {**PRESETS["tiny"], "objectives": objectives, "vocab_size": 100})
    model = PTUnifier(cfg.model)
    frozen = freeze_unused(model, cfg.objective_set())
    loss, stats = pretraining_loss(model, fake_batch(), cfg, torch.Generator().manual_seed(0), SPECIAL)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient for {missing}"
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    for name in cfg.objective_set():
        assert torch.isfinite(stats[f"{name}_loss"])
    if "itc" in objectives:  # pools learn only through ITC's single-modality passes
        assert "visual_prompts.weight" not in frozen
    else:
        assert "visual_prompts.weight" in frozen


def test_hard_negatives_follow_the_similarities():
    index = torch.arange(6)
    sim = torch.full((6, 6), -50.0)
    sim[torch.arange(6), (torch.arange(6) + 2) % 6] = 50.0  # text i looks most like image i + 2
    sim[torch.arange(6), torch.arange(6)] = 100.0  # its own image scores higher still, and must be excluded
    neg = itm_negatives(index, torch.Generator().manual_seed(0), sim)
    assert torch.equal(neg, (torch.arange(6) + 2) % 6)


def test_hard_negative_itm_trains():
    cfg = build(TrainConfig, {**PRESETS["tiny"], "vocab_size": 100, "itm_hard_negatives": True})
    model = PTUnifier(cfg.model)
    loss, stats = pretraining_loss(model, fake_batch(), cfg, torch.Generator().manual_seed(0), SPECIAL)
    loss.backward()
    assert torch.isfinite(loss) and model.itm_head.fc1.weight.grad.abs().sum() > 0
