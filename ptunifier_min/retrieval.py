"""Image-text retrieval with the ITC head: one image-only pass per image, one text-only pass per
text, then Recall@K ranked block by block from the embeddings.

    zi, zt, txt_image = embed_pairs(model, records, tok, image_size, max_len, device)
    embedding_recall(zi, zt, txt_image)  # i2t / t2i Recall@1/5/10; never the whole matrix
    retrieval_metrics(model, records, tok, image_size, max_len, device)  # six recalls + mean, timed

The authors scored every image-text pair with the ITM cross-encoder (N^2 fused passes for N pairs);
the dual-encoder use of the same backbone that PTUnifier's prompts make possible needs only 2N
passes. ITM re-ranking (`embedding_recall(rerank_top=k, itm_margins=...)`) optionally re-scores
each image's top k candidates with the ITM head. The N_img x N_txt similarity matrix is never held:
at 100,000 x 100,000 it would be 40 GB in fp32, so each block of query rows is scored against all
candidates and reduced to ranks at once.
"""

import time

import numpy as np
import torch

from .images import ImageTransform, load_image
from .tokenizer import encode_texts
from . import data, distributed, metrics
from .distributed import autocast
from .model import matmul_fp32

IMAGE_BATCH, TEXT_BATCH = 64, 128  # encoder batches; under torchrun, the units of a rank's share
# similarities per ranking block (64 MB in fp32; the block's masks add about 7 bytes an entry)
BLOCK_ENTRIES = 1 << 24


def _read_file(path, index):
    return load_image(path)


@torch.no_grad()
def embed_images(model, images, image_size, device, precision="fp32", batch_size=IMAGE_BATCH,
                 read=_read_file):
    """[N, d] ITC embeddings of images: image-only passes, the evaluation transform. images: file
    paths, or whatever read(image, index) turns into a PIL image (the API's inputs)."""
    transform = ImageTransform(image_size)
    out = []
    for i in range(0, len(images), batch_size):
        # uint8 pixels [b, 1, S, S]: the model normalises them on the device
        x = torch.stack([transform.pixels(read(img, i + j))
                         for j, img in enumerate(images[i:i + batch_size])]).to(device)
        with autocast(precision, device):
            out.append(model.itc_embed(model(image=x, read="pooled")))
    return torch.cat(out) if out else torch.zeros(0, model.cfg.itc_dim, device=device)


@torch.no_grad()
def embed_texts(model, texts, tok, max_len, device, precision="fp32", batch_size=TEXT_BATCH):
    """[N, d] ITC embeddings of texts: text-only passes."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_texts(tok, texts[i:i + batch_size], max_len)
        # read here, on the host's copy: the model need not ask the device
        padded = not bool(mask.all())
        with autocast(precision, device):
            out.append(model.itc_embed(model(input_ids=ids.to(device),
                                             attention_mask=mask.to(device), padded=padded,
                                             read="pooled")))
    return torch.cat(out) if out else torch.zeros(0, model.cfg.itc_dim, device=device)


def embed_sharded(embed, items, unit, device, proc):
    """embed(items) [N, d], computed as a share per rank (distributed.shard: whole batches of
    `unit`, the one-process batches) and gathered in order: every rank holds all N rows, on
    `device`."""
    lo, hi = distributed.shard(len(items), proc, unit)
    mine = embed(items[lo:hi]) if hi > lo else None
    if proc.world == 1:
        return mine
    parts = distributed.gather_objects(None if mine is None else mine.cpu(), proc)  # host wait
    return torch.cat([p for p in parts if p is not None]).to(device)


def pairs(records):
    """Flatten records with several texts: (image paths, texts, index of each text's image)."""
    texts, txt_image = [], []
    for i, r in enumerate(records):
        for t in r["texts"]:
            texts.append(t)
            txt_image.append(i)
    return [data.image_path(r) for r in records], texts, torch.tensor(txt_image)


@torch.no_grad()
def embed_pairs(model, records, tok, image_size, max_len, device, precision="fp32", proc=None):
    """ITC embeddings of every image [N_img, d] and text [N_txt, d] of `records` (on `device`, in
    eval mode), and the image index of each text [N_txt]. Under torchrun (proc) each rank embeds its
    share and every rank receives all of them, in order."""
    proc = proc or distributed.Dist()
    was_training = model.training
    model.eval()
    paths, texts, txt_image = pairs(records)
    zi = embed_sharded(lambda p: embed_images(model, p, image_size, device, precision,
                                              IMAGE_BATCH), paths, IMAGE_BATCH, device, proc)
    zt = embed_sharded(lambda t: embed_texts(model, t, tok, max_len, device, precision,
                                             TEXT_BATCH), texts, TEXT_BATCH, device, proc)
    model.train(was_training)
    return zi, zt, txt_image


@torch.no_grad()
def itm_margins(model, path, texts, tok, image_size, max_len, device, precision="fp32"):
    """[len(texts)] ITM margins (logit matched - logit not matched) of one image file with each
    text, on the host: one fused pass per pair, in one batch."""
    img = (ImageTransform(image_size).pixels(load_image(path))[None]
           .expand(len(texts), -1, -1, -1).to(device))
    ids, mask = encode_texts(tok, texts, max_len)
    with autocast(precision, device):
        logits = model.itm_logits(model(image=img, input_ids=ids.to(device),
                                        attention_mask=mask.to(device),
                                        padded=not bool(mask.all()),  # host's mask
                                        read="pooled").pooled)
    return (logits[:, 1].float() - logits[:, 0].float()).cpu()


def _positive_pairs(query_group, cand_group):
    """(query index, candidate index) of every positive pair, sorted by query: each candidate of
    the query's group (a join on the group label; a few pairs per query, not a Q x N mask)."""
    by_group = cand_group.argsort(stable=True)  # candidates sorted by group
    sorted_groups = cand_group[by_group]
    first = torch.searchsorted(sorted_groups, query_group)  # [Q] where q's group starts
    count = torch.searchsorted(sorted_groups, query_group, right=True) - first  # [Q] its size
    q = torch.repeat_interleave(torch.arange(len(query_group), device=count.device), count)
    within = torch.arange(len(q), device=q.device) - (count.cumsum(0) - count)[q]  # 0, 1, .. per q
    return q, by_group[first[q] + within]


def _first_hit_ranks(query, cand, query_group, cand_group, block, top=0, margins=None,
                     rows=(0, 0)):
    """0-based rank of the best-scored positive of every query among all candidates, ties counted
    against the query: a negative scored equal to the best positive is ranked ahead of it, so a
    model that gives every pair the same similarity scores 0, not 1. A positive is a candidate of
    the query's group.

    Scores `block` queries at a time: [block, N_cand] fp32 similarities, even inside a caller's
    autocast (a bf16 product ties and swaps close candidates). top > 0: the queries of `rows`
    (lo, hi) are re-ranked: their top ITC candidates are re-ordered by margins(query index,
    candidate indices) (higher first; ties keep the ITC order) and stay above every other
    candidate, whatever the margins' sign and size; the rank is then the place of the first
    positive among them, or the ITC rank when none of them is positive (the candidates, all
    negatives, were above the best positive already)."""
    pair_query, pair_cand = _positive_pairs(query_group, cand_group)
    # pairs [bounds[a], bounds[a + block]) are those of queries [a, a + block)
    bounds = torch.searchsorted(pair_query, torch.arange(len(query) + 1, device=query.device))
    ranks = torch.empty(len(query), dtype=torch.long, device=query.device)
    host_query_group, host_cand_group = query_group.cpu(), cand_group.cpu()
    for a in range(0, len(query), block):
        s = matmul_fp32(query[a:a + block], cand.t())  # [b, N_cand]
        b = len(s)
        lo, hi = bounds[a], bounds[a + b]  # this block's positive pairs
        pq, pc = pair_query[lo:hi] - a, pair_cand[lo:hi]
        positive = s[pq, pc]  # [P_b]
        best = torch.full((b,), float("-inf"), device=s.device)
        best.scatter_reduce_(0, pq, positive, "amax")  # [b] each query's best positive
        # the candidates at or above it, less the positives among them
        above = (s >= best[:, None]).sum(1)
        ranks[a:a + b] = above - torch.zeros_like(above).scatter_add_(
            0, pq, (positive >= best[pq]).long())
        if not top:
            continue
        for q in range(max(a, rows[0]), min(a + b, rows[1])):
            # the host waits for the block here, once per re-ranked query
            candidates = s[q - a].topk(min(top, s.shape[1])).indices.cpu()  # best ITC first
            ranked = candidates[margins(q, candidates).argsort(descending=True, stable=True)]
            hits = (host_cand_group[ranked] == host_query_group[q]).nonzero()
            if len(hits):
                ranks[q] = int(hits[0, 0])
    return ranks


def embedding_recall(image_emb, text_emb, txt_image, ks=(1, 5, 10), img_group=None, *,
                     block=None, rerank_top=0, itm_margins=None, proc=None):
    """Image-to-text and text-to-image Recall@k of ITC embeddings, as fractions in [0, 1].

    image_emb [N_img, d], text_emb [N_txt, d]: the similarity is their product (the cosine for
    L2-normalised embeddings), computed in fp32 on their device. txt_image: [N_txt] index of each
    text's image. An image query hits at k when any of its texts is among its k most similar
    texts; a text query hits when its image is among its k most similar images. img_group:
    optional [N_img] labels of images that are the same (duplicated ids, identical pixels); any
    image of the group then counts as the text's image, and any text of the group as the image's
    text. Ties count against the query (_first_hit_ranks).

    Each direction is ranked `block` query rows at a time (default: BLOCK_ENTRIES similarities per
    block): memory O((N_img + N_txt) d + block x N), never the N_img x N_txt matrix. The two
    directions are separate products (image rows x texts, text rows x images): the same dot
    products, which a kernel may sum in another order, so candidates within an fp32 rounding of
    each other may rank apart; exact ties (identical embeddings) stay ties.

    rerank_top > 0: each image's top rerank_top texts are re-ordered by
    itm_margins(image index, text indices) and kept above the rest (image-to-text only). Under
    torchrun (proc) each rank re-ranks its share of the images; every rank ranks the rest alike.
    Returns {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ...} for the given ks.
    """
    proc = proc or distributed.Dist()
    n_img, n_txt = len(image_emb), len(text_emb)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb "
                         f"{tuple(text_emb.shape)} must be [N, d] with the same d")
    for name, x in (("image_emb", image_emb), ("text_emb", text_emb)):
        bad = (~torch.isfinite(x).all(1)).nonzero()
        if len(bad):  # one host wait per direction, before any block
            raise ValueError(f"{name} row {int(bad[0, 0])} holds NaN or inf "
                             f"({len(bad)} such rows)")
    device = image_emb.device
    txt_image = torch.as_tensor(txt_image).cpu().long().flatten()
    if txt_image.shape != (n_txt,):
        raise ValueError(f"txt_image has {txt_image.numel()} entries for {n_txt} texts")
    if n_txt and (txt_image.min() < 0 or txt_image.max() >= n_img):
        raise ValueError(f"txt_image must index the {n_img} images")
    if img_group is None:
        group = torch.arange(n_img)
    else:
        labels = np.asarray(img_group.cpu() if torch.is_tensor(img_group) else img_group).ravel()
        if labels.shape != (n_img,):
            raise ValueError(f"img_group has {labels.size} entries for {n_img} images")
        group = torch.from_numpy(np.unique(labels, return_inverse=True)[1].ravel()).long()
    has_text = torch.zeros(n_img, dtype=torch.bool)
    has_text[group[txt_image]] = True
    without_text = (~has_text[group]).nonzero()
    if len(without_text):
        raise ValueError(f"{len(without_text)} images have no text (first: "
                         f"{int(without_text[0, 0])}); image-to-text recall is undefined for them")
    group, txt_group = group.to(device), group[txt_image].to(device)

    rows = distributed.shard(n_img, proc)  # the images this rank re-ranks
    i2t = _first_hit_ranks(image_emb, text_emb, group, txt_group,
                           block or max(1, BLOCK_ENTRIES // max(1, n_txt)), rerank_top,
                           itm_margins, rows)
    if rerank_top and proc.world > 1:  # each rank re-ranked its share: in order, on every rank
        i2t = torch.cat(distributed.gather_objects(i2t[rows[0]:rows[1]].cpu(), proc))
    t2i = _first_hit_ranks(text_emb, image_emb, txt_group, group,
                           block or max(1, BLOCK_ENTRIES // max(1, n_img)))
    # the host waits for the ranks here; counts over n, as a mean of hits would give
    i2t, t2i = i2t.cpu(), t2i.cpu()
    out = {f"i2t_r{k}": int((i2t < k).sum()) / n_img for k in ks}
    out.update({f"t2i_r{k}": int((t2i < k).sum()) / n_txt for k in ks})
    return out


def retrieval_metrics(model, records, tok, image_size, max_len, device, precision="fp32",
                      rerank_top=0, print0=None, proc=None):
    """Recall@1/5/10 both ways through the ITC head of the backbone `model` (zero-shot or
    fine-tuned), r_mean (their mean, the selection metric), and the seconds of the 2N encoder passes
    and the ranking, which `print0` reports. rerank_top > 0 re-ranks each image's top candidates
    with the ITM head (image-to-text recall only). Under torchrun (proc) every rank embeds and
    re-ranks its share and returns the same metrics."""
    proc = proc or distributed.Dist()
    if not records:
        raise ValueError("retrieval needs at least one image-text record")
    t0 = time.perf_counter()
    zi, zt, txt_image = embed_pairs(model, records, tok, image_size, max_len, device, precision,
                                    proc)
    paths, texts, _ = pairs(records)
    was_training = model.training
    model.eval()
    out = embedding_recall(
        zi, zt, txt_image, rerank_top=rerank_top, proc=proc,
        itm_margins=lambda i, cand: itm_margins(model, paths[i], [texts[j] for j in cand.tolist()],
                                                tok, image_size, max_len, device, precision))
    model.train(was_training)
    seconds = time.perf_counter() - t0
    if print0:
        print0(f"retrieval: {len(records):,} images x {len(txt_image):,} texts = "
               f"{len(records) + len(txt_image):,} encoder passes and one matrix product, ranked "
               "in blocks" + (f", each image's top {rerank_top} re-ranked by ITM" if rerank_top
                              else "") +
               f", in {seconds:.1f} s" + (f" on {proc.world} ranks" if proc.world > 1 else ""))
    out["r_mean"] = sum(out.values()) / len(out)  # the selection metric: mean of the six recalls
    out.update(seconds=seconds, pairs=len(records))
    return out


@torch.no_grad()
def zero_shot_classification(backbone, records, label_names, tok, *, image_size, max_text_len,
                             device, precision="fp32", proc=None):
    """CheXpert without training, through the ITC head: per label, score = sim(image, "<finding>") -
    sim(image, "no <finding>") (the positive and negative prompts of CheXzero), then macro AUROC.
    proc (torchrun): each rank embeds its share of the images."""
    was_training = backbone.training
    backbone.eval()
    batch = IMAGE_BATCH
    zi = embed_sharded(
        lambda p: embed_images(backbone, p, image_size, device, precision, batch),
        [data.image_path(r) for r in records], batch, device, proc or distributed.Dist())
    prompts = [p for name in label_names for p in (name.lower(), f"no {name.lower()}")]
    zt = embed_texts(backbone, prompts, tok, max_text_len, device, precision)  # [2C, d]
    backbone.train(was_training)
    sim = (zi @ zt.t()).float().cpu()  # [N, 2C]
    scores = sim[:, 0::2] - sim[:, 1::2]  # [N, C]
    m = metrics.macro_auroc(scores, torch.tensor([r["labels"] for r in records]), label_names)
    return {"auroc": m["macro"], "per_class": m["per_class"], "undefined": m["undefined"],
            "prompts": prompts}
