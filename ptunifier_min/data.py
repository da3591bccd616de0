"""What training and evaluation read: prepared manifests, datasets and collates, the order of
batches, and the training subsets of fine-tuning.

    records = load_pretrain_records("data/prepared", ["roco", "medicat", "mimic_cxr"], "train")
    ds = PretrainDataset(records, ImageTransform(288).pixels, seed=0); ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=B, collate_fn=pretrain_collate(tok, max_len=48))

Folders come from prepare.py (one per downstream task, meta.json written last); every record is
type-checked as it is read (manifests.py). The paper resizes and center-crops to 288 x 288 and,
since medical texts are multi-sentence narratives, samples one random sentence of the text at every
access; both choices (and the random crop option) are a pure function of (seed, epoch, index), so a
resumed run sees the same data. A file that cannot be read is an error naming it, never a skipped
sample (prepare.py --on-bad-image drops bad images before training).
"""

import hashlib
import json
import math
import os
import random
import re

import torch

from . import manifests, stopping
from .images import load_image
from .tokenizer import encode_pairs, encode_texts



def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"incomplete or missing preparation: {folder} "
                                "(no meta.json; run prepare.py)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_split(folder, split, allow_empty=True, required=("id",)):
    """The records of {folder}/{split}.jsonl, each checked against the manifests' contract
    (manifests.check_record; `required`: the fields the caller reads) and with its file paths
    resolved: prepare.py writes those inside the prepared root relative to it, so that a root copied
    elsewhere keeps working (older manifests hold absolute paths, read as they are).
    allow_empty=False for a stage that cannot run on an empty split."""
    meta = read_meta(folder)  # the jsonl files of an interrupted preparation are not to be trusted
    path = os.path.join(folder, f"{split}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"split file not found: {path}")
    root = os.path.dirname(os.path.normpath(folder))
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: malformed JSON ({e})") from None
            problem = manifests.check_record(r, meta, required)
            if problem is None and seen.setdefault(r["id"], n) != n:
                problem = f"id {r['id']!r} occurs again; first at line {seen[r['id']]}"
            if problem:
                raise ValueError(f"{path}, line {n}: {problem}")
            for key in ("image", "image_cache"):
                if key in r and not os.path.isabs(r[key]):
                    r[key] = os.path.join(root, r[key])
            records.append(r)
    if not records and not allow_empty:
        raise ValueError(f"{path}: the {split} split has no records "
                         f"(prepared counts: {meta.get('counts')}); "
                         "this stage needs some")
    return records


def image_path(record):
    """The file to read for a record's image: its resized copy when prepare made one ("image_cache",
    see prepare.py --cache-short-side), else the original ("image"). Every reader of records' images
    goes through here (read_split has made both paths usable from the current folder)."""
    return record.get("image_cache") or record["image"]


# what a pre-training record must hold: an image and its texts
PRETRAIN_FIELDS = ("id", "image", "texts")


def load_pretrain_records(prepared_root, datasets, split):
    """Concatenate the pre-training records of several prepared folders; each record gains its
    "dataset" name."""
    records = []
    for name in datasets:
        folder = os.path.join(prepared_root, name)
        for r in read_split(folder, split, allow_empty=False, required=PRETRAIN_FIELDS):
            if not os.path.exists(image_path(r)):
                raise FileNotFoundError(f"{folder}/{split}.jsonl, id {r['id']}: " + (
                    f"image cache file not found: {r['image_cache']} "
                    f"(the resized copy of {r['image']}); run prepare again to rebuild it"
                    if r.get("image_cache") else f"image file not found: {r['image']}"))
            records.append({**r, "dataset": name})
    return records


# A sentence ends at . ! or ? followed by whitespace and a character that is not lower case
# ("e.g. the" stays whole).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[^a-z])")


def split_sentences(text):
    """Split a caption or report into sentences; never returns an empty list for a non-empty
    text."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    sentences = []
    for p in parts:
        # "1." / "2)" list numbers and other letterless fragments belong to the sentence that
        # follows them
        if sentences and not re.search(r"[A-Za-z]", sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {p}"
        else:
            sentences.append(p)
    return sentences or [text.strip()]


class PretrainDataset(torch.utils.data.Dataset):
    """Image-text pairs for pre-training: each access draws one text of the record and one sentence
    of that text.

    transform(img, rng) makes the image tensor: ImageTransform(size).pixels in the scripts (uint8
    [1, S, S], normalised on the device), or any other callable, e.g. an ImageTransform itself
    (float [3, S, S])."""

    def __init__(self, records, transform, seed=0):
        self.records, self.transform, self.seed, self.epoch = records, transform, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        # An image that fails to load is an error naming the file, never a skipped sample: skipping
        # here would leave one DDP rank with a shorter batch than the others, and the ITC all-gather
        # needs equal shapes on every rank. Bad images are dropped at prepare time instead
        # (prepare --on-bad-image skip).
        r = self.records[i]
        # seeded by a string (hashed with SHA-512 by random): the same in every worker, process and
        # Python run
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        text = rng.choice(split_sentences(rng.choice(r["texts"])))
        image = self.transform(load_image(image_path(r)), rng)
        return {"image": image, "text": text, "index": i, "image_id": file_id(r["image"])}


def file_id(path):
    """An int64 identity of an image file: 8 bytes of the BLAKE2 hash of its resolved path (not
    Python's hash(), which differs between processes). ITM needs it: the same figure can appear
    under two record ids, and a tensor of these can be gathered across ranks."""
    digest = hashlib.blake2b(os.path.realpath(path).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def pretrain_collate(tok, max_len):
    def collate(batch):
        ids, mask = encode_texts(tok, [b["text"] for b in batch], max_len)
        return {"image": torch.stack([b["image"] for b in batch]),  # [B, 1, S, S] uint8 pixels
                "input_ids": ids, "attention_mask": mask,  # [B, T]
                # known here, on the host; the model would otherwise ask the device
                # (PTUnifier.forward's `padded`)
                "padded": not bool(mask.all()),
                "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
                # [B] which file
                "image_id": torch.tensor([b["image_id"] for b in batch], dtype=torch.long)}
    return collate


# ---- batch order ---------------------------------------------------------------------------------
class BatchOrder:
    """Seeded epoch permutations cut into global batches; rank r takes rows [r*B, (r+1)*B) of each
    global batch.

    So 1 process with batch W*B and W processes with batch B see the same samples per step (DDP
    equivalence), and the order is a pure function of (seed, epoch): resuming at micro-batch k of an
    epoch just skips k global batches.
    """

    def __init__(self, n, batch_size, world, rank, seed, shuffle=True, drop_last=True):
        self.n, self.B, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.per_epoch = (n // (batch_size * world) if drop_last
                          else math.ceil(n / (batch_size * world)))
        if self.per_epoch == 0:
            raise ValueError(f"global batch {batch_size} x {world} is larger than the {n} "
                             "training samples: lower --batch-size")

    def batches(self, epoch, start=0):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                 if self.shuffle else torch.arange(self.n))
        G = self.B * self.world
        for b in range(start, self.per_epoch):
            rows = order[b * G:(b + 1) * G][self.rank * self.B:(self.rank + 1) * self.B]
            if len(rows):
                yield rows.tolist()


def micro_batches(dataset, order, collate, num_workers, start_micro=0):
    """Endless (epoch, micro-batch index, batch) from a BatchOrder, starting at a global micro-batch
    count."""
    epoch, start = divmod(start_micro, order.per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global
        # RNG, and a resumed run, which makes a loader where the uninterrupted one did not, would
        # then draw other dropout masks
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=list(order.batches(epoch, start)), collate_fn=collate,
            num_workers=num_workers, generator=torch.Generator(), persistent_workers=False,
            pin_memory=torch.cuda.is_available(), worker_init_fn=stopping.leave_to_the_run)
        for batch in loader:
            yield batch
        epoch, start = epoch + 1, 0


def next_micro_batches(batches, grad_accum, device):
    """The micro-batches of the next optimizer step, on the device. All of them are fetched before
    the first forward pass, so that what depends on the whole step (pre-training's MLM token count)
    can be computed first."""
    return [to_device(next(batches), device) for _ in range(grad_accum)]


def to_device(batch, device):
    """A batch's tensors on the device, copied without making the host wait. On CUDA they are copied
    from pinned memory (the loader pins its own; the host's draws added after it are pinned here): a
    copy from pageable memory may wait for the device."""
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin and not v.is_pinned() else v).to(device, non_blocking=True)
            if torch.is_tensor(v) else v for k, v in batch.items()}


# ---- downstream tasks ----------------------------------------------------------------------------
class TaskDataset(torch.utils.data.Dataset):
    """A prepared split of a downstream task as model inputs: what its tasks.Task entry says it
    reads (the image, the text fields) and its target. Random choices (crop, caption) are a pure
    function of (seed, epoch, i)."""

    def __init__(self, records, task, transform, seed=0, train=False):
        self.records, self.task, self.transform, self.seed, self.train, self.epoch = \
            records, task, transform, seed, train, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r, task = self.records[i], self.task
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        item = {"index": i}
        if task.image:
            item["image"] = self.transform(load_image(image_path(r)), rng)
        # a field with several texts (ROCO's captions): training reads any one, whole; evaluation
        # the first
        texts = [(rng.choice(r[f]) if self.train else r[f][0]) if isinstance(r[f], list) else r[f]
                 for f in task.text]
        if len(texts) == 2:
            item["text_a"], item["text_b"] = texts
        elif texts:
            item["text"] = texts[0]
        if task.target:
            item[task.target] = r[task.target]
        return item


def task_collate(tok, max_len, max_gen_len):
    """TaskDataset items -> a batch: images, labels, the encoded text or pair (at max_len) and the
    target text (at max_gen_len), whichever the items hold."""
    def collate(batch):
        out = {"index": torch.tensor([b["index"] for b in batch])}
        if "image" in batch[0]:
            out["image"] = torch.stack([b["image"] for b in batch])  # [B, 1, S, S] uint8 pixels
        if "labels" in batch[0]:
            out["labels"] = torch.tensor([b["labels"] for b in batch], dtype=torch.float)  # [B, C]
        if "label" in batch[0]:
            out["label"] = torch.tensor([b["label"] for b in batch], dtype=torch.long)  # [B]
        if "text_a" in batch[0]:  # [CLS] premise [SEP] hypothesis [SEP]
            out["input_ids"], out["attention_mask"] = encode_pairs(
                tok, [b["text_a"] for b in batch], [b["text_b"] for b in batch], max_len)
        elif "text" in batch[0]:
            out["input_ids"], out["attention_mask"] = encode_texts(
                tok, [b["text"] for b in batch], max_len)
        if "attention_mask" in out:  # known here, on the host (see pretrain_collate)
            out["padded"] = not bool(out["attention_mask"].all())
        # [CLS] w1 .. wn [SEP] [PAD]..: [CLS] is the decoder's bos, [SEP] its eos
        if "target" in batch[0]:
            out["target_ids"], _ = encode_texts(tok, [b["target"] for b in batch], max_gen_len)
        return out
    return collate


# ---- fine-tuning's splits ------------------------------------------------------------------------
# the smallest training subset --data-frac gives (1% of a small split can be 0 or 1 samples)
MIN_TRAIN = 8


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
