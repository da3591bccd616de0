"""The nine downstream tasks of the paper's Table 2 (paper section 5.3): one table says what each
task reads, its head, loss and metric; the rest of this file (and data.TaskDataset) reads the
table's columns, never a task's name.

    task = TASKS["chexpert"]
    model = TaskModel(backbone, task, num_outputs(task, meta))  # + fresh 2-layer MLP on enc.pooled
    loss, stats = task_loss(model, task, model(batch), batch, pad_id)
    m = evaluate(model, task, records, tok, meta=meta, image_size=288, max_text_len=40,
                 device=device)

The prompts stand in for the missing modality, so one backbone serves every task:
- image classification (CheXpert multi-label, RSNA one logit): image + textual prompts -> MLP ->
  BCE, macro AUROC;
- text classification (RadNLI): premise/hypothesis pair + visual prompts -> MLP -> softmax CE,
  accuracy;
- VQA (VQA-RAD, SLAKE, VQA-Med 2019): image + question -> MLP over the train+val answers -> CE,
  accuracy;
- retrieval (ROCO): image-only and text-only passes -> the pre-training ITC head -> ITC loss,
  Recall@K;
- summarisation (MIMIC findings -> impression): text-only pass, generation (MIMIC image ->
  findings): image-only pass; both feed the encoder's whole output sequence to a TextDecoder, scored
  after deterministic beam search.
"""

import hashlib
import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .images import ImageTransform
from .tokenizer import special_ids
from . import data, distributed, metrics, nlg, retrieval, stopping
from .distributed import autocast
from .generation import TextDecoder, beam_search, encoder_memory, generation_loss
from .model import Mlp
from .objectives import itc_loss

# the smallest training subset --data-frac gives (1% of a small split can be 0 or 1 samples)
MIN_TRAIN = 8


@dataclass(frozen=True)
class Task:
    name: str  # --task, and the prepared folder it reads (prepare.py writes one folder per task,
    #            named after it)
    image: bool  # the encoder reads the record's image
    text: tuple  # the record fields the encoder reads as text: none, one, or two read as one pair
    #              ([SEP]-joined); a field that holds a list (ROCO's captions) gives one of its
    #              texts per access
    head: str  # "mlp": a fresh MLP(2D, 2D, width) on enc.pooled | "itc": the pre-training ITC head
    #            on separate image-only and text-only passes | "decoder": a TextDecoder over the
    #            encoder's whole output sequence
    width: object  # the MLP's outputs: a number, or the meta.json list it has one logit per item of
    loss: str  # "bce" on "labels" (multi-hot) | "ce" on "label" (a class; -1 = none) | "itc" (the
    #            pairs are the targets) | "nll" on "target" (a text: next-token cross-entropy)
    metric: str  # how evaluate scores it: "auroc" | "accuracy" | "vqa" | "recall" | "nlg"
    main: str  # the metric that selects the checkpoint on val and fills Table 2

    @property
    def folder(self):
        return self.name

    @property
    def target(self):
        """The record field the loss reads ("" for ITC, whose targets are the pairs themselves)."""
        return {"bce": "labels", "ce": "label", "nll": "target"}.get(self.loss, "")

    @property
    def fields(self):
        """The record fields the task reads (data.read_split checks that they are there)."""
        return (("id",) + (("image",) if self.image else ()) + self.text +
                ((self.target,) if self.target else ()) +
                (("answer_type",) if self.metric == "vqa" else ()))


# one row per task, wider than 100 columns so that it reads as a table
TASKS = {t.name: t for t in (
    #    name              image  text                  head       width          loss   metric      main
    Task("chexpert",       True,  (),                   "mlp",     "label_names", "bce", "auroc",    "auroc"),
    Task("rsna",           True,  (),                   "mlp",     1,             "bce", "auroc",    "auroc"),
    Task("radnli",         False, ("text_a", "text_b"), "mlp",     "label_names", "ce",  "accuracy", "accuracy"),
    Task("mimic_sum",      False, ("text_a",),          "decoder", 0,             "nll", "nlg",      "ROUGE_L"),
    Task("roco_retrieval", True,  ("texts",),           "itc",     0,             "itc", "recall",   "r_mean"),
    Task("mimic_gen",      True,  (),                   "decoder", 0,             "nll", "nlg",      "BLEU_4"),
    Task("vqa_rad",        True,  ("question",),        "mlp",     "answers",     "ce",  "vqa",      "overall"),
    Task("slake",          True,  ("question",),        "mlp",     "answers",     "ce",  "vqa",      "overall"),
    Task("medvqa2019",     True,  ("question",),        "mlp",     "answers",     "ce",  "vqa",      "overall"),
)}


def get_task(name):
    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; --task must be one of: {', '.join(TASKS)}")
    return TASKS[name]


def num_outputs(task, meta):
    """Width of the MLP head: the table's number, or one logit per label, NLI class or answer listed
    in meta.json."""
    return len(meta[task.width]) if isinstance(task.width, str) else task.width


# ---- splits --------------------------------------------------------------------------------------
def subset(records, frac, seed):
    """A seeded share of the training records, at least MIN_TRAIN of them.

    One seeded shuffle of the id-sorted records, of which the first n are kept: the 1% subset lies
    inside the 10% one, and the subset does not depend on the file order or on anything but
    (ids, frac, seed).
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
    """At most n records (a seeded choice, in file order); n = 0 keeps them all. Bounds the cost of
    selection on val."""
    if not n or n >= len(records):
        return list(records)
    keep = set(random.Random(f"cap-{seed}").sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i in keep]


def split_hash(splits):
    """sha256 of the sorted train / val / test ids actually used: two runs with equal hashes saw the
    same samples."""
    h = hashlib.sha256()
    for name in ("train", "val", "test"):
        h.update(f"[{name}]\n".encode())
        for i in sorted(str(r["id"]) for r in splits[name]):
            h.update(f"{i}\n".encode())
    return h.hexdigest()


# ---- text lengths --------------------------------------------------------------------------------
def text_lengths(task, records, tok):
    """Untruncated token counts, special tokens included, of what the collate encodes for this task:
    {"inputs": [...], "targets": [...]}, each key only where the task has such texts. A pair input
    (RadNLI) counts [CLS] premise [SEP] hypothesis [SEP]; a record with several captions (ROCO)
    counts every one of them (training draws any of them)."""
    def count(texts):  # [CLS] text [SEP]
        return [len(e.ids) + 2 for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    out = {}
    if len(task.text) == 2:  # the pair shares one [CLS]: (a + 2) + (b + 2) - 1
        a, b = (count(r[f] for r in records) for f in task.text)
        out["inputs"] = [x + y - 1 for x, y in zip(a, b)]
    elif task.text:
        f = task.text[0]
        out["inputs"] = count(t for r in records
                              for t in (r[f] if isinstance(r[f], list) else [r[f]]))
    if task.head == "decoder":
        out["targets"] = count(r[task.target] for r in records)
    return out


def length_to_cover(lengths, share=0.95, multiple=8):
    """The smallest multiple of `multiple` that holds at least `share` of the texts whole, and the
    percentile itself (nearest rank: the length of the ceil(share * n)-th shortest text)."""
    p = sorted(lengths)[math.ceil(share * len(lengths)) - 1]
    return multiple * math.ceil(p / multiple), p


def truncated_shares(lengths, max_text_len, max_gen_len):
    """{"inputs": share, "targets": share} of texts longer than their limit, i.e. cut by the
    collate."""
    limit = {"inputs": max_text_len, "targets": max_gen_len}
    return {k: sum(n > limit[k] for n in v) / len(v) if v else 0.0 for k, v in lengths.items()}


# ---- model ---------------------------------------------------------------------------------------
class TaskModel(nn.Module):
    """The backbone with the task's head: a fresh MLP(2D, 2D, n_out) on enc.pooled, the ITC head, or
    a TextDecoder.

    Build it after the pre-trained weights are in the backbone: the decoder copies the backbone's
    blocks when made.
    forward(batch) returns the head's output: logits [B, n_out], (image, text) ITC embeddings or
    decoder logits [B, T, V].
    """

    def __init__(self, backbone, task, n_out=0, max_gen_len=64):
        super().__init__()
        self.backbone, self.task = backbone, task
        D = backbone.cfg.dim
        if task.head == "mlp":
            self.head = Mlp(2 * D, 2 * D, n_out)
            for lin in (self.head.fc1, self.head.fc2):  # the backbone's init: N(0, 0.02), zero bias
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        elif task.head == "decoder":
            self.decoder = TextDecoder(backbone, max_gen_len)

    def encoder_inputs(self, batch):
        """The backbone's keyword inputs for one pass over what this task reads (the other modality
        is prompted)."""
        inputs = {}
        if self.task.image:
            inputs["image"] = batch["image"]
        if self.task.text:
            inputs.update(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          # from the collate: the host need not ask the device
                          padded=batch.get("padded"))
        return inputs

    def forward(self, batch):
        bb = self.backbone
        if self.task.head == "mlp":
            return self.head(bb(**self.encoder_inputs(batch), read="pooled").pooled)
        if self.task.head == "itc":  # two passes: image + textual prompts, visual prompts + text
            return (bb.itc_embed(bb(image=batch["image"], read="pooled")),
                    bb.itc_embed(bb(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"],
                                    padded=batch.get("padded"), read="pooled")))
        memory, memory_mask = encoder_memory(bb, **self.encoder_inputs(batch))
        return self.decoder(batch["target_ids"][:, :-1], memory, memory_mask)  # teacher forcing


    def backbone_parameter_names(self):
        """The backbone's own backbone (lr_backbone); the task head and the decoder train at the
        head rate."""
        return {f"backbone.{n}" for n in self.backbone.backbone_parameter_names()}

    def no_weight_decay(self):
        """The backbone's, and the decoder's own position embeddings."""
        own = {n for n, _ in self.named_parameters() if n.startswith("decoder.position_embeddings")}
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | own


def task_loss(model, task, out, batch, pad_id):
    """The task's training loss from forward's output. `model` is the unwrapped TaskModel (for the
    ITC scale)."""
    if task.loss == "bce":
        loss = F.binary_cross_entropy_with_logits(out.float(), batch["labels"])
    elif task.loss == "ce":
        # -1 marks an answer outside the vocabulary: it cannot be a training target (train+val never
        # hold one)
        loss = F.cross_entropy(out.float(), batch["label"], ignore_index=-1)
    elif task.loss == "itc":
        loss, acc = itc_loss(*out, model.backbone.itc_scale())
        return loss, {"loss": loss.detach(), "itc_acc": acc}
    else:
        loss = generation_loss(out, batch["target_ids"][:, 1:], pad_id)
    return loss, {"loss": loss.detach()}


# ---- evaluation ----------------------------------------------------------------------------------
def _loader(records, task, tok, image_size, max_text_len, max_gen_len, batch_size, num_workers,
            proc):
    """This rank's evaluation batches in file order (val/test), made with the eval image transform:
    whole batches of the one-process run (distributed.shard); "index" stays the record's own."""
    # uint8: the model normalises it
    ds = data.TaskDataset(records, task, ImageTransform(image_size).pixels)
    ds = torch.utils.data.Subset(ds, range(*distributed.shard(len(records), proc, batch_size)))
    # its own generator: a DataLoader draws a seed from the global RNG otherwise, and validating
    # would change the dropout masks of the training steps after it
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers,
                                       collate_fn=data.task_collate(tok, max_text_len, max_gen_len),
                                       generator=torch.Generator(),
                                       worker_init_fn=stopping.leave_to_the_run)


@torch.no_grad()
def evaluate(model, task, records, tok, *, image_size, max_text_len, device, meta=None,
             max_gen_len=0, batch_size=64, precision="fp32", beam_size=1, length_penalty=1.0,
             rerank_top=0, num_workers=0, progress=True, print0=print, proc=None):
    """The task's metrics on `records` (fractions in [0, 1]), computed in eval mode; the metric
    named task.main is the one that selects the checkpoint. The one evaluation of finetune.py
    (val and test) and eval.py.

    proc (torchrun): each rank embeds, predicts or decodes its share of the records and the
    results are gathered in order, so every rank returns the one-process metrics; every rank must
    call it.

    model: the TaskModel; for retrieval also a bare backbone (zero-shot: the ITC head is the
    backbone's own).
    meta: the task's meta.json (label names for AUROC). max_gen_len, beam_size, length_penalty:
    generation only;
    rerank_top: retrieval only, re-scores each image's top candidates with the ITM head.
    """
    proc = proc or distributed.Dist()
    was_training = model.training
    model.eval()
    try:
        if task.metric == "recall":
            return retrieval.retrieval_metrics(getattr(model, "backbone", model), records, tok,
                                               image_size, max_text_len, device, precision,
                                               rerank_top, print0, proc)
        loader = _loader(records, task, tok, image_size, max_text_len, max_gen_len, batch_size,
                         num_workers, proc)
        if task.metric == "nlg":
            special = special_ids(tok)
            hyps, refs = {}, {}
            for batch in tqdm(loader, desc=f"beam search {task.name}",
                              disable=not (progress and proc.main),
                              leave=False):
                batch = data.to_device(batch, device)
                with autocast(precision, device):
                    memory, memory_mask = encoder_memory(model.backbone,
                                                         **model.encoder_inputs(batch))
                    # max_gen_len - 1 generated tokens, [SEP] included: the longest continuation of
                    # [CLS] training saw
                    out = beam_search(model.decoder, memory, memory_mask, special["cls"],
                                      special["sep"], special["pad"], beam_size, max_gen_len - 1,
                                      length_penalty)
                for i, ids in zip(batch["index"].tolist(), out):
                    r = records[i]
                    # The reference is the record's own text, as in the literature's pycocoevalcap
                    # runs (nlg_metrics PTB-tokenises both sides), never a tokenizer round trip of
                    # it, which would rewrite it ("2.5 cm" -> "2. 5 cm") and drop [UNK] words.
                    hyps[r["id"]], refs[r["id"]] = tok.decode(ids), [r["target"]]
            # every rank's share, in rank order: the one-process order of the records
            hyps = {k: v for part in distributed.gather_objects(hyps, proc) for k, v in part.items()}
            refs = {k: v for part in distributed.gather_objects(refs, proc) for k, v in part.items()}
            return nlg.nlg_metrics(refs, hyps)
        outs = []
        for batch in tqdm(loader, desc=f"eval {task.name}", disable=not (progress and proc.main),
                          leave=False):
            with autocast(precision, device):
                outs.append(model(data.to_device(batch, device)).float().cpu())
        # [N, n_out]: every rank's batches, in rank order
        logits = torch.cat([x for part in distributed.gather_objects(outs, proc) for x in part])
        if task.metric == "auroc":
            labels = torch.tensor([r["labels"] for r in records])
            names = (meta or {}).get("label_names") or [task.name]
            # on logits: sigmoid would tie saturated scores
            m = metrics.macro_auroc(logits, labels, names)
            return {"auroc": m["macro"], "per_class": m["per_class"], "undefined": m["undefined"]}
        pred = logits.argmax(-1)
        target = torch.tensor([r["label"] for r in records])
        if task.metric == "accuracy":
            return {"accuracy": metrics.accuracy(pred, target)}
        return metrics.vqa_accuracy(pred, target, [r["answer_type"] for r in records])
    finally:
        model.train(was_training)


@torch.no_grad()
def zero_shot_classification(backbone, records, label_names, tok, *, image_size, max_text_len,
                             device, precision="fp32", proc=None):
    """CheXpert without training, through the ITC head: per label, score = sim(image, "<finding>") -
    sim(image, "no <finding>") (the positive and negative prompts of CheXzero), then macro AUROC.
    proc (torchrun): each rank embeds its share of the images."""
    was_training = backbone.training
    backbone.eval()
    batch = retrieval.IMAGE_BATCH
    zi = retrieval.embed_sharded(
        lambda p: retrieval.embed_images(backbone, p, image_size, device, precision, batch),
        [data.image_path(r) for r in records], batch, device, proc or distributed.Dist())
    prompts = [p for name in label_names for p in (name.lower(), f"no {name.lower()}")]
    zt = retrieval.embed_texts(backbone, prompts, tok, max_text_len, device, precision)  # [2C, d]
    backbone.train(was_training)
    sim = (zi @ zt.t()).float().cpu()  # [N, 2C]
    scores = sim[:, 0::2] - sim[:, 1::2]  # [N, C]
    m = metrics.macro_auroc(scores, torch.tensor([r["labels"] for r in records]), label_names)
    return {"auroc": m["macro"], "per_class": m["per_class"], "undefined": m["undefined"],
            "prompts": prompts}


def main_score(task, m):
    """The selection metric as a number; an undefined one (None) ranks below every defined one."""
    v = m.get(task.main)
    return float("-inf") if v is None else float(v)
