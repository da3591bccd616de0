"""The nine downstream tasks of the paper's Table 2 (paper section 5.3): one table says what each
task reads and what kind of output it learns; the kind (a small object) holds the behaviour: the
head, the loss, the evaluation and the prediction. Nothing here or in data.py asks for a task by
name.

    task = TASKS["chexpert"]
    model = TaskModel(backbone, task, num_outputs(task, meta))  # + fresh 2-layer MLP on enc.pooled
    loss, stats = task.kind.loss(model, model(batch), batch, pad_id)
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

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import data, distributed, grounding, metrics, nlg, retrieval, stopping
from .distributed import autocast
from .generation import TextDecoder, encoder_memory, generate, generation_loss
from .images import ImageTransform
from .model import Mlp
from .objectives import itc_loss


# ---- what a task learns: the kinds of output, with their behaviour ------------------------------
class Classify:
    """A fresh 2-layer MLP on the pooled [IMG_CLS] ++ [CLS] states; the subclasses say what its
    logits mean (loss, metric, prediction)."""

    decodes, extra_fields, fine_tunes = False, (), True

    def build(self, model, n_out, max_gen_len):
        model.head = Mlp(2 * model.backbone.cfg.dim, 2 * model.backbone.cfg.dim, n_out)
        for lin in (model.head.fc1, model.head.fc2):  # the backbone's init: N(0, 0.02), zero bias
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, model, batch):
        return model.head(model.backbone(**model.encoder_inputs(batch), read="pooled").pooled)

    def evaluate(self, model, task, records, tok, ev):
        outs = []
        for batch in _loader(records, task, tok, ev, f"eval {task.name}"):
            with autocast(ev["precision"], ev["device"]):
                outs.append(model(data.to_device(batch, ev["device"])).float().cpu())
        # [N, n_out]: every rank's batches, in rank order
        logits = torch.cat([x for part in distributed.gather_objects(outs, ev["proc"])
                            for x in part])
        return self.score(logits, records, ev["meta"] or {}, task)

    def predict(self, model, batch, tok, meta, settings):
        return self.outputs(model(batch).float(), meta, model.task)


class MultiLabel(Classify):
    """Independent labels (multi-hot "labels"): BCE, macro AUROC, a probability per label."""

    target = "labels"

    def loss(self, model, out, batch, pad_id):
        loss = F.binary_cross_entropy_with_logits(out.float(), batch["labels"])
        return loss, {"loss": loss.detach()}

    def score(self, logits, records, meta, task):
        names = meta.get("label_names") or [task.name]
        # on logits: sigmoid would tie saturated scores
        m = metrics.macro_auroc(logits, torch.tensor([r["labels"] for r in records]), names)
        return {"auroc": m["macro"], "per_class": m["per_class"], "undefined": m["undefined"]}

    def outputs(self, logits, meta, task):
        names = meta.get("label_names") or [task.name]
        return [dict(zip(names, row)) for row in logits.sigmoid().tolist()]


class OneOf(Classify):
    """One class of the meta's label names ("label"): softmax CE, accuracy, a probability per
    class."""

    target = "label"

    def loss(self, model, out, batch, pad_id):
        # -1 marks an answer outside the vocabulary: it cannot be a training target (train+val
        # never hold one)
        loss = F.cross_entropy(out.float(), batch["label"], ignore_index=-1)
        return loss, {"loss": loss.detach()}

    def score(self, logits, records, meta, task):
        target = torch.tensor([r["label"] for r in records])
        return {"accuracy": metrics.accuracy(logits.argmax(-1), target)}

    def outputs(self, logits, meta, task):
        return [dict(zip(meta["label_names"], row)) for row in logits.softmax(-1).tolist()]


class Answer(OneOf):
    """One answer of the train+val answer vocabulary (VQA): CE, VQA accuracy (overall, open,
    closed), the answer string."""

    extra_fields = ("answer_type",)

    def score(self, logits, records, meta, task):
        target = torch.tensor([r["label"] for r in records])
        return metrics.vqa_accuracy(logits.argmax(-1), target, [r["answer_type"] for r in records])

    def outputs(self, logits, meta, task):
        return [meta["answers"][i] for i in logits.argmax(-1).tolist()]


class Retrieve:
    """Image-text retrieval through the pre-training ITC head: image-only and text-only passes,
    the ITC loss, Recall@K both ways (retrieval.py)."""

    target, decodes, extra_fields, fine_tunes = "", False, (), True

    def build(self, model, n_out, max_gen_len):
        pass  # the backbone's own ITC head

    def forward(self, model, batch):
        bb = model.backbone  # two passes: image + textual prompts, visual prompts + text
        return (bb.itc_embed(bb(image=batch["image"], read="pooled")),
                bb.itc_embed(bb(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"], padded=batch.get("padded"),
                                read="pooled")))

    def loss(self, model, out, batch, pad_id):
        loss, acc = itc_loss(*out, model.backbone.itc_scale())
        return loss, {"loss": loss.detach(), "itc_acc": acc}

    def evaluate(self, model, task, records, tok, ev):
        return retrieval.retrieval_metrics(getattr(model, "backbone", model), records, tok,
                                           ev["image_size"], ev["max_text_len"], ev["device"],
                                           ev["precision"], ev["rerank_top"], ev["print0"],
                                           ev["proc"])

    def predict(self, model, batch, tok, meta, settings):
        raise ValueError("a retrieval checkpoint has no predict: use encode_images / encode_texts "
                         "/ similarity")


class Generate:
    """Text generation (TS, ITG): a TextDecoder over the encoder's whole output sequence, next-token
    cross-entropy, the literature's NLG metrics after deterministic beam search."""

    target, decodes, extra_fields, fine_tunes = "target", True, (), True

    def build(self, model, n_out, max_gen_len):
        model.decoder = TextDecoder(model.backbone, max_gen_len)

    def forward(self, model, batch):
        memory, memory_mask = encoder_memory(model.backbone, **model.encoder_inputs(batch))
        return model.decoder(batch["target_ids"][:, :-1], memory, memory_mask)  # teacher forcing

    def loss(self, model, out, batch, pad_id):
        loss = generation_loss(out, batch["target_ids"][:, 1:], pad_id)
        return loss, {"loss": loss.detach()}

    def evaluate(self, model, task, records, tok, ev):
        hyps, refs = {}, {}
        for batch in _loader(records, task, tok, ev, f"beam search {task.name}"):
            batch = data.to_device(batch, ev["device"])
            with autocast(ev["precision"], ev["device"]):
                out = generate(model, batch, tok, ev["beam_size"], ev["max_gen_len"],
                               ev["length_penalty"])
            for i, text in zip(batch["index"].tolist(), out):
                r = records[i]
                # The reference is the record's own text, as in the literature's pycocoevalcap
                # runs (nlg_metrics PTB-tokenises both sides), never a tokenizer round trip of
                # it, which would rewrite it ("2.5 cm" -> "2. 5 cm") and drop [UNK] words.
                hyps[r["id"]], refs[r["id"]] = text, [r["target"]]
        # every rank's share, in rank order: the one-process order of the records
        hyps, refs = ({k: v for part in distributed.gather_objects(x, ev["proc"])
                       for k, v in part.items()} for x in (hyps, refs))
        return nlg.nlg_metrics(refs, hyps)

    def predict(self, model, batch, tok, meta, settings):
        return generate(model, batch, tok, settings.beam_size, settings.max_gen_len,
                        settings.length_penalty)


class Ground:
    """Phrase grounding (MS-CXR): a map over the film for each sentence, scored against the
    sentence's boxes; from a pre-training checkpoint only (zero_shot_grounding), nothing to
    fine-tune."""

    target, decodes, extra_fields, fine_tunes = "", False, ("boxes", "width", "height"), False


MULTI_LABEL, ONE_OF, ANSWER, RETRIEVE, GENERATE, GROUND = (MultiLabel(), OneOf(), Answer(),
                                                           Retrieve(), Generate(), Ground())


# Evaluations straight from a pre-training checkpoint, through its ITC head (eval.py)
def zero_shot_labels(backbone, task, records, meta, tok, rerank_top=0, print0=None, **kw):
    """Each label against its negation as text prompts (retrieval.zero_shot_classification)."""
    return retrieval.zero_shot_classification(backbone, records, meta["label_names"], tok, **kw)


def zero_shot_retrieval(backbone, task, records, meta, tok, rerank_top=0, print0=None, **kw):
    """Recall@K through the pre-training ITC head itself."""
    return evaluate(backbone, task, records, tok, rerank_top=rerank_top, print0=print0, **kw)


def zero_shot_grounding(backbone, task, records, meta, tok, rerank_top=0, print0=None, **kw):
    """CNR and mIoU of each map method (grounding.py) and of two baselines, a uniform map and the
    dataset's mean box prior (meta.json's, from its train split)."""
    return grounding.evaluate(backbone, records, tok, meta["box_prior"], **kw)


@dataclass(frozen=True)
class Task:
    name: str  # --task, and the prepared folder it reads (prepare.py writes one folder per task,
    #            named after it)
    image: bool  # the encoder reads the record's image
    text: tuple  # the record fields the encoder reads as text: none, one, or two read as one pair
    #              ([SEP]-joined); a field that holds a list (ROCO's captions) gives one of its
    #              texts per access
    kind: object  # what it learns: MULTI_LABEL | ONE_OF | ANSWER | RETRIEVE | GENERATE | GROUND
    width: object  # the MLP's outputs: a number, or the meta.json list it has one logit per item of
    selection_metric: str  # the metric that selects the checkpoint on val and fills Table 2
    zero_shot: Callable | None = None  # its evaluation straight from pre-training (eval.py)

    @property
    def folder(self):
        return self.name

    @property
    def target(self):
        """The record field the loss reads ("" for retrieval, whose targets are the pairs)."""
        return self.kind.target

    @property
    def pair(self):
        """Two text fields read as one [SEP]-joined input (RadNLI)."""
        return len(self.text) == 2

    @property
    def fields(self):
        """The record fields the task reads (data.read_split checks that they are there)."""
        return (("id",) + (("image",) if self.image else ()) + self.text +
                ((self.target,) if self.target else ()) + self.kind.extra_fields)


# one row per task, wider than 100 columns so that it reads as a table
TASKS = {t.name: t for t in (
    #    name              image  text                  kind         width          selection  zero-shot
    Task("chexpert",       True,  (),                   MULTI_LABEL, "label_names", "auroc",    zero_shot_labels),
    Task("rsna",           True,  (),                   MULTI_LABEL, 1,             "auroc"),
    Task("radnli",         False, ("text_a", "text_b"), ONE_OF,      "label_names", "accuracy"),
    Task("mimic_sum",      False, ("text_a",),          GENERATE,    0,             "ROUGE_L"),
    Task("roco_retrieval", True,  ("texts",),           RETRIEVE,    0,             "r_mean",   zero_shot_retrieval),
    Task("mimic_gen",      True,  (),                   GENERATE,    0,             "BLEU_4"),
    Task("vqa_rad",        True,  ("question",),        ANSWER,      "answers",     "overall"),
    Task("slake",          True,  ("question",),        ANSWER,      "answers",     "overall"),
    Task("medvqa2019",     True,  ("question",),        ANSWER,      "answers",     "overall"),
    Task("ms_cxr",         True,  ("text",),            GROUND,      0,             "cnr",      zero_shot_grounding),
)}


def get_task(name):
    if name not in TASKS:
        raise SystemExit(f"unknown task {name!r}; --task must be one of: {', '.join(TASKS)}")
    return TASKS[name]


def num_outputs(task, meta):
    """Width of the MLP head: the table's number, or one logit per label, NLI class or answer listed
    in meta.json."""
    return len(meta[task.width]) if isinstance(task.width, str) else task.width


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
    if task.kind.decodes:
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
    """The backbone with the task's head (task.kind.build): a fresh MLP(2D, 2D, n_out) on
    enc.pooled, the ITC head, or a TextDecoder.

    Build it after the pre-trained weights are in the backbone: the decoder copies the backbone's
    blocks when made.
    forward(batch) returns the head's output: logits [B, n_out], (image, text) ITC embeddings or
    decoder logits [B, T, V].
    """

    def __init__(self, backbone, task, n_out=0, max_gen_len=64):
        super().__init__()
        self.backbone, self.task = backbone, task
        task.kind.build(self, n_out, max_gen_len)

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
        return self.task.kind.forward(self, batch)

    def backbone_parameter_names(self):
        """The backbone's own backbone (lr_backbone); the task head and the decoder train at the
        head rate."""
        return {f"backbone.{n}" for n in self.backbone.backbone_parameter_names()}

    def no_weight_decay(self):
        """The backbone's, and the decoder's own position embeddings."""
        own = {n for n, _ in self.named_parameters() if n.startswith("decoder.position_embeddings")}
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | own


# ---- evaluation ----------------------------------------------------------------------------------
def _loader(records, task, tok, ev, desc):
    """This rank's evaluation batches in file order (val/test), made with the eval image transform:
    whole batches of the one-process run (distributed.shard); "index" stays the record's own."""
    # uint8: the model normalises it
    ds = data.TaskDataset(records, task, ImageTransform(ev["image_size"]).pixels)
    ds = torch.utils.data.Subset(ds, range(*distributed.shard(len(records), ev["proc"],
                                                              ev["batch_size"])))
    # its own generator: a DataLoader draws a seed from the global RNG otherwise, and validating
    # would change the dropout masks of the training steps after it
    loader = torch.utils.data.DataLoader(
        ds, batch_size=ev["batch_size"], shuffle=False, num_workers=ev["num_workers"],
        collate_fn=data.task_collate(tok, ev["max_text_len"], ev["max_gen_len"]),
        generator=torch.Generator(), worker_init_fn=stopping.leave_to_the_run)
    return tqdm(loader, desc=desc, disable=not (ev["progress"] and ev["proc"].main), leave=False)


@torch.no_grad()
def evaluate(model, task, records, tok, *, image_size, max_text_len, device, meta=None,
             max_gen_len=0, batch_size=64, precision="fp32", beam_size=1, length_penalty=1.0,
             rerank_top=0, num_workers=0, progress=True, print0=print, proc=None):
    """The task's metrics on `records` (fractions in [0, 1]), computed in eval mode; the metric
    named task.selection_metric is the one that selects the checkpoint. The one evaluation of
    finetune.py (val and test) and eval.py.

    proc (torchrun): each rank embeds, predicts or decodes its share of the records and the
    results are gathered in order, so every rank returns the one-process metrics; every rank must
    call it.

    model: the TaskModel; for retrieval also a bare backbone (zero-shot: the ITC head is the
    backbone's own).
    meta: the task's meta.json (label names for AUROC). max_gen_len, beam_size, length_penalty:
    generation only; rerank_top: retrieval only, re-scores each image's top candidates with the
    ITM head.
    """
    ev = dict(image_size=image_size, max_text_len=max_text_len, device=device, meta=meta,
              max_gen_len=max_gen_len, batch_size=batch_size, precision=precision,
              beam_size=beam_size, length_penalty=length_penalty, rerank_top=rerank_top,
              num_workers=num_workers, progress=progress, print0=print0,
              proc=proc or distributed.Dist())
    was_training = model.training
    model.eval()
    try:
        return task.kind.evaluate(model, task, records, tok, ev)
    finally:
        model.train(was_training)


def selection_score(task, m):
    """The selection metric as a number; an undefined one (None) ranks below every defined one."""
    v = m.get(task.selection_metric)
    return float("-inf") if v is None else float(v)
