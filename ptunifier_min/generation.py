"""The text decoder for the generation tasks: text summarisation (findings -> impression, TS) and
image-to-text generation (image -> findings, ITG), with greedy and beam-search decoding.

    backbone = PTUnifier(cfg)                                # pre-trained
    decoder = TextDecoder(backbone, max_len=64)              # blocks start as backbone block copies
    model = nn.ModuleDict(dict(backbone=backbone, decoder=decoder))  # optimise this: ties held once
    memory, memory_mask = encoder_memory(backbone, input_ids=findings,
                                         attention_mask=fmask)  # TS (ITG: image=img)
    logits = decoder(target[:, :-1], memory, memory_mask)    # target: [CLS] w1 .. wn [SEP] [PAD] ..
    loss = generation_loss(logits, target[:, 1:], pad_id=0)  # predict each next token
    hyps = beam_search(decoder, memory, memory_mask, bos_id=2, eos_id=3, pad_id=0, beam_size=4)

Paper section 5.3: the encoder's whole output sequence (visual part and textual part) is the memory
of a Transformer decoder whose weights, except its cross-attention, are initialised from the
pre-trained backbone. The decoder's word embeddings (with the norms the backbone applies to them:
text_norm, norm_pre) and output projection are the backbone's own word embeddings and MLM head
(shared, not copied), so the decoder holds a reference to the backbone that is deliberately *not* a
registered submodule: the decoder's parameters() and state_dict() hold only its own tensors, and
whoever owns both (the ModuleDict above) holds the backbone once. Moving the decoder alone (.to(),
.half()) therefore does not move the backbone; move the owner.

Decoding keeps a key/value cache (KVCache): each step feeds only the newest token, appends its
self-attention keys and values to those of the positions before it, reads the encoder memory's
cross-attention keys and values computed once, and projects only that one position onto the
vocabulary. Without it every step recomputes the whole prefix, the memory's keys/values and the
vocabulary logits of every position (cost ~ length^2 x vocab). `use_cache=False` decodes that plain
way, through the training forward pass; a test checks that both give the same tokens. (The two sum
in different orders, so their logits differ in the last bits: only candidates whose scores tie to
within float rounding could swap.)
"""

import copy
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import PTUnifier, attend
from .tokenizer import special_ids


class CrossAttention(nn.Module):
    """Multi-head attention from the decoder (queries) to the encoder output (keys and values, one
    fused projection)."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def memory_kv(self, memory):
        """Keys and values of the encoder output [B, S, D]: 2 x [B, H, S, Dh]."""
        B, S, D = memory.shape
        return self.kv(memory).view(B, S, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x, memory, memory_mask=None, manual=False, memory_kv=None):
        # memory_mask: [B, S] bool, True = real encoder position. The authors' decoder attended to
        # the encoder's padding too; we mask it, so a summary cannot depend on how much padding the
        # findings were given.
        # memory_kv: memory_kv(memory) computed beforehand (cached decoding computes it once, not at
        # every step)
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # [B, H, T, Dh]
        k, v = self.memory_kv(memory) if memory_kv is None else memory_kv  # 2 x [B, H, S, Dh]
        mask = None if memory_mask is None else memory_mask[:, None, None, :]  # [B, 1, 1, S]
        p = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, p, manual).transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return F.dropout(self.proj(y), p, self.training)


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the encoder output, MLP.

    Built from a backbone Block: norm1, attn, norm2 and mlp are deep copies of it (own tensors with
    the same values, so the decoder can drift from the encoder during fine-tuning); norm_cross and
    cross_attn are new.
    """

    def __init__(self, block, heads, dropout=0.0):
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        self.norm1 = copy.deepcopy(block.norm1)
        self.attn = copy.deepcopy(block.attn)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads, dropout)
        self.norm2 = copy.deepcopy(block.norm2)
        self.mlp = copy.deepcopy(block.mlp)

    def forward(self, x, memory, memory_mask=None, manual=False):
        # No key mask on self-attention: targets are right-padded and causal attention already keeps
        # every real position away from the padding after it; what the padded positions themselves
        # compute is ignored by the loss.
        x = x + self.attn(self.norm1(x), manual=manual, causal=True)
        x = x + self.cross_attn(self.norm_cross(x), memory, memory_mask, manual)
        return x + self.mlp(self.norm2(x))

    def step(self, x, self_kv, memory_kv, memory_mask=None, manual=False):
        """forward() for one new position x [N, 1, D] of each row, given the self-attention
        keys/values (k, v) of the positions before it (None at the first) and the memory's
        cross-attention keys/values. Returns the block's output [N, 1, D] and (k, v) grown by this
        position, each [N, H, t + 1, Dh]. Inference only: no dropout."""
        N, _, D = x.shape
        attn = self.attn
        q, k, v = (attn.qkv(self.norm1(x)).view(N, 1, 3, attn.heads, D // attn.heads)
                   .permute(2, 0, 3, 1, 4))
        if self_kv is not None:
            k, v = torch.cat([self_kv[0], k], 2), torch.cat([self_kv[1], v], 2)  # [N, H, t + 1, Dh]
        # no causal mask: the one query is the newest position, which may attend to every cached one
        y = attend(q, k, v, None, 0.0, manual).transpose(1, 2).reshape(N, 1, D)  # [N, 1, D]
        x = x + attn.proj(y)
        x = x + self.cross_attn(self.norm_cross(x), None, memory_mask, manual, memory_kv)
        return x + self.mlp(self.norm2(x)), (k, v)


class KVCache:
    """What cached decoding keeps between steps, per decoder layer: the cross-attention keys/values
    of the encoder memory, computed once, and the self-attention keys/values of the positions
    decoded so far."""

    def __init__(self, memory_kv):
        self.memory_kv = memory_kv  # per layer: (k, v), each [N, H, S, Dh]
        # per layer: (k, v), each [N, H, t, Dh]; None before the first step
        self.self_kv = [None] * len(memory_kv)

    def __len__(self):
        # t: positions decoded so far
        return 0 if self.self_kv[0] is None else self.self_kv[0][0].shape[2]

    def reorder(self, rows):
        """Row i continues old row rows[i] (beam search re-selecting its beams). The memory's
        keys/values stay: a new beam's parent is always a beam of the same example, so every row
        keeps the same memory."""
        self.self_kv = [(k[rows], v[rows]) for k, v in self.self_kv]


class TextDecoder(nn.Module):
    """Transformer decoder initialised from a PTUnifier backbone, its embeddings and output head
    tied to it."""

    def __init__(self, backbone: PTUnifier, max_len: int = 128, depth: int | None = None):
        super().__init__()
        cfg = backbone.cfg
        depth = cfg.depth if depth is None else depth
        if not 1 <= depth <= cfg.depth:
            raise ValueError(f"decoder depth must be in 1..{cfg.depth} "
                             f"(it copies backbone blocks), got {depth}")
        # Kept out of self._modules (see the module docstring); the tied word embeddings and MLM
        # head are read via it.
        object.__setattr__(self, "backbone", backbone)
        self.max_len = max_len
        D = cfg.dim
        # Own positions: a generated text may be longer than the encoder's max_text_len. The rows
        # the backbone has are copied, so the decoder starts from the positions that the copied
        # blocks were trained with.
        self.position_embeddings = nn.Embedding(max_len, D)
        self.blocks = nn.ModuleList(DecoderBlock(backbone.blocks[i], cfg.heads, cfg.dropout)
                                    for i in range(depth))
        self.norm = copy.deepcopy(backbone.norm)
        self.init_weights()

    def init_weights(self):
        """Copied: position rows the backbone has. Fresh: other position rows and cross-attention
        N(0, 0.02) with zero biases (the backbone's init), norm_cross at unit scale. Blocks'
        self-attention, MLP and norms were copied."""
        with torch.no_grad():
            nn.init.trunc_normal_(self.position_embeddings.weight, std=0.02)
            n = min(self.max_len, self.backbone.position_embeddings.num_embeddings)
            self.position_embeddings.weight[:n] = self.backbone.position_embeddings.weight[:n]
        for blk in self.blocks:
            for lin in (blk.cross_attn.q, blk.cross_attn.kv, blk.cross_attn.proj):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            nn.init.ones_(blk.norm_cross.weight)
            nn.init.zeros_(blk.norm_cross.bias)

    def forward(self, input_ids, memory, memory_mask=None, manual_attention=False):
        # input_ids [B, T] starting with bos; memory [B, S, D] encoder output;
        # memory_mask [B, S] bool (False = padding) or None when nothing is padded. Returns
        # next-token logits [B, T, V].
        x = self.embed(input_ids)
        for blk in self.blocks:
            x = blk(x, memory, memory_mask, manual_attention)
        # [B, T, V]; output = the MLM head, tied to word_embeddings
        return self.backbone.mlm_logits(self.norm(x))

    def start_cache(self, memory, beams=1):
        """An empty KVCache for decoding memory [B, S, D]: each layer's cross-attention keys/values
        are computed on the B memories once, then repeated for `beams` rows per example
        (row b * beams + k), as beam search lays them out.
        """
        kv = [blk.cross_attn.memory_kv(memory) for blk in self.blocks]
        # 2 x [B * beams, H, S, Dh]
        return KVCache([[t.repeat_interleave(beams, 0) for t in layer] for layer in kv])

    def step(self, input_ids, cache, memory_mask=None, manual_attention=False):
        """Cached decoding: forward() of the newest token input_ids [N] of each row, the cache
        holding every earlier one. Returns the next-token logits [N, V] (the vocabulary projection
        at this one position only) and grows the cache. memory_mask is per row, [N, S] (or None).
        Inference only: no dropout."""
        x = self.embed(input_ids[:, None], start=len(cache))  # [N, 1, D]
        for i, blk in enumerate(self.blocks):
            x, cache.self_kv[i] = blk.step(x, cache.self_kv[i], cache.memory_kv[i], memory_mask,
                                           manual_attention)
        return self.backbone.mlm_logits(self.norm(x[:, 0]))  # [N, V]

    def embed(self, input_ids, start=0):
        """[B, T] -> [B, T, D]: what the backbone gives its blocks for its textual part (words +
        positions + text type 1, through its norm_pre when it has one, e.g. from CLIP), so the
        copied blocks first see text the way they saw it in pre-training. `start`: position of the
        first token."""
        T = start + input_ids.shape[1]
        if T > self.max_len:
            raise ValueError(f"decoder input has {T} tokens, more than max_len={self.max_len}")
        backbone = self.backbone
        pos = torch.arange(start, T, device=input_ids.device)
        words = backbone.text_norm(backbone.word_embeddings(input_ids)
                                   + self.position_embeddings(pos))  # as bb.embed_text does
        # norm_pre is per position: the sequence it normalises in the backbone need not be whole
        return backbone.norm_pre(words + backbone.token_type_embeddings.weight[1])


def encoder_memory(backbone, image=None, input_ids=None, attention_mask=None, padded=None):
    """The decoder's memory: the backbone's whole final sequence [B, S, D] and its mask [B, S] (None
    if unpadded).

    ITG passes an image (the text side is then [CLS] + textual prompts + [SEP]); TS passes the
    findings (the visual side is then [IMG_CLS] + visual prompts). Prompts are never padding, so
    only the text's own padding is masked.
    padded: whether the mask marks padding, as the collate knows it; None = read the mask (the host
    waits for the device).
    """
    enc = backbone(image=image, input_ids=input_ids, attention_mask=attention_mask, padded=padded)
    if padded is None and attention_mask is not None:
        padded = not bool(attention_mask.all())  # the host waits for the device here
    if input_ids is None or attention_mask is None or not padded:
        return enc.hidden, None
    visual = attention_mask.new_ones(len(attention_mask), enc.n_visual)
    return enc.hidden, torch.cat([visual, attention_mask], 1)  # [B, Tv + Tl]


def generation_loss(logits, target_ids, pad_id):
    """Mean next-token cross-entropy over the non-padding targets, in fp32.

    logits [B, T, V] = decoder(ids[:, :-1], ...) and target_ids [B, T] = ids[:, 1:]: target t is the
    token that follows input position t (the inputs shifted left by one), [SEP] included so the
    decoder learns to stop.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), ignore_index=pad_id)


def _check_len(decoder, max_len):
    # the last step feeds bos + (max_len - 1) tokens, so max_len decoder positions suffice
    if max_len > decoder.max_len:
        raise ValueError(f"max_len={max_len} exceeds the decoder's {decoder.max_len} positions")


def _next_logprobs(decoder, seqs, memory, memory_mask, cache, bos_id, pad_id):
    """Log-probs [N, V] of the token after seqs [N, t]: from the newest token and the cache (which
    grows by it), or, cache None, by the plain forward pass over the whole prefix (memory and
    memory_mask then hold one row per seq)."""
    if cache is not None:
        logits = decoder.step(seqs[:, -1], cache, memory_mask)
    else:
        logits = decoder(seqs, memory, memory_mask)[:, -1]
    logp = logits.float().log_softmax(-1)  # [N, V]
    # [PAD] and [CLS] never follow in a target, but an under-trained decoder can still give them
    # mass; rule them out
    logp[:, [pad_id, bos_id]] = float("-inf")
    return logp


def _decoding(fn):
    """Run a decoding function in eval mode (dropout off: the output must be deterministic), then
    restore the mode."""
    @functools.wraps(fn)
    def wrapper(decoder, *args, **kwargs):
        was_training = decoder.training
        decoder.eval()
        try:
            return fn(decoder, *args, **kwargs)
        finally:
            decoder.train(was_training)
    return wrapper


@_decoding
@torch.no_grad()
def greedy(decoder, memory, memory_mask, bos_id, eos_id, pad_id, max_len=60, use_cache=True):
    """Take the most likely next token until [SEP] or max_len tokens. Returns token lists without
    bos/eos. use_cache=False recomputes the whole prefix at every step (the same tokens, slower: the
    reference)."""
    _check_len(decoder, max_len)
    B = memory.shape[0]
    cache = decoder.start_cache(memory) if use_cache else None
    seqs = torch.full((B, 1), bos_id, dtype=torch.long, device=memory.device)
    done = torch.zeros(B, dtype=torch.bool, device=memory.device)
    for _ in range(max_len):
        # [B]
        nxt = _next_logprobs(decoder, seqs, memory, memory_mask, cache, bos_id, pad_id).argmax(-1)
        # finished rows feed padding, which only their own later positions see
        nxt = nxt.masked_fill(done, pad_id)
        seqs = torch.cat([seqs, nxt[:, None]], 1)  # [B, t + 1]
        done |= nxt == eos_id
        if bool(done.all()):
            break
    out = []
    for row in seqs[:, 1:].tolist():
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


@_decoding
@torch.no_grad()
def beam_search(decoder, memory, memory_mask, bos_id, eos_id, pad_id, beam_size=4, max_len=60,
                length_penalty=1.0, use_cache=True):
    """Deterministic beam search, batched over B x beam_size rows. Returns the best token list per
    example, no bos/eos.

    Fairseq's scheme: each step ranks the 2K best extensions of the K live beams; an extension by
    [SEP] among the top K finishes a hypothesis, and the K best other extensions stay live (at most
    K extensions are [SEP], so there are always K). An example is done once it has K finished
    hypotheses; at max_len its live beams count as finished too.
    Finished hypotheses are compared by  sum of token log-probs / len ** length_penalty,  where len
    counts the generated tokens including the closing [SEP] (bos excluded); a hypothesis cut at
    max_len has len = max_len.
    length_penalty = 0 compares raw sums (favours short outputs), larger values favour longer ones.
    With beam_size = 1 this is exactly greedy decoding. Like greedy(), it runs the decoder in eval
    mode (the mode is restored after) and never emits [PAD] or [CLS]. use_cache=False recomputes the
    whole prefix at every step (the same tokens, slower: the reference).
    """
    _check_len(decoder, max_len)
    B, K = memory.shape[0], beam_size
    # beam k of example b lives in row b * K + k
    cache = decoder.start_cache(memory, K) if use_cache else None
    memory = memory.repeat_interleave(K, 0)  # [B * K, S, D]
    if memory_mask is not None:
        memory_mask = memory_mask.repeat_interleave(K, 0)  # [B * K, S]
    seqs = torch.full((B * K, 1), bos_id, dtype=torch.long, device=memory.device)
    # all K beams start as the same [CLS]; only beam 0 is live at the first step, else the K beams
    # would be K copies
    scores = torch.full((B, K), float("-inf"), device=memory.device)
    scores[:, 0] = 0.0
    finished = [[] for _ in range(B)]  # (normalised score, tokens)
    offsets = torch.arange(B, device=memory.device)[:, None] * K  # [B, 1]
    for _ in range(max_len):
        # [B * K, V]
        logp = _next_logprobs(decoder, seqs, memory, memory_mask, cache, bos_id, pad_id)
        V = logp.shape[-1]
        # every one-token extension of every beam
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)
        top, idx = cand.topk(2 * K, dim=1)  # [B, 2K], best first
        beam, tok = idx // V, idx % V  # [B, 2K] each
        is_eos = tok == eos_id
        for b, j in (is_eos[:, :K] & top[:, :K].isfinite()).nonzero().tolist():
            # a done example's beams keep running in the batch but add nothing
            if len(finished[b]) < K:
                tokens = seqs[b * K + beam[b, j], 1:].tolist()
                finished[b].append((top[b, j].item() / (len(tokens) + 1) ** length_penalty, tokens))
        # [B, K] best non-[SEP] extensions
        keep = top.masked_fill(is_eos, float("-inf")).topk(K, dim=1).indices
        scores = top.gather(1, keep)  # [B, K]
        rows = (offsets + beam.gather(1, keep)).view(-1)  # [B * K] parent row of each new beam
        seqs = torch.cat([seqs[rows], tok.gather(1, keep).view(-1, 1)], 1)  # [B * K, t + 1]
        if cache is not None:
            cache.reorder(rows)  # each new beam continues its parent's keys/values
        if all(len(f) >= K for f in finished):
            break
    out = []
    for b in range(B):
        hyps = finished[b]
        if len(hyps) < K:  # ran out of length: live beams compete as they are
            for k in range(K):
                if math.isfinite(scores[b, k].item()):
                    tokens = seqs[b * K + k, 1:].tolist()
                    hyps.append((scores[b, k].item() / len(tokens) ** length_penalty, tokens))
        # max() keeps the first of equal scores: deterministic, and earlier-finished (shorter)
        # hypotheses win ties
        out.append(max(hyps, key=lambda h: h[0])[1])
    return out


@torch.no_grad()
def generate(model, batch, tok, beam_size, max_gen_len, length_penalty=1.0):
    """The texts a fine-tuned generation model (tasks.TaskModel with a decoder) writes for a batch:
    deterministic beam search from [CLS], at most max_gen_len - 1 tokens, [SEP] included (the
    longest continuation of [CLS] training saw). The one generation of evaluation and of the API."""
    sp = special_ids(tok)
    memory, memory_mask = encoder_memory(model.backbone, **model.encoder_inputs(batch))
    ids = beam_search(model.decoder, memory, memory_mask, sp["cls"], sp["sep"], sp["pad"],
                      beam_size, max_gen_len - 1, length_penalty)
    return [tok.decode(i) for i in ids]
