"""The generation decoder: initialisation from the backbone, weight tying, causality, encoder
padding, the loss, and greedy / beam-search decoding (hand-built next-token tables for exact
expectations, a trained tiny model end to end); generated text scored against the records' own
references."""

import math

import pytest
import torch
import torch.nn as nn

from ptunifier_min.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_ids
from ptunifier_min import generation, nlg, tasks
from ptunifier_min.config import ModelConfig
from ptunifier_min.generation import (TextDecoder, beam_search, encoder_memory,
                                      generation_loss, greedy)
from ptunifier_min.model import PTUnifier

PAD, UNK, CLS, SEP, MASK = range(5)
A, B_, C, D_ = 5, 6, 7, 8  # ordinary tokens of the hand-built tables


def backbone(seed=0, dropout=0.0, **over):
    """A tiny backbone whose weights look pre-trained: every tensor nudged off its init (norms no
    longer all ones), so that 'copied from the backbone' cannot pass by coincidence."""
    torch.manual_seed(seed)
    model = PTUnifier(ModelConfig(image_size=32, patch_size=8, max_text_len=24, dim=32, depth=2,
                                  heads=2, pool_size=8, k_v=4, k_l=3, itc_dim=16, vocab_size=50,
                                  dropout=dropout, **over))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def memory_batch(B=3, S=9, D=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, S, D, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 6:] = False
    mask[2, 8:] = False
    return memory, mask


class TableDecoder(nn.Module):
    """A stand-in decoder: next-token log-probs from a hand-written table indexed by the last token,
    plus a per-example bias read from memory[:, 0, :V]. Exact arithmetic, so beam-search
    expectations can be computed by hand."""

    def __init__(self, rows, V=10, max_len=64):
        super().__init__()
        table = torch.full((V, V), 1e-6)
        for prev, nxt in rows.items():
            for tok, p in nxt.items():
                table[prev, tok] = p
        # [V, V] next-token log-probs given the last token
        self.register_buffer("logp", table.log().log_softmax(-1))
        self.max_len = max_len

    def forward(self, ids, memory, memory_mask=None):
        return self.logp[ids] + memory[:, :1, :self.logp.shape[0]]  # [B, T, V]

    # the cached-decoding interface: the "cache" is each row's bias,
    # which only depends on the memory
    def start_cache(self, memory, beams=1):
        return TableCache(memory[:, 0, :self.logp.shape[0]].repeat_interleave(beams, 0))

    def step(self, ids, cache, memory_mask=None):
        return self.logp[ids] + cache.bias  # [N, V]


class TableCache:
    def __init__(self, bias):
        self.bias = bias  # [N, V]

    def reorder(self, rows):
        self.bias = self.bias[rows]


def no_memory(B=1, V=10):
    return torch.zeros(B, 1, V)


# ---- initialisation and tying --------------------------------------------------------------------
def test_decoder_starts_from_backbone_blocks_with_fresh_cross_attention():
    bb = backbone()
    dec = TextDecoder(bb, max_len=32)
    assert len(dec.blocks) == 2
    for blk, dblk in zip(bb.blocks, dec.blocks):
        # norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2
        for name, value in blk.state_dict().items():
            copied = dblk.state_dict()[name]
            assert torch.equal(copied, value), name
            assert copied.data_ptr() != value.data_ptr(), f"{name} is shared, not copied"
        D = bb.cfg.dim
        q = dblk.cross_attn.q.weight
        assert not torch.allclose(q, dblk.attn.qkv.weight[:D], atol=1e-3)
        assert 0.015 < q.std() < 0.025 and 0.015 < dblk.cross_attn.kv.weight.std() < 0.025
        assert torch.equal(dblk.norm_cross.weight, torch.ones(D))
    assert (torch.equal(dec.norm.weight, bb.norm.weight)
            and dec.norm.weight.data_ptr() != bb.norm.weight.data_ptr())
    # positions: the backbone's 24 rows, then fresh ones
    assert torch.equal(dec.position_embeddings.weight[:24], bb.position_embeddings.weight)
    assert 0.015 < dec.position_embeddings.weight[24:].std() < 0.025
    # the decoder embeds text exactly as the encoder embeds its textual part
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dec.embed(ids),
                               bb.embed_text(ids) + bb.token_type_embeddings.weight[1])
    # copies, not views: changing the encoder later leaves the decoder alone
    before = dec.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        bb.blocks[0].attn.qkv.weight.add_(1.0)
    assert torch.equal(dec.blocks[0].attn.qkv.weight, before)


@pytest.mark.parametrize("norm_pre", [False, True])
def test_decoder_blocks_see_a_text_as_the_backbones_blocks_do(norm_pre):
    """With a CLIP start (norm_pre: CLIP's ln_pre before the blocks) as without: the copied blocks
    first receive what the backbone's first block receives for the textual part of a text-only
    pass."""
    bb = backbone(norm_pre=norm_pre, prompt_mode="none")
    ids = torch.randint(5, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = bb.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        enc = bb(input_ids=ids)
    hook.remove()
    torch.testing.assert_close(TextDecoder(bb, max_len=32).embed(ids), seen[0][:, enc.n_visual:])


def test_depth_option():
    bb = backbone()
    dec = TextDecoder(bb, depth=1)
    assert len(dec.blocks) == 1
    assert torch.equal(dec.blocks[0].mlp.fc1.weight, bb.blocks[0].mlp.fc1.weight)
    with pytest.raises(ValueError):
        TextDecoder(bb, depth=3)


def test_embeddings_and_output_are_tied_to_the_backbone():
    bb = backbone()
    dec = TextDecoder(bb, max_len=32)
    # the decoder's own state holds no copy of the tied tensors
    assert {k.split(".")[0] for k in dec.state_dict()} == {"blocks", "position_embeddings", "norm"}
    memory, mask = memory_batch()
    ids = torch.tensor([[CLS, 10, 11, 12, SEP]] * 3)
    # same storage: editing the backbone's word embedding edits what the decoder reads
    a = dec(ids, memory, mask)
    with torch.no_grad():
        bb.word_embeddings.weight[11] += 1.0
    assert not torch.allclose(a, dec(ids, memory, mask))

    # one optimisation step through the decoder alone trains the backbone's embeddings and MLM head
    model = nn.ModuleDict(dict(backbone=bb, decoder=dec))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    emb, dense = bb.word_embeddings.weight.clone(), bb.mlm_head.dense.weight.clone()
    loss = generation_loss(dec(ids[:, :-1], memory, mask), ids[:, 1:], PAD)
    loss.backward()
    g = bb.word_embeddings.weight.grad
    assert g[10].abs().sum() > 0  # input side
    # 40 is never an input: its gradient comes from the tied output projection
    assert g[40].abs().sum() > 0
    for name, p in dec.named_parameters():  # every decoder parameter takes part
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    assert (not torch.equal(bb.word_embeddings.weight, emb)
            and not torch.equal(bb.mlm_head.dense.weight, dense))


# ---- attention masks -----------------------------------------------------------------------------
def test_causal_later_tokens_do_not_change_earlier_logits():
    dec = TextDecoder(backbone(), max_len=32)
    memory, mask = memory_batch()
    ids = torch.randint(5, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    a = dec(ids, memory, mask)
    ids2 = ids.clone()
    ids2[:, 6] = (ids[:, 6] + 1 - 5) % 45 + 5
    b = dec(ids2, memory, mask)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("manual", [False, True])
def test_cross_attention_ignores_encoder_padding(manual):
    dec = TextDecoder(backbone(), max_len=32)
    memory, mask = memory_batch()
    ids = torch.tensor([[CLS, 10, 11, 12, 13]] * 3)
    a = dec(ids, memory, mask, manual_attention=manual)
    padded = memory.clone()
    padded[0, 6:] = 100 * torch.randn(3, 32)
    torch.testing.assert_close(dec(ids, padded, mask, manual_attention=manual), a)
    real = memory.clone()
    real[0, 2] += 1.0
    b = dec(ids, real, mask, manual_attention=manual)
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1:], b[1:])
    # and the mask is what does it: unmasked, the padded change is seen
    assert not torch.allclose(dec(ids, padded, None, manual_attention=manual)[0],
                              dec(ids, memory, None)[0])


def test_sdpa_equals_manual_attention():
    dec = TextDecoder(backbone(), max_len=32)
    memory, mask = memory_batch()
    ids = torch.randint(5, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dec(ids, memory, mask),
                               dec(ids, memory, mask, manual_attention=True))


def test_encoder_padding_is_invisible_end_to_end():
    """Findings -> memory -> decoder: what sits under the findings' padding cannot
    reach the summary's logits."""
    bb = backbone()
    dec = TextDecoder(bb, max_len=32)
    findings = torch.tensor([[CLS, 10, 11, SEP, PAD, PAD], [CLS, 12, 13, 14, 15, SEP]])
    fmask = findings != PAD
    memory, mmask = encoder_memory(bb, input_ids=findings, attention_mask=fmask)
    n_vis = 1 + bb.cfg.k_v
    assert (mmask.shape == (2, n_vis + 6) and mmask[:, :n_vis].all()
            and torch.equal(mmask[:, n_vis:], fmask))
    other = findings.clone()
    other[0, 4:] = 33
    memory2, _ = encoder_memory(bb, input_ids=other, attention_mask=fmask)
    # the padded states did change
    assert not torch.allclose(memory[0, n_vis + 4:], memory2[0, n_vis + 4:])
    ids = torch.tensor([[CLS, 20, 21, 22]] * 2)
    torch.testing.assert_close(dec(ids, memory, mmask), dec(ids, memory2, mmask))
    # the collate's padding flag (known on the host) gives the same
    # memory and mask as reading the mask
    given, given_mask = encoder_memory(bb, input_ids=findings, attention_mask=fmask, padded=True)
    assert torch.equal(given, memory) and torch.equal(given_mask, mmask)
    full = torch.ones_like(fmask)
    assert encoder_memory(bb, input_ids=findings, attention_mask=full, padded=False)[1] is None
    # image-only memory has no padding
    memory, mmask = encoder_memory(bb, image=torch.randn(2, 3, 32, 32))
    assert mmask is None and memory.shape == (2, 17 + bb.cfg.k_l + 2, 32)


# ---- loss ----------------------------------------------------------------------------------------
def test_generation_loss_matches_hand_computation():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 0.5], [1.0, -1.0, 0.0, 3.0], [5.0, 5.0, 5.0, 5.0]],
                           [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]])
    targets = torch.tensor([[2, 3, 0], [1, 0, 0]])  # pad_id = 0: three real targets

    def nll(row, t):
        return math.log(sum(math.exp(v) for v in row)) - row[t]
    rows = logits.tolist()
    hand = (nll(rows[0][0], 2) + nll(rows[0][1], 3) + nll(rows[1][0], 1)) / 3
    loss = generation_loss(logits, targets, pad_id=0)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - hand) < 1e-6
    # logits at padded targets do not matter; the others do
    other = logits.clone()
    other[1, 1:] = torch.randn(2, 4)
    assert abs(generation_loss(other, targets, 0).item() - hand) < 1e-6
    other[0, 1, 3] += 1.0
    assert abs(generation_loss(other, targets, 0).item() - hand) > 1e-3
    assert abs(generation_loss(logits.bfloat16(), targets, 0).item() - hand) < 0.02


# ---- decoding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_finds_what_greedy_misses(use_cache):
    # greedy takes A (0.6), then [SEP] (0.34): p = 0.204. Beam 2 also keeps B
    # (0.4), then [SEP] (0.95): p = 0.38.
    dec = TableDecoder({CLS: {A: 0.6, B_: 0.4}, A: {SEP: 0.34, C: 0.33, D_: 0.33}, B_: {SEP: 0.95},
                        C: {SEP: 1.0}, D_: {SEP: 1.0}})
    args = (no_memory(), None, CLS, SEP, PAD)
    assert greedy(dec, *args, use_cache=use_cache) == [[A]]
    assert beam_search(dec, *args, beam_size=1, use_cache=use_cache) == [[A]]
    for lp in (0.0, 1.0):
        assert (beam_search(dec, *args, beam_size=2, length_penalty=lp, use_cache=use_cache)
                == [[B_]])


@pytest.mark.parametrize("use_cache", [True, False])
def test_length_penalty_convention(use_cache):
    # [] = [SEP] at once: p = 0.55, len 1.  [A] = A then [SEP]: p = 0.45 * 0.9 = 0.405, len 2.
    # Raw sums (penalty 0) prefer [], per-token means (penalty 1) prefer [A].
    dec = TableDecoder({CLS: {SEP: 0.55, A: 0.45}, A: {SEP: 0.9, B_: 0.1}})
    lp = dec.logp
    short, long_ = lp[CLS, SEP].item(), (lp[CLS, A] + lp[A, SEP]).item()
    for penalty in (0.0, 0.5, 1.0, 2.0):
        expect = [] if short / 1 ** penalty > long_ / 2 ** penalty else [A]
        kw = dict(beam_size=2, length_penalty=penalty, use_cache=use_cache)
        assert beam_search(dec, no_memory(), None, CLS, SEP, PAD, **kw) == [expect]
    kw = dict(beam_size=2, use_cache=use_cache)
    assert beam_search(dec, no_memory(), None, CLS, SEP, PAD, length_penalty=0.0, **kw) == [[]]
    assert beam_search(dec, no_memory(), None, CLS, SEP, PAD, length_penalty=1.0, **kw) == [[A]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_search_rows_are_independent(use_cache):
    """Batched over B x beam: each example's result equals decoding it alone
    (catches row bookkeeping slips)."""
    g = torch.Generator().manual_seed(0)
    dec = TableDecoder({})
    dec.logp = torch.randn(10, 10, generator=g).log_softmax(-1)
    memory = 2 * torch.randn(5, 1, 10, generator=g)
    kw = dict(beam_size=3, max_len=6, use_cache=use_cache)
    together = beam_search(dec, memory, None, CLS, SEP, PAD, **kw)
    alone = [beam_search(dec, memory[i:i + 1], None, CLS, SEP, PAD, **kw)[0] for i in range(5)]
    assert together == alone
    assert len({tuple(h) for h in together}) > 1
    assert all(len(h) <= 6 and CLS not in h and SEP not in h and PAD not in h for h in together)


def test_cached_step_logits_equal_the_forward_pass():
    """Step by step through the cache, the logits at every position equal those of the
    whole-prefix forward pass, with encoder padding, also after rows are re-selected
    (reordered) as beam search does."""
    dec = TextDecoder(backbone(), max_len=16).eval()
    memory, mask = memory_batch()  # rows 0 and 2 have encoder padding
    ids = torch.randint(5, 50, (6, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = CLS
    rows_mask = mask.repeat_interleave(2, 0)  # 2 rows per example, as beam search lays them out
    with torch.no_grad():
        cache = dec.start_cache(memory, beams=2)
        full = dec(ids, memory.repeat_interleave(2, 0), rows_mask)  # [6, 10, V]
        for t in range(6):
            torch.testing.assert_close(dec.step(ids[:, t], cache, rows_mask), full[:, t])
        assert len(cache) == 6
        # swap the two rows of example 0, duplicate row 2 of example 1:
        # the cache must follow its rows
        rows = torch.tensor([1, 0, 2, 2, 5, 4])
        cache.reorder(rows)
        ids = ids[rows]
        full = dec(ids, memory.repeat_interleave(2, 0), rows_mask)
        for t in range(6, 10):
            torch.testing.assert_close(dec.step(ids[:, t], cache, rows_mask), full[:, t])
        # what sits under the encoder padding does not reach a cached step either
        padded = memory.clone()
        padded[0, 6:] = 100.0
        other = dec.start_cache(padded, beams=2)
        first = dec.start_cache(memory, beams=2)
        torch.testing.assert_close(dec.step(ids[:, 0], other, rows_mask),
                                   dec.step(ids[:, 0], first, rows_mask))


@pytest.mark.parametrize("manual", [False, True])
def test_cached_decoding_gives_the_same_tokens(manual):
    """Greedy and beam search with the cache emit exactly the tokens of the uncached search
    (whole prefix recomputed at every step), for several beam sizes and length penalties, with
    padding in the memory mask."""
    dec = TextDecoder(backbone(seed=3), max_len=16)
    with torch.no_grad():
        # sharper next-token distributions than the near-uniform random ones, which a memory (and
        # its padding) sways: hypotheses of varied lengths, some ending in [SEP], so that beam
        # size, penalty and mask all matter
        dec.backbone.word_embeddings.weight.mul_(8.0)
        for blk in dec.blocks:
            for lin in (blk.cross_attn.q, blk.cross_attn.kv, blk.cross_attn.proj):
                lin.weight.mul_(10.0)
    memory, mask = memory_batch(B=4)
    mask[3, 2:] = False
    step = dec.step
    if manual:  # the cached path with the textbook attention, against the uncached SDPA path
        dec.step = lambda ids, cache, mmask: step(ids, cache, mmask, manual_attention=True)
    args = (memory, mask, CLS, SEP, PAD)
    cached = greedy(dec, *args, max_len=14)
    assert cached == greedy(dec, *args, max_len=14, use_cache=False)
    outs = set()
    for K in (2, 3, 5):  # beam size 1 is greedy, compared above
        for lp in (0.0, 1.0, 2.0):
            kw = dict(beam_size=K, max_len=14, length_penalty=lp)
            cached = beam_search(dec, *args, **kw)
            assert cached == beam_search(dec, *args, **kw, use_cache=False), (K, lp)
            outs.add(tuple(map(tuple, cached)))
    lengths = {len(h) for hyps in outs for h in hyps}
    # the settings disagree: the comparison has teeth
    assert len(outs) > 3 and len(lengths) > 3, (outs, lengths)
    assert beam_search(dec, memory, None, CLS, SEP, PAD, **kw) != cached  # and so does the mask


def test_beam_one_equals_greedy_and_runs_repeat():
    dec = TextDecoder(backbone(dropout=0.5), max_len=16)
    memory, mask = memory_batch()
    # dropout on: decoding must switch it off (deterministic) and restore the mode after
    dec.train()
    g = greedy(dec, memory, mask, CLS, SEP, PAD, max_len=12)
    assert dec.training
    assert greedy(dec, memory, mask, CLS, SEP, PAD, max_len=12) == g
    assert beam_search(dec, memory, mask, CLS, SEP, PAD, beam_size=1, max_len=12) == g
    a = beam_search(dec, memory, mask, CLS, SEP, PAD, beam_size=3, max_len=12)
    assert beam_search(dec, memory, mask, CLS, SEP, PAD, beam_size=3, max_len=12) == a
    with pytest.raises(ValueError):
        greedy(dec, memory, mask, CLS, SEP, PAD, max_len=17)


def test_trained_decoder_reproduces_its_target():
    """ITG in miniature: images -> backbone -> decoder, trained to always write one fixed report."""
    bb = backbone()
    dec = TextDecoder(bb, max_len=16)
    model = nn.ModuleDict(dict(backbone=bb, decoder=dec)).train()
    target = [11, 22, 33, 44, 15]
    ids = torch.tensor([[CLS, *target, SEP, PAD]] * 4)  # a padded tail, as a batch would have
    g = torch.Generator().manual_seed(0)

    def decode(fn, **kw):
        memory, mmask = encoder_memory(bb.eval(), image=torch.randn(3, 3, 32, 32, generator=g))
        return fn(dec, memory, mmask, CLS, SEP, PAD, max_len=10, **kw)
    assert decode(beam_search, beam_size=3) != [target] * 3
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(40):
        memory, mmask = encoder_memory(bb.train(), image=torch.randn(4, 3, 32, 32, generator=g))
        loss = generation_loss(dec(ids[:, :-1], memory, mmask), ids[:, 1:], PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    with torch.no_grad():
        assert decode(beam_search, beam_size=3) == [target] * 3
        assert decode(greedy) == [target] * 3


# references with what a tokenizer cannot write back: a decimal, a hyphenated word, a word its
# vocabulary lacks ("pneumothorax" in the WordPiece one below)
REFERENCES = ["The mass is 2.5 cm.", "X-ray shows no effusion.",
              "Pneumothorax on the x-ray, 2.5 cm."]


@pytest.mark.parametrize("kind", ["wordpiece", "byte_level_bpe"])
def test_generation_is_scored_against_the_raw_reference_text(kind, byte_level_bpe, tmp_path,
                                                              monkeypatch):
    if kind == "wordpiece":
        words = ["the", "mass", "is", "2", ".", "5", "cm", "x", "-", "ray", "shows", "no",
                 "effusion", "on", ","]
        (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + words) + "\n")
        tok = load_tokenizer(str(tmp_path / "vocab.txt"))
    else:
        tok = load_tokenizer(str(byte_level_bpe / "vocab.json"))
    sp = special_ids(tok)
    records = [{"id": f"r{i}", "text_a": "findings", "target": t} for i, t in enumerate(REFERENCES)]
    # a model that writes each reference as well as its tokenizer can
    generated = [tok.encode(t, add_special_tokens=False).ids for t in REFERENCES]
    rows = iter(generated)
    monkeypatch.setattr(generation, "beam_search",
                        lambda decoder, memory, *args: [next(rows) for _ in memory])
    cfg = ModelConfig(image_size=32, patch_size=8, max_text_len=24, dim=32, depth=1, heads=2,
                      pool_size=8, k_v=4, k_l=3, itc_dim=16, vocab_size=tok.get_vocab_size(),
                      cls_id=sp["cls"], sep_id=sp["sep"])
    task = tasks.TASKS["mimic_sum"]
    model = tasks.TaskModel(PTUnifier(cfg), task, max_gen_len=32)
    m = tasks.evaluate(model, task, records, tok, image_size=32, max_text_len=24, device="cpu",
                       max_gen_len=32, progress=False)
    hyps = {r["id"]: tok.decode(ids) for r, ids in zip(records, generated)}
    raw = {r["id"]: [r["target"]] for r in records}
    assert m == nlg.nlg_metrics(raw, hyps)
    perfect = nlg.nlg_metrics(raw, {k: v[0] for k, v in raw.items()})
    if kind == "byte_level_bpe":  # lossless: the generation is the reference, and scores perfectly
        assert list(hyps.values()) == REFERENCES and m == perfect
        assert m["BLEU_4"] == pytest.approx(1.0) and m["CIDEr"] > 0
    else:  # "2. 5 cm", "x - ray" and the [UNK] word it dropped differ from what the records say
        assert m["BLEU_4"] < perfect["BLEU_4"] and m["CIDEr"] < perfect["CIDEr"]
