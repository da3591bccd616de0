"""The nine downstream tasks of the paper's Table 2: their inputs, heads, losses and evaluation (paper section 5.3).

    task = get_task("chexpert")
    model = TaskModel(backbone, task, n_out=5)                  # the backbone + a fresh two-layer MLP on enc.pooled
    loss, stats = task_loss(model, task, model(batch), batch, pad_id)
    metrics = evaluate(model, task, records, meta, tok, cfg, device)

Which pass each task runs (the prompts stand in for the missing modality, so one backbone serves all of them):
- image classification (CheXpert multi-label, RSNA one logit): image + textual prompts -> MLP -> BCE, macro AUROC;
- text classification (RadNLI): premise/hypothesis pair + visual prompts -> MLP -> softmax CE, accuracy;
- VQA (VQA-RAD, SLAKE, VQA-Med 2019): image + question -> MLP over the train+val answers -> CE, accuracy;
- retrieval (ROCO): image-only and text-only passes -> the pre-training ITC head -> ITC loss, Recall@K;
- summarisation (MIMIC findings -> impression): text-only pass, generation (MIMIC image -> findings): image-only pass;
  both feed the encoder's whole output sequence to a TextDecoder, scored after deterministic beam search.
"""

import hashlib
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import data, metrics, retrieval
from .engine import autocast
from .generation import TextDecoder, beam_search, encoder_memory, generation_loss
from .model import Mlp
from .objectives import itc_loss

CLASSIFY = ("multilabel", "binary", "nli", "vqa")
GENERATE = ("summarize", "generate")
IMAGE_INPUT = ("multilabel", "binary", "vqa", "retrieval", "generate")
MIN_TRAIN = 8  # the smallest training subset --data-frac gives (1% of a small split can be 0 or 1 samples)


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # the prepared folder it reads (prepare.py writes one per task)
    kind: str  # multilabel | binary | nli | vqa | retrieval | summarize | generate
    main: str  # the metric that selects the checkpoint on val and fills Table 2


TASKS = {t.name: t for t in (
    Task("chexpert", "chexpert", "multilabel", "auroc"),
    Task("rsna", "rsna", "binary", "auroc"),
    Task("radnli", "radnli", "nli", "accuracy"),
    Task("mimic_sum", "mimic_sum", "summarize", "ROUGE_L"),
    Task("roco_retrieval", "roco_retrieval", "retrieval", "r_mean"),
    Task("mimic_gen", "mimic_gen", "generate", "BLEU_4"),
    Task("vqa_rad", "vqa_rad", "vqa", "overall"),
    Task("slake", "slake", "vqa", "overall"),
    Task("medvqa2019", "medvqa2019", "vqa", "overall"),
)}


def get_task(name):
    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; --task must be one of: {', '.join(TASKS)}")
    return TASKS[name]


def num_outputs(task, meta):
    """Width of the classification head: one logit per label, per NLI class or per answer of the vocabulary."""
    if task.kind == "binary":
        return 1
    if task.kind == "vqa":
        return len(meta["answers"])
    if task.kind in ("multilabel", "nli"):
        return len(meta["label_names"])
    return 0


# ---- splits ----------------------------------------------------------------------------------------------------------
def subset(records, frac, seed):
    """A seeded share of the training records, at least MIN_TRAIN of them.

    One seeded shuffle of the id-sorted records, of which the first n are kept: the 1% subset lies inside the 10% one,
    and the subset does not depend on the file order or on anything but (ids, frac, seed).
    """
    if not 0 < frac <= 1:
        raise SystemExit(f"--data-frac must be in (0, 1], got {frac}")
    if frac == 1:
        return list(records)
    order = sorted(records, key=lambda r: r["id"])
    random.Random(f"data-frac-{seed}").shuffle(order)
    n = min(len(order), max(MIN_TRAIN, round(frac * len(order))))
    return sorted(order[:n], key=lambda r: r["id"])


def cap(records, n, seed):
    """At most n records (a seeded choice, in file order); n = 0 keeps them all. Bounds the cost of selection on val."""
    if not n or n >= len(records):
        return list(records)
    keep = set(random.Random(f"cap-{seed}").sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i in keep]


def split_hash(splits):
    """sha256 of the sorted train / val / test ids actually used: two runs with equal hashes saw the same samples."""
    h = hashlib.sha256()
    for name in ("train", "val", "test"):
        h.update(f"[{name}]\n".encode())
        for i in sorted(str(r["id"]) for r in splits[name]):
            h.update(f"{i}\n".encode())
    return h.hexdigest()


# ---- data ------------------------------------------------------------------------------------------------------------
class TaskDataset(torch.utils.data.Dataset):
    """A prepared split as model inputs; random choices (crop, caption) are a pure function of (seed, epoch, i)."""

    def __init__(self, records, task, transform, seed=0, train=False):
        self.records, self.task, self.transform, self.seed, self.train, self.epoch = \
            records, task, transform, seed, train, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r, kind = self.records[i], self.task.kind
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        item = {"index": i}
        if kind in IMAGE_INPUT:
            item["image"] = self.transform(data.load_image(r["image"]), rng)
        if kind in ("multilabel", "binary"):
            item["labels"] = r["labels"]
        elif kind == "nli":
            item.update(text_a=r["text_a"], text_b=r["text_b"], label=r["label"])
        elif kind == "vqa":
            item.update(text=r["question"], label=r["label"])
        elif kind == "retrieval":  # train on one of the image's captions, whole (evaluation scores whole captions)
            item["text"] = rng.choice(r["texts"]) if self.train else r["texts"][0]
        elif kind == "summarize":
            item.update(text=r["text_a"], target=r["target"])
        elif kind == "generate":
            item["target"] = r["target"]
        return item


def text_lengths(task, records, tok):
    """Untruncated token counts, special tokens included, of what the collate encodes for this task:
    {"inputs": [...], "targets": [...]}, each key only where the task has such texts. A RadNLI input counts
    [CLS] premise [SEP] hypothesis [SEP]; a ROCO record counts every caption (training draws any of them)."""
    def count(texts):  # [CLS] text [SEP]
        return [len(e.ids) + 2 for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    kind, out = task.kind, {}
    if kind == "nli":  # the pair shares one [CLS]: (a + 2) + (b + 2) - 1
        out["inputs"] = [a + b - 1 for a, b in zip(count(r["text_a"] for r in records),
                                                   count(r["text_b"] for r in records))]
    elif kind == "vqa":
        out["inputs"] = count(r["question"] for r in records)
    elif kind == "retrieval":
        out["inputs"] = count(t for r in records for t in r["texts"])
    elif kind == "summarize":
        out["inputs"] = count(r["text_a"] for r in records)
    if kind in GENERATE:
        out["targets"] = count(r["target"] for r in records)
    return out


def length_to_cover(lengths, share=0.95, multiple=8):
    """The smallest multiple of `multiple` that holds at least `share` of the texts whole, and the percentile itself
    (nearest rank: the length of the ceil(share * n)-th shortest text)."""
    p = sorted(lengths)[math.ceil(share * len(lengths)) - 1]
    return multiple * math.ceil(p / multiple), p


def truncated_shares(lengths, max_text_len, max_gen_len):
    """{"inputs": share, "targets": share} of texts longer than their limit, i.e. cut by the collate."""
    limit = {"inputs": max_text_len, "targets": max_gen_len}
    return {k: sum(n > limit[k] for n in v) / len(v) if v else 0.0 for k, v in lengths.items()}


def make_collate(task, tok, max_len, max_gen_len):
    def collate(batch):
        out = {"index": torch.tensor([b["index"] for b in batch])}
        if "image" in batch[0]:
            out["image"] = torch.stack([b["image"] for b in batch])  # [B, 3, S, S]
        if "labels" in batch[0]:
            out["labels"] = torch.tensor([b["labels"] for b in batch], dtype=torch.float)  # [B, C]
        if "label" in batch[0]:
            out["label"] = torch.tensor([b["label"] for b in batch], dtype=torch.long)  # [B]
        if "text_a" in batch[0]:  # [CLS] premise [SEP] hypothesis [SEP]
            out["input_ids"], out["attention_mask"] = data.encode_pairs(
                tok, [b["text_a"] for b in batch], [b["text_b"] for b in batch], max_len)
        elif "text" in batch[0]:
            out["input_ids"], out["attention_mask"] = data.encode_texts(tok, [b["text"] for b in batch], max_len)
        if "target" in batch[0]:  # [CLS] w1 .. wn [SEP] [PAD]..: [CLS] is the decoder's bos, [SEP] its eos
            out["target_ids"], _ = data.encode_texts(tok, [b["target"] for b in batch], max_gen_len)
        return out
    return collate


# ---- model -----------------------------------------------------------------------------------------------------------
class TaskModel(nn.Module):
    """The backbone with the task's head: a fresh MLP(2D, 2D, n_out) on enc.pooled, the ITC head, or a TextDecoder.

    Build it after the pre-trained weights are in the backbone: the decoder copies the backbone's blocks when made.
    forward(batch) returns the head's output: logits [B, n_out], (image, text) ITC features or decoder logits [B, T, V].
    """

    def __init__(self, backbone, task, n_out=0, max_gen_len=64):
        super().__init__()
        self.backbone, self.kind = backbone, task.kind
        D = backbone.cfg.dim
        if task.kind in CLASSIFY:
            self.head = Mlp(2 * D, 2 * D, n_out)
            for lin in (self.head.fc1, self.head.fc2):  # the backbone's init: N(0, 0.02), zero bias
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        elif task.kind in GENERATE:
            self.decoder = TextDecoder(backbone, max_gen_len)

    def encoder_inputs(self, batch):
        """The backbone's keyword inputs: the modality (or pair) this task reads."""
        inputs = {}
        if self.kind in IMAGE_INPUT and self.kind != "retrieval":
            inputs["image"] = batch["image"]
        if self.kind in ("nli", "vqa", "summarize"):
            inputs.update(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return inputs

    def forward(self, batch):
        bb = self.backbone
        if self.kind in CLASSIFY:
            return self.head(bb(**self.encoder_inputs(batch)).pooled)
        if self.kind == "retrieval":  # image + textual prompts, visual prompts + text
            zi = bb.itc_features(bb(image=batch["image"]).pooled, "image")
            zt = bb.itc_features(bb(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooled,
                                 "text")
            return zi, zt
        memory, memory_mask = encoder_memory(bb, **self.encoder_inputs(batch))
        return self.decoder(batch["target_ids"][:, :-1], memory, memory_mask)  # teacher forcing


def task_loss(model, task, out, batch, pad_id):
    """The task's training loss from forward's output. `model` is the unwrapped TaskModel (for the ITC scale)."""
    if task.kind in ("multilabel", "binary"):
        loss = F.binary_cross_entropy_with_logits(out.float(), batch["labels"])
    elif task.kind in ("nli", "vqa"):
        # -1 marks an answer outside the vocabulary: it cannot be a training target (train+val never hold one)
        loss = F.cross_entropy(out.float(), batch["label"], ignore_index=-1)
    elif task.kind == "retrieval":
        loss, acc = itc_loss(*out, model.backbone.itc_scale())
        return loss, {"loss": loss.detach(), "itc_acc": acc}
    else:
        loss = generation_loss(out, batch["target_ids"][:, 1:], pad_id)
    return loss, {"loss": loss.detach()}


def freeze_unreached(model, loss):
    """Turn off gradients of the parameters this task's loss never reaches (e.g. the MLM and ITM heads for
    classification, the visual prompt pool for image-only input), found by one backward pass of a real batch.

    DDP without find_unused_parameters needs every trainable parameter to receive a gradient every step, and what a
    task reaches depends on the pass it runs and the prompt mode; measuring it is simpler and safer than listing it.
    """
    model.zero_grad(set_to_none=True)
    loss.backward()
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    return frozen


# ---- evaluation ------------------------------------------------------------------------------------------------------
def loader(records, task, tok, cfg, train=False):
    """Evaluation batches in file order (val/test), made with the eval image transform."""
    ds = TaskDataset(records, task, data.ImageTransform(cfg.model.image_size), cfg.seed, train)
    # its own generator: a DataLoader draws a seed from the global RNG otherwise, and validating would change the
    # dropout masks of the training steps after it
    return torch.utils.data.DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                                       collate_fn=make_collate(task, tok, cfg.model.max_text_len, cfg.max_gen_len),
                                       generator=torch.Generator())


def _to(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, task, records, meta, tok, cfg, device, precision="fp32", progress=True, say=print, rerank_top=0):
    """The task's metrics on `records` (fractions in [0, 1]), computed by the unwrapped model in eval mode.

    The metric named task.main is the one that selects the checkpoint; `rerank_top` re-scores each image's top
    candidates with the ITM head (retrieval only).
    """
    was_training = model.training
    model.eval()
    try:
        if task.kind == "retrieval":
            return retrieval_metrics(model.backbone, records, tok, cfg, device, precision, say, rerank_top)
        if task.kind in GENERATE:
            return _evaluate_generation(model, task, records, tok, cfg, device, precision, progress)
        outs = []
        for batch in tqdm(loader(records, task, tok, cfg), desc=f"eval {task.name}", disable=not progress,
                          leave=False):
            with autocast(precision, device):
                outs.append(model(_to(batch, device)).float().cpu())
        logits = torch.cat(outs)  # [N, n_out]
        if task.kind in ("multilabel", "binary"):
            labels = torch.tensor([r["labels"] for r in records])
            names = meta.get("label_names") or [task.name]
            m = metrics.macro_auroc(logits, labels, names)  # on logits: sigmoid would tie saturated scores
            return {"auroc": m["macro"], "per_class": m["per_class"], "undefined": m["undefined"]}
        pred = logits.argmax(-1)
        target = torch.tensor([r["label"] for r in records])
        if task.kind == "nli":
            return {"accuracy": metrics.accuracy(pred, target)}
        return metrics.vqa_accuracy(pred, target, [r["answer_type"] for r in records])
    finally:
        model.train(was_training)


def retrieval_metrics(backbone, records, tok, cfg, device, precision="fp32", say=print, rerank_top=0):
    """Recall@1/5/10 both ways through the ITC head (zero-shot or fine-tuned), timed: 2N encoder passes, one product."""
    t0 = time.perf_counter()
    sim, txt_image = retrieval.similarity(backbone, records, tok, cfg.model.image_size, cfg.model.max_text_len,
                                          device, precision)
    seconds = time.perf_counter() - t0
    say(f"retrieval: {len(records):,} images x {len(txt_image):,} texts = {len(records) + len(txt_image):,} encoder "
        f"passes and one matrix product in {seconds:.1f} s")
    out = metrics.retrieval_recall(sim, txt_image)
    if rerank_top:  # ITM re-scores each image's candidate texts: it changes the image-to-text ranking only
        reranked = retrieval.rerank_itm(backbone, sim, records, tok, cfg.model.image_size, cfg.model.max_text_len,
                                        device, rerank_top, precision)
        out.update({k: v for k, v in metrics.retrieval_recall(reranked, txt_image).items() if k.startswith("i2t")})
    out["r_mean"] = sum(out.values()) / len(out)  # the selection metric: mean of the six recalls
    out.update(seconds=seconds, pairs=len(records))
    return out


def _evaluate_generation(model, task, records, tok, cfg, device, precision, progress):
    special = data.special_ids(tok)
    hyps, refs = {}, {}
    for batch in tqdm(loader(records, task, tok, cfg), desc=f"beam search {task.name}", disable=not progress,
                      leave=False):
        batch = _to(batch, device)
        with autocast(precision, device):
            memory, memory_mask = encoder_memory(model.backbone, **model.encoder_inputs(batch))
            # max_gen_len - 1 generated tokens, [SEP] included: the longest continuation of [CLS] that training saw
            out = beam_search(model.decoder, memory, memory_mask, special["cls"], special["sep"], special["pad"],
                              cfg.beam_size, cfg.max_gen_len - 1, cfg.length_penalty)
        for i, ids in zip(batch["index"].tolist(), out):
            r = records[i]
            # The reference goes through the same WordPiece round trip as the hypothesis (untruncated), so that
            # "4.5" vs "4. 5" or "x-ray" vs "x - ray" spacing differences are not scored as wrong words.
            ref = tok.decode(tok.encode(r["target"], add_special_tokens=False).ids)
            hyps[r["id"]], refs[r["id"]] = tok.decode(ids), [ref]
    return metrics.nlg_metrics(refs, hyps)


@torch.no_grad()
def zero_shot_classification(backbone, records, label_names, tok, cfg, device, precision="fp32"):
    """CheXpert without training, through the ITC head: per label, score = sim(image, "<finding>") -
    sim(image, "no <finding>") (the positive and negative prompts of CheXzero), then macro AUROC."""
    was_training = backbone.training
    backbone.eval()
    zi = retrieval.embed_images(backbone, [r["image"] for r in records], cfg.model.image_size, device, precision)
    prompts = [p for name in label_names for p in (name.lower(), f"no {name.lower()}")]
    zt = retrieval.embed_texts(backbone, prompts, tok, cfg.model.max_text_len, device, precision)  # [2C, d]
    backbone.train(was_training)
    sim = (zi @ zt.t()).float().cpu()  # [N, 2C]
    scores = sim[:, 0::2] - sim[:, 1::2]  # [N, C]
    m = metrics.macro_auroc(scores, torch.tensor([r["labels"] for r in records]), label_names)
    return {"auroc": m["macro"], "per_class": m["per_class"], "undefined": m["undefined"], "prompts": prompts}


def main_score(task, m):
    """The selection metric as a number; an undefined one (None) ranks below every defined one."""
    v = m.get(task.main)
    return float("-inf") if v is None else float(v)
