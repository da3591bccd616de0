"""The three pre-training objectives of PTUnifier (paper section 3.3) as small pure functions, and the step that sums them.

    loss, stats = pretraining_loss(model, batch, cfg, generator, special)

- MLM on the paired pass with masked text (BERT's 15% and 80/10/10), vocabulary projection only at masked positions;
- ITM on the paired pass, negatives by swapping in another image of the batch (or ALBEF hard negatives from ITC);
- ITC between an image-only pass (image + textual prompts) and a text-only pass (visual prompts + text), gathered over
  all ranks with gradients so that 8 GPUs compute the loss of the global batch (open_clip's "local loss").
The authors' code never ran ITC (a misnamed config key); here all three are trained.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

IGNORE = -100  # cross_entropy's ignore_index: positions without an MLM target


def draw(generator, rows, width, offset, B, T):
    """Uniform draws for rows [offset, offset + B) and columns [0, T) of a [rows, width] table.

    Every rank draws the whole global table from the same generator and keeps its own block, so a sample gets the same
    random numbers whether it is trained on 1 process or 8 (DDP equivalence) and however its batch is padded.
    """
    return torch.rand(rows, width, generator=generator)[offset:offset + B, :T]


def mask_tokens(input_ids, attention_mask, special_ids, vocab_size, generator, prob=0.15, mask_id=None,
                continuation=None, rows=None, width=None, offset=0):
    """BERT masking. Returns (masked input ids, labels with IGNORE where nothing is predicted).

    Candidates are real tokens only: never [CLS], [SEP], [PAD] (nor prompts or image positions, which are not in
    input_ids). Of the chosen, 80% become [MASK], 10% a random token, 10% stay. With `continuation` ([V] bool: the
    vocabulary entries that start with '##'), whole words are masked together: every piece takes the draw of its
    word's first piece. rows/width/offset place this batch in the global draw table (see `draw`).
    """
    B, T = input_ids.shape
    dev = input_ids.device
    rows, width = rows or B, width or T
    special = torch.tensor(sorted(special_ids), device=dev)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, special)
    r = draw(generator, rows, width, offset, B, T).to(dev)
    if continuation is not None:
        is_start = ~continuation.to(dev)[input_ids]
        pos = torch.arange(T, device=dev).expand(B, T)
        start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(1).values  # [B, T] index of the word's start
        r = r.gather(1, start)
    chosen = candidate & (r < prob)
    if not chosen.any() and candidate.any():  # a short batch can draw no token at all: predict its likeliest one
        chosen = candidate & (r == r.masked_fill(~candidate, 2.0).min())
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    action = draw(generator, rows, width, offset, B, T).to(dev)
    random_ids = (draw(generator, rows, width, offset, B, T) * vocab_size).long().clamp(max=vocab_size - 1).to(dev)
    out = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, out)
    return out, labels


def mlm_loss(logits, labels, per_rank_count=None):
    """logits [M, V] at the masked positions, labels [M]. Returns (loss, accuracy).

    per_rank_count: the global number of masked tokens / world size. Dividing the summed loss by it instead of by this
    rank's M makes DDP's gradient average equal the mean over every masked token of the global batch.
    """
    denom = per_rank_count if per_rank_count is not None else len(labels)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum") / denom
    return loss, (logits.argmax(-1) == labels).float().mean()


def itm_loss(logits, matched):
    """logits [B, 2], matched [B] bool. Returns (loss, accuracy)."""
    target = matched.long()
    return F.cross_entropy(logits.float(), target), (logits.argmax(-1) == target).float().mean()


def gather(x):
    """All ranks' rows of x, with gradients flowing back to their owners; x itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), 0)


def itc_loss(image_feats, text_feats, scale):
    """Symmetric InfoNCE (paper eqs. 7-10) between L2-normalised features [B, d] of this rank's pairs.

    Each rank scores its own rows against every rank's columns. With DDP averaging the gradients over ranks and the
    gather sending gradients back, this is exactly the loss of the global batch on one device.
    Returns (loss, image->text accuracy).
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    all_image, all_text = gather(image_feats), gather(text_feats)
    B = len(image_feats)
    target = torch.arange(B, device=image_feats.device) + rank * B
    logits_i2t = scale * image_feats.float() @ all_text.float().t()  # [B, world * B], in fp32
    logits_t2i = scale * text_feats.float() @ all_image.float().t()
    loss = (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2
    return loss, (logits_i2t.argmax(-1) == target).float().mean()


def itm_negatives(index, generator, sim=None):
    """For each pair of the global batch, the row whose image is swapped in as its negative.

    Uniform over the other rows (the paper's random negative), or, given ITC similarities sim [G, G] (text i vs image
    j), sampled from softmax(sim) (ALBEF's hard negatives). Rows showing the same image (duplicates in the batch) are
    excluded, so a negative is a true mismatch. Every rank computes all G rows alike and keeps its own.
    """
    same = index[:, None] == index[None, :]  # [G, G] duplicates of the same image, the diagonal included
    if (~same).sum(1).min() == 0:
        raise ValueError("ITM needs at least two different images in every batch")
    weights = (~same).double() if sim is None else F.softmax(sim.double(), -1).masked_fill(same, 0) + 1e-30 * ~same
    return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(index.device)


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pretraining_loss(model, batch, cfg, generator, special, continuation=None, raw_model=None):
    """One micro-step of PTUnifier pre-training. `model` may be DDP-wrapped; heads are read from `raw_model`.

    batch: image [B, 3, H, W], input_ids [B, T], attention_mask [B, T], index [B] (which image: duplicates matter).
    `generator` must be seeded alike on every rank: random draws are made for the global batch and sliced (see `draw`).
    Returns (weighted total loss, dict of tensors for logging).
    """
    raw = raw_model or model
    objectives = cfg.objective_set()
    image, ids, mask, index = batch["image"], batch["input_ids"], batch["attention_mask"], batch["index"]
    rank, world = rank_and_world()
    B = len(ids)
    G, offset = B * world, rank * B  # global batch rows, and where this rank's rows start
    total, stats = 0.0, {}
    if "itc" in objectives:
        img = model(image=image)
        txt = model(input_ids=ids, attention_mask=mask)
        zi, zt = raw.itc_features(img.pooled, "image"), raw.itc_features(txt.pooled, "text")
        loss, acc = itc_loss(zi, zt, raw.itc_scale())
        total = total + cfg.w_itc * loss
        stats.update(itc_loss=loss.detach(), itc_acc=acc, logit_scale=raw.itc_scale().detach())
        stats["selected_visual"], stats["selected_textual"] = txt.selected_visual, img.selected_textual
    if "mlm" in objectives:
        masked, labels = mask_tokens(ids, mask, special["ids"], raw.cfg.vocab_size, generator, cfg.mlm_prob,
                                     special["mask"], continuation if cfg.whole_word else None,
                                     G, raw.cfg.max_text_len, offset)
        enc = model(image=image, input_ids=masked, attention_mask=mask)
        at = labels != IGNORE  # [B, T]
        count = at.sum().float()
        if world > 1:
            dist.all_reduce(count)
        logits = raw.mlm_logits(enc.hidden[:, enc.n_visual:][at])  # only the masked positions reach the vocabulary
        loss, acc = mlm_loss(logits, labels[at], count / world)
        total = total + cfg.w_mlm * loss
        stats.update(mlm_loss=loss.detach(), mlm_acc=acc)
    if "itm" in objectives:
        # Negatives come from the whole global batch, as on one device: images and ids are gathered (no gradient
        # needed, pixels are inputs); hard negatives use the global ITC similarities.
        all_image, all_index = gather(image), gather(index)
        sim = None
        if cfg.itm_hard_negatives and "itc" in objectives:
            sim = gather(zt.detach()) @ gather(zi.detach()).t()  # [G, G] text i vs image j
        neg = itm_negatives(all_index, generator, sim)
        swap = torch.rand(G, generator=generator).to(ids.device) < 0.5  # half the pairs become negatives
        rows = torch.where(swap, neg, torch.arange(G, device=ids.device))[offset:offset + B]
        enc = model(image=all_image[rows], input_ids=ids, attention_mask=mask)
        loss, acc = itm_loss(raw.itm_logits(enc.pooled), all_index[rows] == index)
        total = total + cfg.w_itm * loss
        stats.update(itm_loss=loss.detach(), itm_acc=acc)
    return total, stats


def freeze_unused(model, objectives):
    """Turn off gradients of heads (and prompts) that the chosen objectives never use.

    DDP with find_unused_parameters=False requires every trainable parameter to get a gradient each step. Prompts
    appear only in the single-modality passes, which only ITC runs during pre-training.
    """
    unused = []
    if "mlm" not in objectives:
        unused += ["mlm_head.dense", "mlm_head.norm", "mlm_head.bias"]
    if "itm" not in objectives:
        unused += ["itm_head"]
    if "itc" not in objectives:
        unused += ["itc_", "logit_scale", "visual_prompts", "textual_prompts"]
    for name, p in model.named_parameters():
        if name.startswith(tuple(unused)):
            p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if not p.requires_grad]
