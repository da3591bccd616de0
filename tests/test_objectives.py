"""MLM masking, ITM negatives, the ITC loss against a hand computation, fp32 under bf16 autocast,
the logit-scale clamp, and gradients for every objective set."""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from ptunifier_min.images import ImageTransform
from ptunifier_min.tokenizer import continuation_table, encode_texts, load_tokenizer, special_ids
from ptunifier_min import data, distributed, objectives, optim
from ptunifier_min.config import PRESETS, TrainConfig, build
from ptunifier_min.model import PTUnifier, Prompts, normalize, pixel_table
from ptunifier_min.objectives import (IGNORE, hard_negative_probs, itc_loss, itm_loss,
                                      itm_negatives, itm_plan, mask_step, mask_tokens, mlm_loss,
                                      pretraining_loss, valid_negatives)
from ptunifier_min.datasets.source import train_tokenizer

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIAL = {"ids": [CLS, SEP, PAD], "mask": MASK}
OBJECTIVE_SETS = [",".join(c) for r in (1, 2, 3)
                  for c in itertools.combinations(["mlm", "itm", "itc"], r)]


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
    out, labels = mask_tokens(ids, mask, SPECIAL["ids"], 1000,
                              torch.Generator().manual_seed(1), 0.15, MASK)
    chosen = labels != IGNORE
    candidates = mask & (ids != CLS) & (ids != SEP)
    assert not (chosen & ~candidates).any(), "CLS, SEP or padding was chosen"
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (out == MASK) & chosen
    kept = (out == ids) & chosen
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    # a random replacement can hit the same id (1 in 1000)
    assert abs(kept.sum() / n - 0.1) < 0.02 + 0.001
    assert torch.equal(out[~chosen], ids[~chosen])


def test_whole_word_masking_masks_words_together():
    ids, mask = text_batch(B=256)
    continuation = torch.zeros(1000, dtype=torch.bool)
    continuation[500:] = True  # ids >= 500 are '##' pieces
    ids[:, 1] = 7  # position 1 always starts a word
    _, labels = mask_tokens(ids, mask, SPECIAL["ids"], 1000, torch.Generator().manual_seed(2),
                            0.15, MASK, continuation)
    chosen = labels != IGNORE
    cand = mask & (ids != CLS) & (ids != SEP)
    piece = continuation[ids] & cand
    prev_chosen = torch.cat([torch.zeros(len(ids), 1, dtype=torch.bool), chosen[:, :-1]], 1)
    prev_cand = torch.cat([torch.zeros(len(ids), 1, dtype=torch.bool), cand[:, :-1]], 1)
    inner = piece & prev_cand  # a continuation whose predecessor is part of the same word
    assert torch.equal(chosen[inner], prev_chosen[inner])
    assert 0.1 < chosen.sum() / cand.sum() < 0.2


def test_whole_word_masking_with_byte_level_bpe_masks_every_piece_of_a_word_together(
        byte_level_bpe):
    tok = load_tokenizer(str(byte_level_bpe / "vocab.json"))  # RoBERTa's files
    sp = special_ids(tok)
    texts = ["Pneumothorax on the x-ray, 2.5 cm.", "Moderate pleural effusion.",
             "Cardiomediastinal silhouette unchanged"] * 100
    ids, mask = encode_texts(tok, texts, 48)
    _, labels = mask_tokens(ids, mask, [sp["cls"], sp["sep"], sp["pad"]], tok.get_vocab_size(),
                            torch.Generator().manual_seed(3), 0.15, sp["mask"],
                            continuation_table(tok))
    chosen = labels != IGNORE
    words_chosen, first_chosen, several = [], 0, 0
    for row, text in enumerate(texts):
        enc = tok.encode(text, add_special_tokens=False)
        # the whitespace-delimited word of each piece (position i + 1: after <s>); a lone 'Ġ'
        # piece, a space, belongs to the word after it
        word = [len(text[:end].split()) - (not text[end - 1].isspace()) for _, end in enc.offsets]
        for w in range(len(text.split())):
            picks = {bool(chosen[row, i + 1]) for i in range(len(word)) if word[i] == w}
            assert len(picks) == 1, (text, w)  # all of the word's pieces, or none
            words_chosen.append(picks.pop())
            if words_chosen[-1]:
                first_chosen += w == 0  # the first word, which has no space marker
                several += word.count(w) > 1
    assert first_chosen > 0 and several > 0
    assert 0.1 < sum(words_chosen) / len(words_chosen) < 0.2
    # words of one piece each: whole-word masking draws exactly as token masking, the first word
    # (no space marker) by its own draw, not by <s>'s
    ids, mask = encode_texts(tok, ["The pleural is no"] * 300, 48)
    assert ids.shape[1] == 6  # <s> The Ġpleural Ġis Ġno </s>
    by_word, by_token = (
        mask_tokens(ids, mask, [sp["cls"], sp["sep"], sp["pad"]], tok.get_vocab_size(),
                    torch.Generator().manual_seed(4), 0.15, sp["mask"], table)[1]
        for table in (continuation_table(tok), None))
    assert torch.equal(by_word, by_token)


def test_itc_loss_equals_hand_computation():
    torch.manual_seed(0)
    zi = F.normalize(torch.randn(4, 8), dim=-1)
    zt = F.normalize(torch.randn(4, 8), dim=-1)
    scale = 1 / 0.07
    loss, _ = itc_loss(zi, zt, torch.tensor(scale))
    s = (zi @ zt.t()).tolist()
    i2t = sum(-math.log(math.exp(scale * s[i][i])
                        / sum(math.exp(scale * s[i][j]) for j in range(4)))
              for i in range(4)) / 4
    t2i = sum(-math.log(math.exp(scale * s[i][i])
                        / sum(math.exp(scale * s[j][i]) for j in range(4)))
              for i in range(4)) / 4
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-4


def test_itm_negatives_never_pick_the_same_image():
    index = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    valid = valid_negatives(index, torch.arange(8)[:, None])  # eight different texts
    g = torch.Generator().manual_seed(0)
    for weights in (valid.double(),
                    hard_negative_probs(torch.randn(8, 8), torch.eye(8), torch.tensor(1.0), valid)):
        for _ in range(50):
            neg = itm_negatives(weights, g)
            assert (index[neg] != index).all()
    # a batch in which some pair has no valid negative is refused on the host,
    # before any pass, naming the flag
    cfg = build(TrainConfig, {**PRESETS["tiny"], "objectives": "itm", "vocab_size": 100})
    batch = fake_batch(2)
    batch["image_id"] = torch.tensor([5, 5])
    with pytest.raises(ValueError,
                       match="pair 0 of the global batch of 2 has no valid negative.*--batch-size"):
        itm_plan(batch, cfg, g)


def test_exchange_plan_brings_every_rank_exactly_the_images_it_swaps_in():
    """All ranks' plans, with the all_to_all simulated: each rank ends with image rows[p] for each
    of its pairs p, and receives only the images of other ranks that it shows."""
    world, B = 4, 5
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = torch.where(torch.rand(world * B, generator=g) < 0.5,
                           torch.randint(0, world * B, (world * B,), generator=g),
                           torch.arange(world * B))
        plans = [objectives.exchange_plan(rows, B, r, world) for r in range(world)]
        images = torch.arange(world * B) * 10  # image j of the global batch is the number 10 j
        for r, (_, (_, recv_counts), source) in enumerate(plans):
            chunks = []
            # what rank s sends to rank r, in its order
            for s, (send, (send_counts, _), _) in enumerate(plans):
                start = sum(send_counts[:r])
                chunks.append(images[s * B:(s + 1) * B][send[start:start + send_counts[r]]])
                assert send_counts[r] == recv_counts[s]
            pool = torch.cat([images[r * B:(r + 1) * B], *chunks])
            assert torch.equal(pool[source], 10 * rows[r * B:(r + 1) * B])
            assert len(pool) - B == int((rows[r * B:(r + 1) * B] // B != r).sum())


def _exchange_worker(rank, world, store, out):
    import datetime
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            # a rank left out of the collective: an error
                            timeout=datetime.timedelta(seconds=30))
    # ranks 0 and 1 show each other's images; rank 2 keeps its own
    rows = torch.tensor([2, 3, 0, 1, 4, 5])
    send, split, source = objectives.exchange_plan(rows, 2, rank, world)
    # global row j holds 10 j
    image = (10 * (2 * rank + torch.arange(2))).to(torch.uint8).view(2, 1, 1, 1)
    got = distributed.exchange_rows(image, send, split, world)[source]
    torch.save((split, got.flatten()), f"{out}.{rank}")
    dist.destroy_process_group()


def test_a_rank_that_exchanges_no_image_still_takes_part_in_the_exchange(tmp_path):
    """3 gloo processes: rank 2 neither sends nor receives an image, and all three still get theirs
    (an all_to_all is a collective: a rank that skipped it would leave the others waiting)."""
    import torch.multiprocessing as mp
    out = str(tmp_path / "res")
    mp.spawn(_exchange_worker, args=(3, str(tmp_path / "store"), out), nprocs=3, join=True)
    results = [torch.load(f"{out}.{r}", weights_only=False) for r in range(3)]
    assert results[2][0] == ([0, 0, 0], [0, 0, 0])
    for r, expected in enumerate(([20, 30], [0, 10], [40, 50])):
        assert results[r][1].tolist() == expected


def test_itm_negatives_exclude_same_text_and_same_file(monkeypatch):
    """A negative must show another file AND carry another text (a
    shared sentence is a true match)."""
    # pairs 2 and 3 show one file (a figure under two ids)
    image_id = torch.tensor([10, 11, 12, 12, 13, 14])
    # pairs 0, 4: one text
    text = torch.tensor([[1, 7, 2], [1, 8, 2], [1, 9, 2], [1, 5, 2], [1, 7, 2], [1, 6, 2]])
    valid = valid_negatives(image_id, text)
    expected = torch.ones(6, 6, dtype=torch.bool)
    for i, j in [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (2, 3), (3, 2), (0, 4), (4, 0)]:
        expected[i, j] = False
    assert torch.equal(valid, expected)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        assert valid[torch.arange(6), itm_negatives(valid.double(), g)].all()
    # itm_plan builds that matrix from the batch: padding differs, the
    # texts (token ids) are what count
    cfg = build(TrainConfig, {**PRESETS["tiny"], "objectives": "itm", "vocab_size": 100})
    batch = fake_batch()
    batch["image_id"] = image_id
    batch["input_ids"][4], batch["attention_mask"][4] = (batch["input_ids"][0],
                                                         batch["attention_mask"][0])
    seen = {}
    real = objectives.itm_negatives

    def spy(weights, *args):
        seen["valid"] = weights > 0
        return real(weights, *args)
    monkeypatch.setattr(objectives, "itm_negatives", spy)
    itm_plan(batch, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(seen["valid"], expected)


def test_pretraining_batches_carry_the_image_file(tmp_path):
    """The collate gives every sample an int64 identity of its resolved image file,
    equal for one file under two records (here through a symbolic link), different for different
    files, the same in every process."""
    tok = train_tokenizer(["no pneumothorax. small effusion."] * 3, 60,
                          str(tmp_path / "tokenizer.json"))
    paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    for p in paths:
        Image.new("L", (8, 8)).save(p)
    os.symlink(paths[0], tmp_path / "link.png")
    records = [{"id": str(i), "image": p, "texts": ["No pneumothorax."]}
               for i, p in enumerate(paths + [str(tmp_path / "link.png")])]
    ds = data.PretrainDataset(records, ImageTransform(8).pixels)
    batch = data.pretrain_collate(tok, 8)([ds[i] for i in range(3)])
    ids = batch["image_id"]
    assert ids.dtype == torch.int64 and ids[0] == ids[2] and ids[0] != ids[1]
    # another process, another hash salt
    code = f"from ptunifier_min import data; print(data.file_id({paths[1]!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "1"},
                           cwd=os.path.dirname(os.path.dirname(__file__)))
    assert int(other.stdout) == ids[1]


def fake_batch(B=6):
    ids, mask = text_batch(B=B, T=12, V=100)
    torch.manual_seed(1)
    return {"image": torch.randn(B, 3, 32, 32), "input_ids": ids, "attention_mask": mask,
            "index": torch.arange(B), "image_id": torch.arange(B) + 100}


def draws_for(batch, cfg, seed=0, itm_seed=None, rank=0, world=1):
    """What draw_step draws for one micro-batch of rank `rank`, from
    explicitly seeded generators."""
    draws = {"rank": rank, "world": world}
    if "mlm" in cfg.objective_set():
        draws.update(mask_step([batch], cfg, torch.Generator().manual_seed(seed), SPECIAL,
                               rank=rank, world=world)[0])
    if "itm" in cfg.objective_set():
        seed = seed + 1 if itm_seed is None else itm_seed
        draws.update(itm_plan(batch, cfg, torch.Generator().manual_seed(seed), rank, world))
    return draws


def pretraining_step_loss(model, batch, cfg, seed=0):
    """One single-micro-step loss as train.py computes it: the step's MLM
    targets first, then the losses."""
    return pretraining_loss(model, batch, draws_for(batch, cfg, seed), cfg)


@pytest.mark.parametrize("objectives", OBJECTIVE_SETS)
def test_every_trainable_parameter_gets_a_gradient(objectives):
    cfg = build(TrainConfig, {**PRESETS["tiny"], "objectives": objectives, "vocab_size": 100})
    model = PTUnifier(cfg.model)
    # as train.py does
    frozen = optim.freeze_unreached(model, pretraining_step_loss(model, fake_batch(), cfg)[0])
    loss, stats, _ = pretraining_step_loss(model, fake_batch(), cfg)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad
               and (p.grad is None or p.grad.abs().sum() == 0)]
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
    # its own image scores higher still, and must be excluded
    sim[torch.arange(6), torch.arange(6)] = 100.0
    valid = valid_negatives(index, index[:, None])
    # text features x identity = sim
    probs = hard_negative_probs(sim, torch.eye(6), torch.tensor(1.0), valid)
    neg = itm_negatives(probs, torch.Generator().manual_seed(0))
    assert torch.equal(neg, (torch.arange(6) + 2) % 6)


def test_hard_negatives_are_sharp_at_a_global_batch_of_256():
    """ALBEF samples from softmax(sim / temperature); softmax of raw cosines
    in [-1, 1] is nearly uniform."""
    G = 256
    g = torch.Generator().manual_seed(0)
    # realistic cosines of a young model: unrelated pairs near 0.1
    sim = 0.1 + 0.05 * torch.randn(G, G, generator=g)
    sim[torch.arange(G), torch.arange(G)] = 0.6  # the positives
    hardest = (torch.arange(G) + 1) % G
    sim[torch.arange(G), hardest] = 0.45  # one look-alike per text
    valid = valid_negatives(torch.arange(G), torch.arange(G)[:, None])
    # the ITC logit scale at initialisation, detached inside
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    probs = hard_negative_probs(sim, torch.eye(G), scale, valid)
    p_hardest = probs[torch.arange(G), hardest]
    # uniform is 1 / 255; raw cosines give ~1.4 / 255
    assert (p_hardest > 20 / (G - 1)).all(), p_hardest.min()
    assert not probs.requires_grad and torch.allclose(probs.sum(1),
                                                      torch.ones(G, dtype=probs.dtype))
    assert (probs[~valid] == 0).all()


def test_hard_negatives_need_itc():
    with pytest.raises(ValueError, match="itm-hard-negatives .* add itc to --objectives"):
        build(TrainConfig, {"objectives": "mlm,itm", "itm_hard_negatives": True})
    build(TrainConfig, {"objectives": "itm,itc", "itm_hard_negatives": True})


def test_hard_negative_itm_trains():
    cfg = build(TrainConfig, {**PRESETS["tiny"], "vocab_size": 100, "itm_hard_negatives": True,
                              "w_mlm": 0.5, "w_itc": 2.0})
    model = PTUnifier(cfg.model)
    loss, stats, _ = pretraining_step_loss(model, fake_batch(), cfg)
    loss.backward()
    assert torch.isfinite(loss) and model.itm_head.fc1.weight.grad.abs().sum() > 0
    # the logged `loss` is the weighted total that is optimised
    weighted = 0.5 * stats["mlm_loss"] + stats["itm_loss"] + 2.0 * stats["itc_loss"]
    assert (stats["loss"] == loss.detach()
            and float(stats["loss"]) == pytest.approx(float(weighted), rel=1e-6))


def test_contrastive_products_and_losses_are_fp32_under_bf16_autocast():
    """Inside a bf16 autocast a.float() @ b.float().t() is still a bf16
    product (0.1 off at scale 100)."""
    g = torch.Generator().manual_seed(0)
    zi, zt = (F.normalize(torch.randn(64, 32, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(100.0)
    valid = valid_negatives(torch.arange(64), torch.arange(64)[:, None])
    logits, labels = (5 * torch.randn(40, 100, generator=g),
                      torch.randint(0, 100, (40,), generator=g))
    pair_logits, matched = torch.randn(40, 2, generator=g), torch.rand(40, generator=g) < 0.5
    pool = Prompts("pool", 64, 8, 32)
    torch.nn.init.normal_(pool.weight, generator=g)
    query = torch.randn(512, 32, generator=g)

    def compute():
        return {"itc": itc_loss(zi, zt, scale)[0],
                "hard negatives": hard_negative_probs(zt, zi, scale, valid),
                "mlm": mlm_loss(logits, labels)[0], "itm": itm_loss(pair_logits, matched)[0],
                "pool selection": pool(query)[1]}
    reference = compute()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute()
    for name, ref in reference.items():
        assert got[name].dtype == ref.dtype and torch.equal(got[name], ref), name
    assert reference["itc"].dtype == torch.float32
    # the test can fail: bf16 scores would select other pool rows for some of these queries
    bf16 = (query.bfloat16() @ pool.weight.detach().bfloat16().t()).topk(8).indices
    assert not torch.equal(bf16, reference["pool selection"])


def test_logit_scale_is_clamped_after_the_step_not_in_the_forward_pass():
    """A clamp in the forward pass zeroes the gradient past log(100), so the
    scale could never come back."""
    cfg = build(TrainConfig, {**PRESETS["tiny"], "objectives": "itc", "vocab_size": 100})
    model = PTUnifier(cfg.model)
    optim.freeze_unreached(model, pretraining_step_loss(model, fake_batch(), cfg)[0])
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100) + 0.5)  # where AdamW can push it
    assert model.itc_scale().item() == pytest.approx(100 * math.exp(0.5))
    loss, _, _ = pretraining_step_loss(model, fake_batch(), cfg)
    loss.backward()
    assert model.logit_scale.grad.abs() > 0
    # the clamp alone moves it
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert optim.optimizer_step(model, opt, sched, loss, 1.0, distributed.Dist()) is not None
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    fixed = PTUnifier(build(TrainConfig, {**PRESETS["tiny"], "itc_temperature": 0.001,
                                          "learn_temperature": False}).model)
    # a fixed temperature below 0.01 is bounded as before
    assert fixed.itc_scale().item() == pytest.approx(100)


# ---- lean batches: uint8 pixels through the step, ITM exchanging uint8 rows --------------------
def _lean_case(hard=False):
    """A tiny pre-training model and a global batch of 8 as uint8 pixels [8, 1, 32, 32] with
    duplicate files and texts across the halves, plus the same images as the float [8, 3, 32,
    32] the loader used to yield."""
    cfg = build(TrainConfig, {**PRESETS["tiny"], "vocab_size": 100, "itm_hard_negatives": hard})
    torch.manual_seed(0)
    model = PTUnifier(cfg.model)
    ids, mask = text_batch(B=8, T=12, V=100, seed=3)
    ids[6], mask[6] = ids[1], mask[1]
    pixels = torch.randint(0, 256, (8, 1, 32, 32),
                           generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    floats = normalize(pixels, pixel_table())  # the old format: the float images
    batch = {"input_ids": ids, "attention_mask": mask, "index": torch.arange(8),
             "image_id": torch.tensor([0, 1, 2, 2, 3, 4, 5, 1])}
    return cfg, model, batch, pixels, floats


def _step(model, cfg, batch):
    """A full pre-training micro-step's loss and gradients (the model's grads are cleared first)."""
    model.zero_grad(set_to_none=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # each rank swaps in two images of the other
    loss, stats, _ = pretraining_loss(model, batch, draws_for(batch, cfg, 0, 5, rank, world), cfg)
    loss.backward()
    return loss.detach(), {n: p.grad.clone()
                           for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("hard", [False, True])
def test_step_on_uint8_pixels_equals_the_float_images_bit_for_bit(hard):
    cfg, model, batch, pixels, floats = _lean_case(hard)
    loss, grads = _step(model, cfg, {**batch, "image": pixels})
    ref_loss, ref_grads = _step(model, cfg, {**batch, "image": floats})
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert torch.equal(g, ref_grads[n]), n


def _lean_worker(rank, world, store, out, hard):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # (collective, dtype, input shape, output shape) of every collective that is not autograd's
    sent = []
    for name in ("all_gather_single", "all_to_all_single"):
        def spy(output, input, *args, _real=getattr(dist, name), _name=name, **kwargs):
            sent.append((_name, input.dtype, tuple(input.shape), tuple(output.shape)))
            return _real(output, input, *args, **kwargs)
        setattr(dist, name, spy)
    cfg, model, batch, pixels, floats = _lean_case(hard)
    local = {k: v[4 * rank:4 * rank + 4] for k, v in {**batch, "pixels": pixels,
                                                      "floats": floats}.items()}
    results = {"pixels": _step(model, cfg, {**local, "image": local.pop("pixels")})}
    results["sent"] = list(sent)
    results["floats"] = _step(model, cfg, {**local, "image": local.pop("floats")})
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("hard", [False, True])
def test_itm_exchanges_only_the_uint8_rows_needed_and_two_processes_equal_one(tmp_path, hard):
    """2 gloo processes with 4 uint8 images each. With random negatives ITM's image exchange is one
    all_to_all of exactly the uint8 rows a rank swaps in from the other (itm_plan's choice, as 1
    process makes it); with hard negatives, chosen on the device, one all-gather of every uint8
    image. No float pixels are exchanged, the step equals the float images' bit for bit, and the 2
    ranks' mean loss and gradient equal 1 process with all 8 (what DDP averages)."""
    import torch.multiprocessing as mp
    out = str(tmp_path / "res")
    mp.spawn(_lean_worker, args=(2, str(tmp_path / "store"), out, hard), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    cfg, model, batch, pixels, floats = _lean_case(hard)
    single_loss, single_grads = _step(model, cfg, {**batch, "image": pixels})
    # _step's draws, made by 1 process
    plan = itm_plan(dict(batch), cfg, torch.Generator().manual_seed(5))
    if not hard:  # 1 process: itm_source = the global row whose image each pair is shown
        needs = [int((plan["itm_source"][4 * r:4 * r + 4] // 4 != r).sum()) for r in range(2)]
        assert needs == [2, 2]  # one row is needed twice: it is sent twice
    for r, result in enumerate(ranks):
        images = [x for x in result["sent"] if len(x[2]) == 4]  # the 4-d exchanges: images
        if hard:
            assert images == [("all_gather_single", torch.uint8, (4, 1, 32, 32), (8, 1, 32, 32))]
        else:
            assert images == [("all_to_all_single", torch.uint8, (needs[1 - r], 1, 32, 32),
                               (needs[r], 1, 32, 32))]
        (loss, grads), (float_loss, float_grads) = result["pixels"], result["floats"]
        assert torch.equal(loss, float_loss) and all(torch.equal(g, float_grads[n])
                                                     for n, g in grads.items())
    (loss0, grads0), (loss1, grads1) = ranks[0]["pixels"], ranks[1]["pixels"]
    torch.testing.assert_close((loss0 + loss1) / 2, single_loss, atol=1e-6, rtol=1e-5)
    for n, g in single_grads.items():
        torch.testing.assert_close((grads0[n] + grads1[n]) / 2, g, atol=1e-5, rtol=1e-4,
                                   msg=f"2 processes differ from 1 in the gradient of {n}")
