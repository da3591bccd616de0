"""Image-text retrieval with the ITC head: one image-only pass per image, one text-only pass per
text, one matrix product.

    sim, txt_image = similarity(model, records, tok, image_size, max_len, device)
    metrics.retrieval_recall(sim, txt_image)
    retrieval_metrics(model, records, tok, image_size, max_len, device)  # six recalls + mean, timed

The authors scored every image-text pair with the ITM cross-encoder (N^2 fused passes for N pairs);
the dual-encoder use of the same backbone that PTUnifier's prompts make possible needs only 2N
passes. `rerank_itm` optionally re-scores each query's top candidates with the ITM head.
"""

import time

import torch

from . import data, metrics
from .distributed import autocast
from .model import matmul_fp32


@torch.no_grad()
def embed_images(model, paths, image_size, device, precision="fp32", batch_size=64):
    """[N, d] ITC embeddings of image files: image-only passes, the evaluation transform."""
    transform = data.ImageTransform(image_size)
    out = []
    for i in range(0, len(paths), batch_size):
        # uint8 pixels [b, 1, S, S]: the model normalises them on the device
        x = torch.stack([transform.pixels(data.load_image(p))
                         for p in paths[i:i + batch_size]]).to(device)
        with autocast(precision, device):
            out.append(model.itc_embed(model(image=x, read="pooled")))
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, texts, tok, max_len, device, precision="fp32", batch_size=128):
    """[N, d] ITC embeddings of texts: text-only passes."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = data.encode_texts(tok, texts[i:i + batch_size], max_len)
        # read here, on the host's copy: the model need not ask the device
        padded = not bool(mask.all())
        with autocast(precision, device):
            out.append(model.itc_embed(model(input_ids=ids.to(device),
                                             attention_mask=mask.to(device), padded=padded,
                                             read="pooled")))
    return torch.cat(out)


def pairs(records):
    """Flatten records with several texts: (image paths, texts, index of each text's image)."""
    texts, txt_image = [], []
    for i, r in enumerate(records):
        for t in r["texts"]:
            texts.append(t)
            txt_image.append(i)
    return [data.image_path(r) for r in records], texts, torch.tensor(txt_image)


@torch.no_grad()
def similarity(model, records, tok, image_size, max_len, device, precision="fp32"):
    """[N_img, N_txt] cosine similarities of the ITC embeddings, and the image index of every
    text."""
    was_training = model.training
    model.eval()
    paths, texts, txt_image = pairs(records)
    zi = embed_images(model, paths, image_size, device, precision)
    zt = embed_texts(model, texts, tok, max_len, device, precision)
    model.train(was_training)
    # fp32 even inside a caller's autocast: a bf16 product ties and swaps close candidates
    return matmul_fp32(zi, zt.t()).cpu(), txt_image


@torch.no_grad()
def rerank_itm(model, sim, records, tok, image_size, max_len, device, top=16, precision="fp32"):
    """Image-to-text re-ranking: each image row's top-`top` ITC candidates are re-ordered by their
    ITM margin (logit matched - logit not matched) and stay above every other candidate of the
    row, whatever the margins' sign and size: they get the scores row max + top, ..., row max + 1
    in margin order (ties keep the ITC order), the rest keep their ITC similarity. The columns of
    the result are no longer comparable across images, so use it for image-to-text recall only."""
    paths, texts, _ = pairs(records)
    transform = data.ImageTransform(image_size)
    out = sim.clone().float()
    for i in range(sim.shape[0]):
        cand = sim[i].topk(min(top, sim.shape[1])).indices  # best ITC first
        img = (transform.pixels(data.load_image(paths[i]))[None]
               .expand(len(cand), -1, -1, -1).to(device))
        ids, mask = data.encode_texts(tok, [texts[j] for j in cand.tolist()], max_len)
        with autocast(precision, device):
            logits = model.itm_logits(model(image=img, input_ids=ids.to(device),
                                            attention_mask=mask.to(device),
                                            padded=not bool(mask.all()),  # host's mask
                                            read="pooled").pooled)
        margin = (logits[:, 1].float() - logits[:, 0].float()).cpu()
        # [top] candidates by margin, best first
        order = margin.argsort(descending=True, stable=True)
        out[i, cand[order]] = out[i].max() + torch.arange(len(cand), 0, -1, dtype=out.dtype)
    return out


def retrieval_metrics(model, records, tok, image_size, max_len, device, precision="fp32",
                      rerank_top=0, print0=None):
    """Recall@1/5/10 both ways through the ITC head of the backbone `model` (zero-shot or
    fine-tuned), r_mean (their mean, the selection metric), and the seconds of the 2N encoder passes
    and the one product, which `print0` reports. rerank_top > 0 re-ranks each image's top
    candidates with the ITM head (image-to-text recall only)."""
    t0 = time.perf_counter()
    sim, txt_image = similarity(model, records, tok, image_size, max_len, device, precision)
    seconds = time.perf_counter() - t0
    if print0:
        print0(f"retrieval: {len(records):,} images x {len(txt_image):,} texts = "
            f"{len(records) + len(txt_image):,} encoder passes and one matrix product in "
            f"{seconds:.1f} s")
    out = metrics.retrieval_recall(sim, txt_image)
    # ITM re-scores each image's candidate texts: it changes the image-to-text ranking only
    if rerank_top:
        reranked = rerank_itm(model, sim, records, tok, image_size, max_len, device, rerank_top,
                              precision)
        out.update({k: v for k, v in metrics.retrieval_recall(reranked, txt_image).items()
                    if k.startswith("i2t")})
    out["r_mean"] = sum(out.values()) / len(out)  # the selection metric: mean of the six recalls
    out.update(seconds=seconds, pairs=len(records))
    return out
