"""The contract of the prepared manifests, checked where they are read, and a run's record of the
data it read, compared by content rather than by place.

    problem = check_record(record, meta, required=("id", "image", "texts"))  # None, or what's wrong
    record = data_record(root, {"roco": {"train": records}}, tokenizer_path)  # -> <out>/data.json
    differences(saved, record)  # one line per file (or split, or tokenizer) whose content differs

prepare.py writes one JSON object per line of {split}.jsonl, and every field it writes has one type
(FIELDS). data.read_split refuses a record that breaks it, naming the file, the line and the field:
a hand-edited or foreign manifest fails where it is read, not as a shape error in a batch, or worse,
as a string read character by character.

A run records the sha256 of every manifest it read (by its path under the prepared root), of the
ids of every split it read, and of its tokenizer file, in <out>/data.json and in every checkpoint.
A resumed run may find the data somewhere else (a root copied to another disk: --data-root) but
must find the same content; eval.py refuses to score a checkpoint on splits other than those it
was trained against (a re-preparation with another --seed moves training records into test).
"""

import hashlib
import math
import os

JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "true or false",
               list: "a list", dict: "an object", type(None): "null"}


def json_type(value):
    """How JSON spells the type of a parsed value: 'a string', 'a list', 'null' ..."""
    return JSON_TYPES.get(type(value), type(value).__name__)


def _text(v):
    return isinstance(v, str) and bool(v.strip())


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # bool is an int in Python


def _box(b):
    """[x, y, w, h]: four finite numbers, w and h > 0 (JSON's NaN and Infinity are not)."""
    return (isinstance(b, list) and len(b) == 4 and all(map(_number, b))
            and all(map(math.isfinite, b)) and b[2] > 0 and b[3] > 0)


def _pixels(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# Every field prepare.py writes: a test of its value, and what the value must be.
FIELDS = {
    "id": (_text, "a non-empty string"),
    "image": (_text, "a file path (a non-empty string)"),
    "image_cache": (_text, "a file path (a non-empty string)"),
    "texts": (lambda v: isinstance(v, list) and bool(v) and all(map(_text, v)),
              "a non-empty list of non-empty strings"),
    **{k: (_text, "a non-empty string")
       for k in ("text", "text_a", "text_b", "question", "answer", "target", "category")},
    "answer_type": (lambda v: v in ("open", "closed"), "'open' or 'closed'"),
    "label": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer class index"),
    "labels": (lambda v: isinstance(v, list) and all(_number(x) and x in (0, 1) for x in v),
               "a list of 0 / 1 values"),
    "boxes": (lambda v: isinstance(v, list) and all(map(_box, v)),
              "a list of boxes [x, y, w, h] (finite numbers, w and h > 0)"),
    **{k: (_pixels, "a positive whole number of pixels") for k in ("width", "height")},
}
# A phrase-grounding record (MS-CXR) holds a sentence and where it is on its film: one box at least.
GROUNDING = ("text", "boxes")


def check_record(record, meta, required=("id",)):
    """None when the record is what prepare.py writes, else what is wrong with it, in words.

    `required`: the fields the reader needs (tasks.Task.fields); every field that is there must
    have its type (FIELDS), and a class index or a multi-hot row must fit the classes meta.json
    lists ("label": -1 only for a VQA answer outside the train + val vocabulary)."""
    if not isinstance(record, dict):
        return f"the record is {json_type(record)}; expected a JSON object"
    missing = [k for k in required if k not in record]
    if missing:
        return f"missing field(s) {missing}; fields found: {sorted(record)}"
    for key, (ok, what) in FIELDS.items():
        if key in record and not ok(record[key]):
            value = record[key]
            return f"field {key!r} is {json_type(value)} ({str(value)[:60]!r}); expected {what}"
    if all(k in record for k in GROUNDING) and not record["boxes"]:
        return "field 'boxes' is an empty list; a sentence to ground needs at least one box"
    classes = meta.get("answers", meta.get("label_names"))
    if "label" in record and isinstance(classes, list):
        low = -1 if "answers" in meta else 0
        if not low <= record["label"] < len(classes):
            return (f"field 'label' is {record['label']}; expected {low} .. {len(classes) - 1} "
                    f"(meta.json lists {len(classes)} classes)")
    names = meta.get("label_names")
    if "labels" in record and isinstance(names, list) and len(record["labels"]) != len(names):
        return (f"field 'labels' holds {len(record['labels'])} values; expected one per label of "
                f"meta.json ({len(names)}: {names})")
    return None


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ids_hash(records):
    """sha256 of a split's sorted ids: which samples it holds, wherever its files are."""
    return hashlib.sha256("".join(f"{i}\n" for i in sorted(r["id"] for r in records))
                          .encode("utf-8")).hexdigest()


def data_record(root, read, tokenizer):
    """What a run read, by content: {"root", "files": {"<folder>/<file>": sha256}, "splits":
    {folder: {split: ids_hash}}, "tokenizer": {"path", "sha256"}}. `read` is {folder: {split:
    records}}, the splits the run read; each folder's meta.json is recorded with them."""
    files, splits = {}, {}
    for folder, by_split in sorted(read.items()):
        for name in ["meta.json"] + [f"{s}.jsonl" for s in sorted(by_split)]:
            files[f"{folder}/{name}"] = sha256_file(os.path.join(root, folder, name))
        splits[folder] = {s: ids_hash(records) for s, records in sorted(by_split.items())}
    return {"root": os.path.abspath(root), "files": files, "splits": splits,
            "tokenizer": {"path": os.path.abspath(tokenizer), "sha256": sha256_file(tokenizer)}}


def differences(saved, now):
    """One line per content that differs between two data records: a file both read, the ids of a
    split both read, the tokenizer. Places (the root, the tokenizer's path) may differ."""
    out = [f"{name}: sha256 {saved['files'][name][:16]} -> {now['files'][name][:16]}"
           for name in sorted(set(saved.get("files", {})) & set(now["files"]))
           if saved["files"][name] != now["files"][name]]
    out += [f"{folder} {split} ids: sha256 {a[:16]} -> {now['splits'][folder][split][:16]}"
            for folder, by_split in sorted(saved.get("splits", {}).items())
            for split, a in sorted(by_split.items())
            if split in now["splits"].get(folder, {}) and now["splits"][folder][split] != a]
    old, new = saved.get("tokenizer", {}), now["tokenizer"]
    if old.get("sha256") not in (None, new["sha256"]):
        out.append(f"tokenizer: {old.get('path')} (sha256 {old['sha256'][:16]}) -> {new['path']} "
                   f"(sha256 {new['sha256'][:16]})")
    return out
