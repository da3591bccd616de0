"""The three pre-training objectives of PTUnifier (paper section 3.3) as small pure functions, and
the step that sums them.

    draws = draw_step(micro_batches, cfg, step, special, proc=proc)
        # on the host: MLM's targets (mask_step), ITM's negatives (itm_plan); a dict per micro-batch
    loss, stats, selections = pretraining_loss(model, batch, draw, cfg)
        # then each micro-step, on the device

Nothing in pretraining_loss reads a tensor of the device on the host: a micro-step never makes the
host wait for the device. Every random draw of a step is made on the host before the batches move,
where the host can see it without asking the device (tests/test_sync.py).

- MLM on the paired pass with masked text (BERT's 15% and 80/10/10), vocabulary projection only at
  masked positions, averaged over every masked token of the optimizer step (all ranks, all
  micro-steps);
- ITM on the paired pass, negatives by swapping in another image of the batch (or ALBEF hard
  negatives from ITC), never one showing the same file or captioned with the same text;
- ITC between an image-only pass (image + textual prompts) and a text-only pass (visual prompts +
  text), gathered over all ranks with gradients so that 8 GPUs compute the loss of the global batch
  (open_clip's "local loss").
ITC and ITM see one micro-step's global batch: gradient accumulation does not enlarge the
contrastive batch (as in CLIP). Contrastive logits and every loss's log-softmax are fp32 with
autocast off, also inside a bf16 region.
The authors' code never ran ITC (a misnamed config key); here all three are trained.
"""

import torch
import torch.nn.functional as F

from . import distributed
from .model import cross_entropy_fp32, matmul_fp32

IGNORE = -100  # cross_entropy's ignore_index: positions without an MLM target


def draw(generator, rows, width, offset, B, T):
    """Uniform draws for rows [offset, offset + B) and columns [0, T) of a [rows, width] table.

    Every rank draws the whole global table from the same generator and keeps its own block, so a
    sample gets the same random numbers whether it is trained on 1 process or 8 (DDP equivalence)
    and however its batch is padded.
    The draws are made on the generator's device.
    """
    return torch.rand(rows, width, generator=generator,
                      device=generator.device)[offset:offset + B, :T]


def mask_tokens(input_ids, attention_mask, special_ids, vocab_size, generator, prob=0.15,
                mask_id=None, continuation=None, rows=None, width=None, offset=0):
    """BERT masking. Returns (masked input ids, labels with IGNORE where nothing is predicted).

    Candidates are real tokens only: never [CLS], [SEP], [PAD] (nor prompts or image positions,
    which are not in input_ids). Of the chosen, 80% become [MASK], 10% a random token, 10% stay.
    With `continuation` ([V] bool: the vocabulary entries that continue a word, see
    continuation_table), whole words are masked together: every piece takes the draw of its
    word's first piece. The piece after a special token ([CLS]) always starts a word: a byte-level
    BPE text's first word has no space marker. rows/width/offset place this batch in the global
    draw table (see `draw`).
    """
    B, T = input_ids.shape
    dev = input_ids.device
    rows, width = rows or B, width or T
    special = torch.tensor(sorted(special_ids), device=dev)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, special)
    r = draw(generator, rows, width, offset, B, T).to(dev)
    if continuation is not None:
        is_start = ~continuation.to(dev)[input_ids]
        is_start[:, 1:] |= ~candidate[:, :-1]  # after [CLS] / [SEP]: a new word
        pos = torch.arange(T, device=dev).expand(B, T)
        # [B, T] index of the word's start
        start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(1).values
        r = r.gather(1, start)
    chosen = candidate & (r < prob)
    # a short batch can draw no token at all: it predicts its likeliest one then (none if it has no
    # candidate), decided without an `if`, which would make the host read the draws
    likeliest = candidate & (r == r.masked_fill(~candidate, 2.0).min())
    chosen = torch.where(chosen.any(), chosen, likeliest)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    action = draw(generator, rows, width, offset, B, T).to(dev)
    random_ids = (draw(generator, rows, width, offset, B, T)
                  * vocab_size).long().clamp(max=vocab_size - 1).to(dev)
    out = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, labels


def mask_step(micro_batches, cfg, generator, special, continuation=None, rank=0, world=1,
              device=None):
    """MLM targets for every micro-batch of one optimizer step, before any forward pass: one dict
    per micro-batch, with `mlm_input_ids` / `mlm_labels` [B, T], `mlm_positions` [M, 2] (row,
    column of each masked token, in row-major order) and `mlm_norm`, what its summed MLM loss is
    divided by (the step's masked-token count over all ranks, a tensor on `device`, the batches'
    when None: reading it makes the host wait).

    train.py calls it on the batches while they are still on the host: the masks are then drawn
    where their CPU generator is, and the host knows where the masked tokens are, so the MLM head
    can pick them out of the hidden states without asking the device (boolean indexing would: the
    host needs the count to size the result).

    The micro-batches read their rows of one draw table for the step's global batch (rows = batch x
    world x grad_accum, in the order BatchOrder hands out samples), so the mask a sample gets does
    not depend on how the step is split over ranks and micro-steps. mlm_norm = count / (world x
    grad_accum): after accumulate's 1/grad_accum and DDP's average over ranks, the gradient is that
    of the mean over every masked token of the step, so --grad-accum 2 at batch B is exactly batch
    2B (and 2 processes at batch B), unless a micro-batch draws no token at all and takes
    mask_tokens' fallback (a rare event for any but the shortest texts at batch 1).
    """
    B, A = len(micro_batches[0]["input_ids"]), len(micro_batches)
    start = generator.get_state()
    count, draws = torch.zeros((), dtype=torch.long), []
    for micro, batch in enumerate(micro_batches):
        generator.set_state(start)  # the same tables for every micro-batch; each keeps its own rows
        ids, labels = mask_tokens(
            batch["input_ids"], batch["attention_mask"], special["ids"], cfg.model.vocab_size,
            generator, cfg.mlm_prob, special["mask"], continuation if cfg.whole_word else None,
            rows=B * world * A, width=cfg.model.max_text_len, offset=(micro * world + rank) * B)
        positions = (labels != IGNORE).nonzero()  # [M, 2]
        draws.append({"mlm_input_ids": ids, "mlm_labels": labels, "mlm_positions": positions})
        count = count + len(positions)
    # a collective: every rank masks its micro-batches, then all sum their counts
    count = distributed.all_reduce_sum(count.to(device or labels.device, non_blocking=True), world)
    for d in draws:
        d["mlm_norm"] = count.float() / (world * A)
    return draws


def mlm_loss(logits, labels, norm=None):
    """logits [M, V] at the masked positions, labels [M]. Returns (loss, accuracy).

    norm: what the summed loss is divided by (see mask_step); this batch's M when not given.
    """
    loss = cross_entropy_fp32(logits, labels, reduction="sum") / (
        norm if norm is not None else len(labels))
    return loss, (logits.argmax(-1) == labels).float().mean()


def itm_loss(logits, matched):
    """logits [B, 2], matched [B] bool. Returns (loss, accuracy)."""
    target = matched.long()
    return cross_entropy_fp32(logits, target), (logits.argmax(-1) == target).float().mean()


def itc_loss(image_feats, text_feats, scale, rank=0, world=1):
    """Symmetric InfoNCE (paper eqs. 7-10) between L2-normalised features [B, d] of this rank's
    pairs, `rank` of `world`.

    Each rank scores its own rows against every rank's columns. With DDP averaging the gradients
    over ranks and the gather sending gradients back, this is exactly the loss of the global batch
    on one device.
    Returns (loss, image->text accuracy).
    """
    all_image = distributed.gather_with_grad(image_feats, rank, world)
    all_text = distributed.gather_with_grad(text_feats, rank, world)
    B = len(image_feats)
    target = torch.arange(B, device=image_feats.device) + rank * B
    logits_i2t = scale.float() * matmul_fp32(image_feats, all_text.t())  # [B, world * B]
    logits_t2i = scale.float() * matmul_fp32(text_feats, all_image.t())
    loss = (cross_entropy_fp32(logits_i2t, target) + cross_entropy_fp32(logits_t2i, target)) / 2
    return loss, (logits_i2t.argmax(-1) == target).float().mean()


def valid_negatives(image_id, text):
    """[G, G] bool: may pair j's image be swapped in as the negative of pair i's text?

    Only when it is another image file and pair j's text differs from pair i's (token ids after
    truncation): with one sentence sampled per record, "No pneumothorax." under another image would
    be a true match labelled as a mismatch.
    image_id [G] int64 file identities (data.file_id), text [G, L] token ids, equal rows for equal
    texts.
    """
    same_file = image_id[:, None] == image_id[None, :]  # the diagonal included
    same_text = (text[:, None, :] == text[None, :, :]).all(-1)
    return ~same_file & ~same_text


def hard_negative_probs(text_feats, image_feats, scale, valid):
    """ALBEF's hard-negative distribution: row i = softmax over images j of scale x cos(text i,
    image j), restricted to the valid negatives. The similarities are ITC's logits (ALBEF: sim /
    temperature), not raw cosines: at a global batch of 256, cosines in [-1, 1] would give an almost
    uniform choice. No gradient flows through the choice."""
    # [G, G]
    logits = scale.detach().float() * matmul_fp32(text_feats.detach(), image_feats.detach().t())
    return F.softmax(logits.double().masked_fill(~valid, float("-inf")), -1)


def itm_negatives(weights, generator, offset=0):
    """For pairs [offset, offset + R) of the global batch, the row whose image is swapped in as each
    one's negative.

    weights [R, G]: the valid negatives as 0/1 (uniform choice, the paper's random negative) or
    their probabilities (hard_negative_probs). Drawn as torch.multinomial(weights, 1) draws (the
    exponential race: argmax of weight / Exp(1) noise), with the noise of the whole [G, G] table,
    sliced: a rank draws for its pairs what one process drawing for the whole global batch draws for
    them. Nothing is read on the host.
    """
    G = weights.shape[1]
    noise = torch.empty((G, G), dtype=weights.dtype,
                        device=generator.device).exponential_(generator=generator)
    return (weights / noise[offset:offset + len(weights)].to(weights.device)).argmax(1)


def itm_rows(valid, generator):
    """The random-negative draws of a global batch, from its [G, G] valid negatives: (swap [G]
    bool, half of the pairs at random; rows [G], the global row whose image each pair is shown: a
    uniform valid negative where swapped, its own row elsewhere)."""
    G = len(valid)
    neg = itm_negatives(valid.double(), generator)
    swap = torch.rand(G, generator=generator) < 0.5
    return swap, torch.where(swap, neg, torch.arange(G))


def exchange_plan(rows, B, rank, world):
    """How rank `rank` gets the images of its ITM pairs when pair p of the global batch is shown row
    rows[p]'s image ([G] int64; rank r holds rows [r * B, (r + 1) * B)). Every rank computes every
    rank's plan alike, so that each knows what the others send. Returns (send: its own rows other
    ranks need, ordered by the receiving pair, hence by receiving rank; (rows to each rank, rows
    from each rank) as lists; source [B]: each of its pairs' image in cat(own images, received
    images), received ones ordered by sending rank, then by pair)."""
    G, offset = len(rows), rank * B
    mine = slice(offset, offset + B)
    owner, pair_rank = rows // B, torch.arange(G) // B
    remote = owner != pair_rank  # images that cross ranks
    out = remote & (owner == rank)
    incoming = torch.arange(offset, offset + B)[remote[mine]]
    incoming = incoming[torch.sort(owner[incoming], stable=True).indices]
    source = torch.where(remote[mine], 0, rows[mine] - offset)
    source[incoming - offset] = B + torch.arange(len(incoming))
    split = (torch.bincount(pair_rank[out], minlength=world).tolist(),
             torch.bincount(owner[incoming], minlength=world).tolist())
    return rows[out] - offset, split, source


def itm_plan(batch, cfg, generator, rank=0, world=1, group=None):
    """ITM's draws for one micro-batch, made on the host before the batch moves (like mask_step's
    masks): which of the global batch's pairs get a swapped-in image (half, at random), which image,
    and how each rank gets the images it swaps in. Returns:

        itm_swap [B] bool        this rank's pairs whose image is another pair's (the mismatches ITM
                                 must detect)
        itm_send [S], itm_split  own images other ranks need, and (rows to each rank, rows from each
                                 rank): lists
        itm_source [B]           each pair's image in cat(own images, received images)
                                 (distributed.exchange_rows)

    With cfg.itm_hard_negatives the choice of the image needs ITC's features, which only the device
    has: itm_valid [B, G] (the valid negatives of this rank's pairs) and itm_seed (for the device's
    draw) instead, and every rank receives every image (distributed.gather_rows).

    Every rank gathers the global batch's file ids and texts (small int64 tensors, through `group`,
    a CPU process group: distributed.Dist.host_group) and draws the same tables from `generator`, so
    each knows what the others send. A pair of the global batch without any valid negative raises
    ValueError here, before any pass.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B = len(ids)
    G, mine = B * world, slice(rank * B, (rank + 1) * B)
    # texts padded to the model's length with -1, so that every rank's rows have one shape and
    # padding never tells two equal texts apart
    text = F.pad(ids.masked_fill(~mask.bool(), -1), (0, cfg.model.max_text_len - ids.shape[1]),
                 value=-1)
    meta = distributed.gather_rows(torch.cat([batch["image_id"][:, None], text], 1), world,
                                   group).cpu()  # [G, 1 + L]
    valid = valid_negatives(meta[:, 0], meta[:, 1:])
    lonely = (~valid.any(1)).nonzero().flatten().tolist()
    if lonely:
        raise ValueError(f"ITM needs two different images and texts in every batch: pair "
                         f"{lonely[0]} of the global batch of {G} has no valid negative (every "
                         "other pair shows its image file or has its text); raise --batch-size")
    if cfg.itm_hard_negatives:
        swap = torch.rand(G, generator=generator) < 0.5
        return {"itm_swap": swap[mine], "itm_valid": valid[mine],
                "itm_seed": int(torch.randint(2**62, (), generator=generator))}
    swap, rows = itm_rows(valid, generator)
    send, split, source = exchange_plan(rows, B, rank, world)
    return {"itm_swap": swap[mine], "itm_send": send, "itm_split": split, "itm_source": source}


def draw_step(micro_batches, cfg, step, special, continuation=None, proc=None):
    """Every random draw of optimizer step `step`, made on the host before the batches move: MLM's
    targets for the whole step (mask_step), then ITM's negatives for each micro-batch (itm_plan),
    each from its own stream of distributed.step_generator. Returns one dict of draws per
    micro-batch, for pretraining_loss, with the rank and world size they were drawn for. proc: the
    distributed.Dist of this process (its rank and world, the host group, the device)."""
    proc = proc or distributed.Dist()
    objectives = cfg.objective_set()
    draws = [{"rank": proc.rank, "world": proc.world} for _ in micro_batches]
    if "mlm" in objectives:
        for d, mlm in zip(draws, mask_step(micro_batches, cfg,
                                           distributed.step_generator(cfg.seed, step), special,
                                           continuation, proc.rank, proc.world, proc.device)):
            d.update(mlm)
    if "itm" in objectives:
        for micro, (d, batch) in enumerate(zip(draws, micro_batches)):
            d.update(itm_plan(batch, cfg, distributed.step_generator(cfg.seed, step, micro),
                              proc.rank, proc.world, proc.host_group))
    return draws


def pretraining_loss(model, batch, draws, cfg):
    """One micro-step of PTUnifier pre-training. `model` may be wrapped (DDP, torch.compile): the
    passes run through it, so that DDP reduces their gradients, and the heads are read from the
    model it wraps.

    batch: image [B, 1, H, W] uint8 pixels (the model normalises them; or [B, 3, H, W] floats),
    input_ids [B, T], attention_mask [B, T]; optionally padded, the collate's bool: does the mask
    mark any padding (else each pass reads it from the device). draws: what the host drew for this
    micro-batch (draw_step). ITC and ITM see this micro-batch only, as in CLIP.
    Returns (weighted total loss, scalars, selections): scalars = {name: 0-dim tensor} for logging,
    the weighted total among them as `loss`; selections = {"visual" | "textual": [B, k] pool rows
    the single-modality passes chose} (pool mode with ITC only), for the pool-usage statistics.
    """
    heads = distributed.unwrap(model)
    objectives = cfg.objective_set()
    image, ids, mask, padded = (batch["image"], batch["input_ids"], batch["attention_mask"],
                                batch.get("padded"))
    rank, world = draws["rank"], draws["world"]
    B, offset = len(ids), rank * len(ids)  # where this rank's rows of the global batch start
    total, stats, selections = 0.0, {}, {}
    if "itc" in objectives:
        # every pass reads only the final states its head uses (PTUnifier.forward's `read`)
        img = model(image=image, read="pooled")
        txt = model(input_ids=ids, attention_mask=mask, padded=padded, read="pooled")
        zi, zt = heads.itc_embed(img), heads.itc_embed(txt)
        loss, acc = itc_loss(zi, zt, heads.itc_scale(), rank, world)
        total = total + cfg.w_itc * loss
        stats.update(itc_loss=loss.detach(), itc_acc=acc,
                     logit_scale=heads.itc_scale().detach())
        for k, rows in (("visual", txt.selected_visual), ("textual", img.selected_textual)):
            if rows is not None:
                selections[k] = rows
        # the pools chose the prompts: their auxiliary terms (Prompts.forward)
        if img.pool_terms is not None:
            for name in ("pull", "balance"):
                # the textual and the visual pool
                term = (img.pool_terms[name] + txt.pool_terms[name]) / 2
                # logged whatever the weight: how the pools are used
                stats[f"pool_{name}"] = term.detach()
                weight = getattr(cfg, f"w_pool_{name}")
                # only then in the graph: with weight 0 the separate keys stay unreached, hence
                # frozen
                if weight:
                    total = total + weight * term
    if "mlm" in objectives:
        enc = model(image=image, input_ids=draws["mlm_input_ids"], attention_mask=mask,
                    padded=padded, read="text")
        # [M] each: the masked tokens, found by mask_step
        row, col = draws["mlm_positions"].unbind(1)
        logits = heads.mlm_logits(enc.hidden[row, col])  # only they reach the vocabulary
        loss, acc = mlm_loss(logits, draws["mlm_labels"][row, col], draws["mlm_norm"])
        total = total + cfg.w_mlm * loss
        stats.update(mlm_loss=loss.detach(), mlm_acc=acc)
    if "itm" in objectives:  # the draws are itm_plan's, made on the host
        swap = draws["itm_swap"]
        if cfg.itm_hard_negatives:  # the config refuses it without ITC
            probs = hard_negative_probs(zt, distributed.gather_rows(zi.detach(), world),
                                        heads.itc_scale(), draws["itm_valid"])
            neg = itm_negatives(probs, torch.Generator(ids.device).manual_seed(draws["itm_seed"]),
                                offset)
            rows = torch.where(swap, neg, torch.arange(offset, offset + B, device=ids.device))
            itm_image = distributed.gather_rows(image, world)[rows]
        else:
            # The images of this rank's pairs: its own, or the negative itm_plan swapped in,
            # brought from the rank that holds it by one all_to_all of exactly the rows needed, as
            # uint8 pixels (at the paper preset, 8 x 32 at 288 px: ~14 rows, 1.2 MB per rank and
            # micro-step, where an all-gather of every image would bring 224, 19 MB).
            itm_image = distributed.exchange_rows(image, draws["itm_send"], draws["itm_split"],
                                                  world)[draws["itm_source"]]
        enc = model(image=itm_image, input_ids=ids, attention_mask=mask, padded=padded,
                    read="pooled")
        loss, acc = itm_loss(heads.itm_logits(enc.pooled), ~swap)
        total = total + cfg.w_itm * loss
        stats.update(itm_loss=loss.detach(), itm_acc=acc)
    stats["loss"] = total.detach()  # the weighted sum that is optimised, as logged
    return total, stats, selections
