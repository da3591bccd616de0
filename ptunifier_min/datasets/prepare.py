"""Turn the official release of each dataset (real, or the synthetic mirror of synth.py) into the
prepared format.

    python -m ptunifier_min.datasets.prepare DATASET --root RAW --out DIR [--seed 0]
                                             [--on-bad-image error|skip] [--allow-empty-splits]
                                             [--cache-short-side 384] [--workers N]
    python -m ptunifier_min.datasets.prepare ms_cxr --root RAW/ms_cxr --out DIR
                                             --mimic-root RAW/mimic_cxr
    python -m ptunifier_min.datasets.prepare all --root RAW --out DIR  # expects RAW/<each dataset>/

DATASET is one of roco, medicat, mimic_cxr, chexpert, rsna, radnli, vqa_rad, slake, medvqa2019 (the
paper's nine, which `all` prepares) and ms_cxr (MS-CXR, phrase grounding: its CSV names films of a
MIMIC-CXR-JPG tree, which --mimic-root gives). Each writes one folder per downstream task under DIR
(roco -> roco + roco_retrieval; mimic_cxr -> mimic_cxr + mimic_gen + mimic_sum; every other dataset
-> a folder of its own name) holding {train,val,test}.jsonl, {train,val,test}_ids.txt and meta.json.
The layouts read and the rules applied are those of shared/reference/datasets.md; the output is the
contract that data.py and every training script read. meta.json is written last, through a temp file
and a rename, so a folder without it is an interrupted preparation. A rule that drops a sample
counts it in meta["dropped"]; everything else that is not as expected (missing file, column or
field, a field of the wrong JSON type, malformed line, text that is not UTF-8, empty or
punctuation-only text no rule drops, unknown label value, an id seen twice in the folder's splits,
two candidate files for one input, a file name from the data that leaves the release folder) is an
error that names the file and the row. Every image is decoded once: one that does not decode is an
error too, or, with --on-bad-image skip, its records are dropped and counted under "bad_image".
Counts are checked before anything is written: a split left empty (unless --allow-empty-splits) or
rules that drop over 90% of a folder's records stop prepare with the numbers. The output folder is
checked writable before the release is read.

Image cache: while it decodes an image anyway, prepare writes a copy resized to a shorter side of
384 px (never enlarged) as an uncompressed (lossless, fast to read) PGM into
DIR/<dataset>/image_cache/; each record keeps the original in "image" and gains the copy in
"image_cache", which training and evaluation read (data.image_path): decoding a ~3,000 px JPEG per
sample would starve the GPUs. Paths inside DIR are written relative to DIR, so that a prepared
folder copied or moved elsewhere keeps working. A copy is named by the original's path, size and
modification time, so an original that changes gets a new copy; copies already there are skipped,
so a killed run resumes where it was. --workers sets the decoding processes; --cache-short-side 0
writes no cache (the images are still decoded once, to check them).
"""

import argparse
import csv
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import time

from PIL import Image
from tqdm import tqdm

from ..files import write_atomic
from ..grounding import box_prior
from ..images import load_image
from ..manifests import JSON_TYPES, json_type
from .workers import deferred_stop, ordered_map

DATASETS = ("roco", "medicat", "mimic_cxr", "chexpert", "rsna", "radnli", "vqa_rad", "slake",
            "medvqa2019", "ms_cxr")
# what `all` prepares: the paper's nine; MS-CXR needs --mimic-root, a second release
ALL = DATASETS[:-1]
SPLITS = ("train", "val", "test")
MIN_WORDS = 3  # the paper: "we exclude those samples with a text length of less than 3"
CHEXPERT_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
# CheXpert competition policy (Irvin et al. 2019, GLoRIA/MGCA): uncertain -> 1 for these,
# -> 0 for the other two.
CHEXPERT_U_ONES = {"Atelectasis", "Edema", "Pleural Effusion"}
NLI_LABELS = ["entailment", "neutral", "contradiction"]


def _norm(text):
    """Strip and collapse whitespace; case is kept (the tokenizer lower-cases on its own)."""
    return " ".join(str(text).split())


def _has_word(text):
    return re.search(r"[^\W_]", text) is not None  # a letter or a digit, in any script


def _nwords(text):
    # a text without a letter or digit ("...", "- -") has no words,
    # however many pieces it splits into
    return len(text.split()) if _has_word(text) else 0


def _bar(iterable, desc, total=None):
    # disable=None: a bar on a terminal, silence in logs and tests
    return tqdm(iterable, desc=desc, total=total, unit=" rows", leave=False, disable=None,
                mininterval=1.0)


def _one_existing(base, names, what):
    """The one of base/name that exists. Two that exist (a .csv beside its .csv.gz, both val/ and
    validation/, both CheXpert roots) are refused rather than one read in silence: they may differ,
    and which one is right is the user's call."""
    return _one_of([os.path.join(base, name) for name in names], what)


def _one_of(candidates, what):
    found = [c for c in candidates if os.path.exists(c)]
    if not found:
        raise FileNotFoundError(f"{what} not found: {' or '.join(candidates)}")
    if len(found) > 1:
        raise ValueError(f"{what}: {len(found)} candidates for one input: {' and '.join(found)}; "
                         "remove or rename the one that should not be read")
    return found[0]


def _csv_path(base, stem):
    """The release ships gzipped CSVs; users often unpack them. Accept both."""
    return _one_existing(base, [stem + ".csv.gz", stem + ".csv"], f"{stem} CSV")


def _text_lines(path):
    """Yield (line number, line with its line end) of a UTF-8 text file, gzipped or not.

    Decoded line by line, so that a byte that is not UTF-8 (a Latin-1 export, a damaged download) is
    an error naming the file and the line, not a bare UnicodeDecodeError. A byte-order mark
    (spreadsheet exports) is removed."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {n}: not UTF-8 (byte {raw[e.start]:#04x} at byte "
                                 f"{e.start + 1} of the line); "
                                 "re-encode the file as UTF-8") from None


def _read_text(path):
    text = "".join(line for _, line in _text_lines(path))
    # universal line ends, as text-mode open() gives
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_csv(path, required):
    """Yield (line number, row dict); a missing column is an error that lists the columns found."""
    # csv reads quoted line breaks across lines
    reader = csv.DictReader(line for _, line in _text_lines(path))
    found = reader.fieldnames or []
    missing = [c for c in required if c not in found]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns found: {found}")
    for row in reader:
        if any(row[c] is None for c in required):  # csv fills missing trailing fields with None
            raise ValueError(f"{path}, line {reader.line_num}: {len(found)} columns in the header, "
                             "fewer here")
        yield reader.line_num, row


def _read_jsonl(path):
    for n, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: malformed JSON ({e})") from None


def _read_json_list(path):
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def _field(row, key, where, types=(str,)):
    """row[key], which must be one of `types`: a list where a string belongs (or a string where a
    list belongs) would otherwise be turned into text ("['a', 'b']") or into characters, and trained
    on in silence."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: the record is {json_type(row)}; expected a JSON object with "
                         f"field {key!r}")
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r}; fields found: {sorted(row)}")
    value = row[key]
    # bool is an int in Python
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(dict.fromkeys(JSON_TYPES[t] for t in types))
        raise ValueError(f"{where}: field {key!r} is {json_type(value)} ({str(value)[:60]!r}); "
                         f"expected {expected}")
    return value


def _unique(seen, rid, where):
    """Ids are unique across all splits of a folder: a repeat is a duplicated row, or the same
    sample in two splits (a leak of test into train)."""
    if rid in seen:
        raise ValueError(f"{where}: id {rid!r} occurs again; first at {seen[rid]}")
    seen[rid] = where


def _text(value, where, name):
    """A text no rule may drop: empty means a broken row, not a short sample."""
    text = _norm("" if value is None else value)
    if not text:
        raise ValueError(f"{where}: empty {name}")
    if not _has_word(text):
        raise ValueError(f"{where}: {name} {text!r} has no letter or digit")
    return text


def _under(base, name, where):
    """base/name for a file name taken from the data, refusing one that leaves base (an absolute
    path, "..").

    A hostile or broken release must not point training at files elsewhere (/etc/..., /dev/zero).
    The check is lexical, so symbolic links inside the release (images kept on another disk)
    still work."""
    path = os.path.normpath(os.path.join(base, name))
    if os.path.isabs(name) or not path.startswith(os.path.join(os.path.normpath(base), "")):
        raise ValueError(f"{where}: file name {name!r} points outside {base}")
    return path


def _image(path, where):
    # Checked now (cheap) so that a missing file is found here, not hours into training.
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    return path


def _seeded_split(records, seed, n_val, n_test):
    """Shuffle (sorted by id first, so the file order does not matter) and cut test, then val; the
    rest is train."""
    records = sorted(records, key=lambda r: r["id"])
    random.Random(seed).shuffle(records)
    return {"test": records[:n_test], "val": records[n_test:n_test + n_val],
            "train": records[n_test + n_val:]}


def _sample(records, k, seed):
    """M3AE/PTUnifier retrieval sets: shuffle with the seed and keep the first k."""
    records = sorted(records, key=lambda r: r["id"])
    random.Random(seed).shuffle(records)
    return records[:k]


def _write_atomic(path, lines):
    # a reader never sees half a file
    write_atomic(path, "".join(line + "\n" for line in lines))


def _write_folder(out, folder, splits, meta):
    """Write {split}.jsonl and {split}_ids.txt, then meta.json last: its presence marks a complete
    preparation."""
    path = os.path.join(out, folder)
    os.makedirs(path, exist_ok=True)
    meta_path = os.path.join(path, "meta.json")
    seen = {}
    for split in SPLITS:
        records = sorted(splits[split], key=lambda r: r["id"])
        ids = [r["id"] for r in records]
        odd = next((i for i in ids if not i or "\n" in i or "\r" in i), None)
        if odd is not None:  # {split}_ids.txt holds one id per line
            raise ValueError(f"{folder}: id {odd!r} in {split} is empty or holds a line break")
        dup = next((i for i in ids if seen.setdefault(i, split) != split), None) or \
            next((a for a, b in zip(ids, ids[1:]) if a == b), None)
        if dup is not None:  # the readers name the row; this backstop catches ids a rule derives
            raise ValueError(f"{folder}: id {dup!r} occurs twice (in {seen[dup]} and {split})")
        _write_atomic(os.path.join(path, f"{split}.jsonl"),
                      (json.dumps(_inside(r, out), ensure_ascii=False) for r in records))
        _write_atomic(os.path.join(path, f"{split}_ids.txt"), (r["id"] for r in records))
    meta = {"dataset": folder, **meta, "counts": {s: len(splits[s]) for s in SPLITS}}
    _write_atomic(meta_path, [json.dumps(meta, indent=1, ensure_ascii=False)])
    counts = " / ".join(f"{s} {meta['counts'][s]}" for s in SPLITS)
    dropped = ", ".join(f"{k} {v}" for k, v in meta["dropped"].items()) or "none"
    print(f"{folder}: kept {counts}; dropped {dropped} -> {path}")
    return path


def _inside(record, out):
    """The record as written: its file paths inside `out` (the image cache; images, if the release
    lies inside it) relative to `out`, so that a prepared root copied or moved elsewhere keeps
    working (data.read_split resolves them)."""
    base = os.path.join(os.path.abspath(out), "")
    return {k: os.path.relpath(v, base) if k in ("image", "image_cache") and
            os.path.abspath(v).startswith(base) else v for k, v in record.items()}


def _vqa_labels(splits):
    """Answer vocabulary from train+val only (the literature also uses test answers, which hides
    test OOV)."""
    answers = sorted({r["answer"] for s in ("train", "val") for r in splits[s]})
    index = {a: i for i, a in enumerate(answers)}
    for s in SPLITS:
        for r in splits[s]:
            r["label"] = index.get(r["answer"], -1)
    test = splits["test"]
    oov = sum(r["label"] == -1 for r in test) / len(test) if test else 0.0
    return {"answers": answers, "oov_test_share": oov}


def _answer(value, where):
    # VQA answers are class labels: lower-cased so that "Yes" and "yes" are one class
    # (VQA-Med ships lower case).
    return _text(value, where, "answer").lower()


def _answer_type(value, where):
    t = _norm(value).lower()
    if t not in ("open", "closed"):
        raise ValueError(f"{where}: answer_type {value!r} is neither OPEN nor CLOSED")
    return t


def _roco_lines(path):
    """captions.txt / dlinks.txt: `ROCO_id<TAB>field[<TAB>field...]` per line."""
    for n, line in _text_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"{path}, line {n}: expected `ROCO_id<TAB>text`, got {line[:80]!r}")
        yield n, parts[0].strip(), parts


def _roco(root, seed):
    data = os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data")) else root
    dropped = {"non_radiology": 0, "short_caption": 0}
    splits, seen = {}, {}
    for split, names in (("train", ["train"]), ("val", ["validation", "val"]), ("test", ["test"])):
        split_dir = _one_existing(data, names, f"ROCO {split} folder")
        non_rad = os.path.join(split_dir, "non-radiology", "captions.txt")
        if os.path.exists(non_rad):
            dropped["non_radiology"] += sum(1 for _ in _roco_lines(non_rad))
        rad = os.path.join(split_dir, "radiology")
        captions = os.path.join(rad, "captions.txt")
        dlinks = os.path.join(rad, "dlinks.txt")
        # dlinks.txt: id, wget command, image file name (the name the PMC archive uses)
        file_names = ({rid: parts[-1].strip() for _, rid, parts in _roco_lines(dlinks)}
                      if os.path.exists(dlinks) else {})
        records = []
        for n, rid, parts in _bar(_roco_lines(captions), f"roco {split}"):
            where = f"{captions}, line {n} ({rid})"
            _unique(seen, rid, where)
            caption = _norm(" ".join(parts[1:]))
            if _nwords(caption) < MIN_WORDS:
                dropped["short_caption"] += 1
                continue
            candidates = [_under(rad, os.path.join("images", rid + ".jpg"), where)]
            if rid in file_names:
                candidates.append(_under(rad, os.path.join("images", file_names[rid]), where))
            # a dlinks name may be ours
            image = _one_of(list(dict.fromkeys(candidates)), f"{where}: image file")
            records.append({"id": rid, "image": image, "texts": [caption]})
        splits[split] = records
    rules = {"non_radiology": "only the radiology subset of each split is kept",
             "short_caption": f"captions with fewer than {MIN_WORDS} words are dropped",
             "split": "official train / validation / test"}
    retrieval = {"train": splits["train"],
                 "val": _sample(splits["val"], 2000, seed),
                 "test": _sample(splits["test"], 2000, seed)}
    r_rules = {**rules, "split": "train = ROCO train; val / test = 2,000 pairs (all if fewer) of "
                                 "ROCO validation / test, shuffled with the seed, first 2,000 "
                                 "kept; select on val, report test"}
    return [("roco", splits, {"dropped": dropped, "rules": rules}),
            ("roco_retrieval", retrieval, {"dropped": dict(dropped), "rules": r_rules})]


def _medicat(root, seed):
    path = os.path.join(root, "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl")
    dropped = {"non_radiology": 0, "short_text": 0, "no_text": 0}
    records, seen = [], {}
    for n, row in _bar(_read_jsonl(path), "medicat"):
        where = f"{path}, line {n}"
        pdf_hash, fig_uri = _field(row, "pdf_hash", where), _field(row, "fig_uri", where)
        if not _field(row, "radiology", where, (bool,)):
            dropped["non_radiology"] += 1
            continue
        # texts = the caption plus every inline reference to the figure,
        # each kept only with >= 3 words
        refs = (_field(row, "s2orc_references", where, (list, type(None)))
                if "s2orc_references" in row else None)
        if any(not isinstance(t, str) for t in refs or []):
            bad = next(t for t in refs if not isinstance(t, str))
            raise ValueError(f"{where}: s2orc_references holds {json_type(bad)} "
                             f"({str(bad)[:60]!r}); expected a list of strings")
        texts = [_norm(t)
                 for t in [_field(row, "s2_caption", where, (str, type(None)))] + (refs or [])
                 if t is not None]
        kept = [t for t in texts if _nwords(t) >= MIN_WORDS]
        dropped["short_text"] += len(texts) - len(kept)
        if not kept:
            dropped["no_text"] += 1
            continue
        name = f"{pdf_hash}_{fig_uri}"
        image = _image(_under(root, os.path.join("figures", name), where), f"{where} ({name})")
        _unique(seen, os.path.splitext(name)[0], where)
        records.append({"id": os.path.splitext(name)[0], "image": image, "texts": kept})
    n_eval = min(1000, len(records) // 10)  # the paper's 1,000 / 1,000; 10% for small mirrors
    rules = {"non_radiology": "figures with radiology != true are dropped",
             "short_text": f"caption / inline references with fewer than {MIN_WORDS} words "
                           "are dropped",
             "no_text": "figures left without any text are dropped",
             "split": f"seeded shuffle: min(1000, 10%) val and test each ({n_eval} here), "
                      "rest train"}
    return [("medicat", _seeded_split(records, seed, n_eval, n_eval),
             {"dropped": dropped, "rules": rules})]


_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ,/&()-]*[A-Z)])[ \t]*:", re.M)
# Header spellings folded into the two sections we use (after MIT-LCP's mimic-cxr section_parser).
_SECTION_NAMES = {"FINDINGS": "findings", "FINDING": "findings",
                  "IMPRESSION": "impression", "IMPRESSIONS": "impression",
                  "CONCLUSION": "impression", "CONCLUSIONS": "impression",
                  "FINDINGS AND IMPRESSION": "impression", "FINDINGS/IMPRESSION": "impression"}
FRONTAL = ("PA", "AP")


def extract_sections(report):
    """FINDINGS and IMPRESSION of a MIMIC-CXR free-text report: each runs from its `NAME:` header
    (upper case at the start of a line) to the next header. Missing sections come back as ''. A
    repeated section is joined."""
    found = {"findings": [], "impression": []}
    heads = list(_HEADER.finditer(report))
    for head, nxt in zip(heads, heads[1:] + [None]):
        key = _SECTION_NAMES.get(" ".join(head.group(1).split()))
        if key:
            found[key].append(report[head.end(): nxt.start() if nxt else len(report)])
    return {k: _norm(" ".join(v)) for k, v in found.items()}


def _mimic_sections(root):
    """A user's mimic_cxr_sectioned.csv (MIT-LCP script output), when present:
    {study_id: sections}."""
    try:
        path = _csv_path(root, "mimic_cxr_sectioned")
    except FileNotFoundError:
        return {}
    sections = {}
    for _, row in _read_csv(path, ["study", "impression", "findings"]):
        sections[row["study"].strip().lstrip("s")] = {"findings": _norm(row["findings"]),
                                                      "impression": _norm(row["impression"])}
    return sections


def _mimic(root, seed):
    split_csv, meta_csv = (_csv_path(root, "mimic-cxr-2.0.0-split"),
                           _csv_path(root, "mimic-cxr-2.0.0-metadata"))
    views = {row["dicom_id"]: row["ViewPosition"].strip()
             for _, row in _bar(_read_csv(meta_csv, ["dicom_id", "ViewPosition"]),
                                "mimic metadata")}
    official = {"train": "train", "validate": "val", "val": "val", "test": "test"}
    # images: (dicom, study, subject, split, where); studies: study -> (subject, split, where)
    images, studies = [], {}
    seen = {}
    for n, row in _bar(_read_csv(split_csv, ["dicom_id", "study_id", "subject_id", "split"]),
                       "mimic split"):
        where = f"{split_csv}, line {n}"
        dicom, study, subject = (row["dicom_id"].strip(), row["study_id"].strip(),
                                 row["subject_id"].strip())
        split = official.get(row["split"].strip())
        if split is None:
            raise ValueError(f"{where}: split {row['split']!r} is not train / validate / test")
        if dicom not in views:
            raise ValueError(f"{where}: dicom_id {dicom} has no row in {meta_csv}")
        _unique(seen, dicom, where)
        if studies.setdefault(study, (subject, split, where))[1] != split:
            raise ValueError(f"{where}: study {study} is in {split} here but in "
                             f"{studies[study][1]} at {studies[study][2]}")
        images.append((dicom, study, subject, split, where))

    sectioned = _mimic_sections(root)
    sections = {}
    for study, (subject, _, where) in _bar(sorted(studies.items()), "mimic reports"):
        if study in sectioned:
            sections[study] = sectioned[study]
            continue
        report = _under(root,
                        os.path.join("files", f"p{subject[:2]}", f"p{subject}", f"s{study}.txt"),
                        where)
        if not os.path.exists(report):
            raise FileNotFoundError(f"{where}: report file not found: {report}")
        sections[study] = extract_sections(_read_text(report))

    def ok(text):
        return _nwords(text) >= MIN_WORDS

    pre, gen, summ = ({s: [] for s in SPLITS} for _ in range(3))
    d_pre = {"lateral": 0, "short_text": 0, "no_text": 0}
    d_gen = {"lateral": 0, "no_findings": 0}
    for dicom, study, subject, split, where in _bar(images, "mimic images"):
        if views[dicom] not in FRONTAL:
            d_pre["lateral"] += 1
            d_gen["lateral"] += 1
            continue
        sec = sections[study]
        texts = [t for t in (sec["impression"], sec["findings"]) if t]
        kept = [t for t in texts if ok(t)]
        d_pre["short_text"] += len(texts) - len(kept)
        if not kept:  # then FINDINGS is too short as well
            d_pre["no_text"] += 1
            d_gen["no_findings"] += 1
            continue
        path = _under(root, os.path.join("files", f"p{subject[:2]}", f"p{subject}", f"s{study}",
                                         dicom + ".jpg"),
                      where)
        image = _image(path, f"{where} ({dicom})")
        pre[split].append({"id": dicom, "image": image, "texts": kept})
        if ok(sec["findings"]):
            gen[split].append({"id": dicom, "image": image, "target": sec["findings"]})
        else:
            d_gen["no_findings"] += 1
    d_sum = {"no_findings": 0, "no_impression": 0}
    for study, (_, split, _) in studies.items():
        sec = sections[study]
        if not ok(sec["findings"]):
            d_sum["no_findings"] += 1
        elif not ok(sec["impression"]):
            d_sum["no_impression"] += 1
        else:
            summ[split].append({"id": study, "text_a": sec["findings"],
                                "target": sec["impression"]})

    source = ("mimic_cxr_sectioned.csv where it lists the study, else " if sectioned else "") + \
        "FINDINGS / IMPRESSION sections extracted from files/pXX/pSUBJECT/sSTUDY.txt"
    split_rule = "official mimic-cxr-2.0.0-split (validate -> val)"
    lateral = "images whose ViewPosition is not PA or AP (lateral, LL, blank, ...) are dropped"
    return [
        ("mimic_cxr", pre, {"dropped": d_pre, "rules": {
            "lateral": lateral,
            "short_text": f"impression / findings with fewer than {MIN_WORDS} words are dropped",
            "no_text": "frontal images left without any text are dropped",
            "texts": source, "split": split_rule}}),
        ("mimic_gen", gen, {"dropped": d_gen, "rules": {
            "lateral": lateral,
            "no_findings": f"frontal images whose FINDINGS has fewer than {MIN_WORDS} words "
                           "(or is missing) are dropped; target = FINDINGS (R2Gen)",
            "texts": source, "split": split_rule + ", per image"}}),
        ("mimic_sum", summ, {"dropped": d_sum, "rules": {
            "no_findings": f"studies whose FINDINGS has fewer than {MIN_WORDS} words "
                           "(or is missing) are dropped",
            "no_impression": f"then studies whose IMPRESSION has fewer than {MIN_WORDS} words "
                             "are dropped",
            "texts": source, "split": split_rule + ", per study"}}),
    ]


def _chexpert_label(value, name, where):
    v = value.strip()
    if v == "":
        return 0.0  # blank = not mentioned = negative (the common convention)
    try:
        x = float(v)
    except ValueError:
        x = None
    if x not in (1.0, 0.0, -1.0):
        raise ValueError(f"{where}: {name} = {value!r}; expected 1.0, 0.0, -1.0 or blank")
    if x == -1.0:
        return 1.0 if name in CHEXPERT_U_ONES else 0.0
    return x


def _chexpert(root, seed):
    names = ["CheXpert-v1.0-small", "CheXpert-v1.0"]  # the small re-pack, or the full-size release
    base = (root if os.path.basename(root) in names
            else _one_existing(root, names, "CheXpert folder"))
    parent, prefix = (os.path.dirname(os.path.normpath(base)),
                      os.path.basename(os.path.normpath(base)) + "/")
    dropped = {"lateral": 0}
    rows, seen = {}, {}
    for name in ("train", "valid"):
        path = os.path.join(base, name + ".csv")
        if not os.path.exists(path):
            raise FileNotFoundError(f"file not found: {path}")
        rows[name] = []
        for n, row in _bar(_read_csv(path, ["Path", "Frontal/Lateral"] + CHEXPERT_LABELS),
                           f"chexpert {name}"):
            where = f"{path}, line {n}"
            view = row["Frontal/Lateral"].strip()
            if view not in ("Frontal", "Lateral"):
                raise ValueError(f"{where}: Frontal/Lateral = {view!r}; "
                                 "expected Frontal or Lateral")
            if view != "Frontal":
                dropped["lateral"] += 1
                continue
            rel = row["Path"].strip()
            labels = [_chexpert_label(row[c], c, where) for c in CHEXPERT_LABELS]
            rid = os.path.splitext(rel[len(prefix):] if rel.startswith(prefix) else rel)[0]
            _unique(seen, rid, where)
            rows[name].append({"id": rid, "image": _image(_under(parent, rel, where), where),
                               "labels": labels})
    n_val = min(5000, len(rows["train"]) // 10)
    splits = _seeded_split(rows["train"], seed, n_val, 0)
    splits["test"] = rows["valid"]
    rules = {"lateral": "only frontal images are kept",
             "labels": "U-ones for Atelectasis, Edema, Pleural Effusion; "
                       "U-zeros for Cardiomegaly, Consolidation; blank -> 0",
             "split": f"test = official valid.csv; val = {n_val} seeded train rows "
                      "(min(5000, 10%)); rest train"}
    return [("chexpert", splits, {"dropped": dropped, "rules": rules,
                                  "label_names": list(CHEXPERT_LABELS)})]


def _rsna(root, seed):
    path = _csv_path(root, "stage_2_train_labels")
    patients, order = {}, []  # patient -> {"target", "boxes", "where"}
    n_rows = 0
    for n, row in _bar(_read_csv(path, ["patientId", "x", "y", "width", "height", "Target"]),
                       "rsna"):
        where = f"{path}, line {n}"
        n_rows += 1
        pid, target = row["patientId"].strip(), row["Target"].strip()
        if target not in ("0", "1"):
            raise ValueError(f"{where}: Target = {target!r}; expected 0 or 1")
        box = [row[k].strip() for k in ("x", "y", "width", "height")]
        if (target == "1") != all(box) or (target == "0" and any(box)):
            raise ValueError(f"{where}: Target {target} with box {box}: "
                             "Target 1 rows need a full box, 0 rows none")
        p = patients.get(pid)
        if p is None:
            p = patients[pid] = {"target": target, "boxes": [], "where": where}
            order.append(pid)
        elif p["target"] != target:
            raise ValueError(f"{where}: patient {pid} has Target {target} here but {p['target']} "
                             f"at {p['where']}")
        if target == "1":
            p["boxes"].append(_box(box, where))
    image_dir = os.path.join(root, "stage_2_train_images")
    records = []
    for pid in order:
        p = patients[pid]
        candidates = [_under(image_dir, pid + e, f"{p['where']} ({pid})")
                      for e in (".dcm", ".png", ".jpg")]
        # a DICOM and its PNG export: which one?
        image = _one_of(candidates, f"{p['where']} ({pid}): image file")
        if image.endswith(".dcm"):
            _require_pydicom(image)  # fail now, not in the first training step
        records.append({"id": pid, "image": image, "labels": [1 if p["target"] == "1" else 0],
                        "boxes": p["boxes"]})
    n_eval = round(0.15 * len(records))
    rules = {"labels": "Pneumonia = 1 if the patient has any box",
             "box_rows_merged": "label rows folded into one record per patient (one row per box)",
             "split": f"70/15/15 by patient, seeded ({n_eval} val, {n_eval} test)"}
    return [("rsna", _seeded_split(records, seed, n_eval, n_eval),
             {"dropped": {"box_rows_merged": n_rows - len(records)}, "rules": rules,
              "label_names": ["Pneumonia"]})]


def _box(values, where):
    """[x, y, w, h] from a row's four box fields: finite numbers, w and h > 0."""
    try:
        box = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"{where}: box {values} is not numeric") from None
    if not all(map(math.isfinite, box)) or box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"{where}: box x, y, w, h = {values}: expected finite numbers, "
                         "w and h > 0")
    return box


def _pixels(value, name, where):
    """A positive whole number of pixels ("2544", or "2544.0" as a spreadsheet writes it)."""
    try:
        n = float(value)
    except ValueError:
        n = math.nan
    if not (math.isfinite(n) and n == int(n) and n > 0):
        raise ValueError(f"{where}: {name} = {value!r}; expected a positive whole number of "
                         "pixels")
    return int(n)


MS_CXR_CATEGORIES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity",
                     "Pleural Effusion", "Pneumonia", "Pneumothorax"]
MS_CXR_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                  "image_width", "image_height"]
# MIMIC-CXR-JPG's layout: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg
_MIMIC_FILE = re.compile(r"files/p\d\d/p(\d+)/s\d+/([^/]+)\.jpg")
# the CSV's pixels are written with a few decimals: x + w may pass the edge by their rounding
_EDGE = 1e-6


def _ms_cxr(root, seed, mimic_root):
    """MS-CXR: one record per phrase (dicom_id, label_text), holding all its boxes (one CSV row
    each), on its film of the MIMIC-CXR-JPG tree at mimic_root."""
    path = _one_existing(root, ["MS_CXR_Local_Alignment_v1.1.0.csv",
                                "MS_CXR_Local_Alignment_v1.0.0.csv"], "MS-CXR CSV")
    phrases, films, n_rows = {}, {}, 0  # films: dicom -> ((path, size, split), first row)
    for n, row in _bar(_read_csv(path, MS_CXR_COLUMNS), "ms_cxr"):
        where = f"{path}, line {n}"
        n_rows += 1
        columns = MS_CXR_COLUMNS + ["split"] * ("split" in row)  # v1.1.0 has a split column
        empty = [c for c in columns if not (row[c] or "").strip()]
        if empty:
            raise ValueError(f"{where}: no value for {', '.join(empty)}")
        dicom, rel = row["dicom_id"].strip(), row["path"].strip()
        text = _text(row["label_text"], where, "label_text")
        category = row["category_name"].strip()
        if category not in MS_CXR_CATEGORIES:
            raise ValueError(f"{where}: category_name {category!r} is not one of "
                             f"{', '.join(MS_CXR_CATEGORIES)}")
        size = (_pixels(row["image_width"], "image_width", where),
                _pixels(row["image_height"], "image_height", where))
        x, y, w, h = box = _box([row[k].strip() for k in "xywh"], where)
        if x < 0 or y < 0 or x + w > size[0] + _EDGE or y + h > size[1] + _EDGE:
            raise ValueError(f"{where}: box x, y, w, h = {box} leaves the image of "
                             f"{size[0]} x {size[1]} pixels")
        split = row["split"].strip() if "split" in row else None
        if split is not None and split not in SPLITS:
            raise ValueError(f"{where}: split {row['split']!r} is not one of "
                             f"{', '.join(SPLITS)}")
        film = _MIMIC_FILE.fullmatch(rel)
        if not film or film.group(2) != dicom:
            raise ValueError(f"{where}: path {rel!r} is not files/pXX/pSUBJECT/sSTUDY/"
                             f"{dicom}.jpg, the MIMIC-CXR-JPG file of its dicom_id")
        image = _under(mimic_root, rel, where)
        first = films.setdefault(dicom, ((rel, size, split), where))
        if first[0] != (rel, size, split):
            raise ValueError(f"{where}: dicom_id {dicom} has (path, image size, split) "
                             f"{(rel, size, split)} here but {first[0]} at {first[1]}")
        if first[1] == where:  # the film's first row: its file must be there
            _image(image, where)
        key = (dicom, text)
        if key not in phrases:
            digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
            phrases[key] = ({"id": f"{dicom}_{digest}", "image": image, "text": text, "boxes": [],
                             "width": size[0], "height": size[1], "category": category},
                            film.group(1), split, where)
        elif phrases[key][0]["category"] != category:
            raise ValueError(f"{where}: phrase {text!r} of {dicom} is {category} here but "
                             f"{phrases[key][0]['category']} at {phrases[key][3]}")
        phrases[key][0]["boxes"].append(box)
    if all(split is not None for _, _, split, _ in phrases.values()):
        splits = {s: [r for r, _, split, _ in phrases.values() if split == s] for s in SPLITS}
        split_rule = "official split column (v1.1.0)"
    else:  # v1.0.0: carved by patient, as RSNA's, so that no patient is in two splits
        subjects = sorted({subject for _, subject, _, _ in phrases.values()})
        n_eval = round(0.15 * len(subjects))
        carved = _seeded_split([{"id": s} for s in subjects], seed, n_eval, n_eval)
        split_of = {p["id"]: s for s in SPLITS for p in carved[s]}
        splits = {s: [r for r, subject, _, _ in phrases.values() if split_of[subject] == s]
                  for s in SPLITS}
        split_rule = (f"no split column (v1.0.0): 70/15/15 by patient (pSUBJECT of the path), "
                      f"seeded ({n_eval} val, {n_eval} test patients)")
    rules = {"box_rows_merged": "the rows of one phrase (dicom_id, label_text), one per box, "
                                "folded into one record",
             "boxes": "[x, y, w, h] in pixels of the original image (width x height), as the "
                      "CSV gives them",
             "split": split_rule,
             "box_prior": "mean over the train records of their boxes' union mask, on a 64 x 64 "
                          "grid of each film's normalised coordinates (grounding.box_prior)"}
    return [("ms_cxr", splits, {"dropped": {"box_rows_merged": n_rows - len(phrases)},
                                "rules": rules, "categories": list(MS_CXR_CATEGORIES),
                                "box_prior": _box_prior(splits["train"])})]


def _box_prior(records):
    return box_prior([r["boxes"] for r in records], [(r["width"], r["height"]) for r in records])


def _require_pydicom(path):
    try:
        import pydicom  # noqa: F401  (optional: only real RSNA data is DICOM)
    except ImportError:
        raise ImportError(f"{path} is a DICOM file; reading it needs pydicom: "
                          "pip install pydicom") from None


def _radnli(root, seed):
    splits, seen = {}, {}
    for split, name in (("train", "mli_train_v1.jsonl"), ("val", "radnli_dev_v1.jsonl"),
                        ("test", "radnli_test_v1.jsonl")):
        path = os.path.join(root, name)
        records = []
        for n, row in _read_jsonl(path):
            where = f"{path}, line {n}"
            # MedNLI spells it pairID
            mednli = isinstance(row, dict) and "pairID" in row and "pair_id" not in row
            rid = str(_field(row, "pairID" if mednli else "pair_id", where, (str, int)))
            _unique(seen, rid, where)
            label = _norm(_field(row, "gold_label", where)).lower()
            if label not in NLI_LABELS:
                raise ValueError(f"{where}: gold_label {label!r} is not one of {NLI_LABELS}")
            records.append({"id": rid,
                            "text_a": _text(_field(row, "sentence1", where), where, "sentence1"),
                            "text_b": _text(_field(row, "sentence2", where), where, "sentence2"),
                            "label": NLI_LABELS.index(label)})
        splits[split] = records
    rules = {"split": "train = mli_train_v1 (MedNLI train), val = radnli_dev_v1, "
                      "test = radnli_test_v1"}
    return [("radnli", splits, {"dropped": {}, "rules": rules, "label_names": list(NLI_LABELS)})]


def _vqa_rad(root, seed):
    path = os.path.join(root, "VQA_RAD Dataset Public.json")
    image_dir = os.path.join(root, "VQA_RAD Image Folder")
    train, test, seen = [], [], {}
    for n, row in enumerate(_bar(_read_json_list(path), "vqa_rad"), 1):
        where = f"{path}, record {n}"
        qid = str(_field(row, "qid", where, (int, str)))
        where = f"{where} (qid {qid})"
        _unique(seen, qid, where)
        image = _image(_under(image_dir, _norm(_field(row, "image_name", where)), where), where)
        r = {"id": qid, "image": image,
             "question": _text(_field(row, "question", where), where, "question"),
             "answer": _answer(_field(row, "answer", where, (str, int, float)), where),
             "answer_type": _answer_type(_field(row, "answer_type", where), where)}
        (test if "test" in str(_field(row, "phrase_type", where)) else train).append(r)
    n_val = round(0.1 * len(train))
    splits = _seeded_split(train, seed, n_val, 0)
    splits["test"] = test
    rules = {"split": f"test = phrase_type contains 'test'; val = {n_val} seeded train questions "
                      "(10%) instead of the M3AE val set, which is a copy of test",
             "answers": "vocabulary = answers of train + val (lower-cased); test answers "
                        "outside it get label -1"}
    return [("vqa_rad", splits, {"dropped": {}, "rules": rules, **_vqa_labels(splits)})]


def _slake(root, seed):
    dropped = {"non_english": 0}
    splits, seen = {}, {}
    for split, name in (("train", "train.json"), ("val", "validate.json"), ("test", "test.json")):
        path = os.path.join(root, name)
        records = []
        for n, row in enumerate(_bar(_read_json_list(path), f"slake {split}"), 1):
            where = f"{path}, record {n}"
            qid = str(_field(row, "qid", where, (int, str)))
            where = f"{where} (qid {qid})"
            _unique(seen, qid, where)
            if _norm(_field(row, "q_lang", where)) != "en":
                dropped["non_english"] += 1
                continue
            image = _image(_under(os.path.join(root, "imgs"),
                                  _norm(_field(row, "img_name", where)), where), where)
            records.append({"id": qid, "image": image,
                            "question": _text(_field(row, "question", where), where, "question"),
                            "answer": _answer(_field(row, "answer", where, (str, int, float)),
                                              where),
                            "answer_type": _answer_type(_field(row, "answer_type", where), where)})
        splits[split] = records
    rules = {"non_english": "questions with q_lang != 'en' are dropped",
             "split": "official train / validate / test",
             "answers": "vocabulary = answers of train + val (lower-cased); test answers "
                        "outside it get label -1"}
    return [("slake", splits, {"dropped": dropped, "rules": rules, **_vqa_labels(splits)})]


_VQAMED_CATEGORIES = {"c1": 1, "modality": 1, "c2": 2, "plane": 2, "c3": 3, "organ": 3,
                      "c4": 4, "abnormality": 4}


def _vqamed_pipe(path):
    for n, line in _text_lines(path):
        if line.strip():
            yield n, line.rstrip("\r\n").split("|")


def _vqamed_image(split_dir, image_id, where):
    # the synthetic mirror / common re-packs use images/;
    # the ImageCLEF zips use Train_images, Val_images, ...
    names = ["images", "Train_images", "Val_images", "VQAMed2019_Test_Images"]
    candidates = [_under(os.path.join(split_dir, d), image_id + ".jpg", where) for d in names]
    return _one_of(candidates, f"{where}: image file")


def _medvqa2019(root, seed):
    dropped = {"abnormality": 0}
    splits, seen = {}, {}
    folders = {"train": ["train", "ImageClef-2019-VQA-Med-Training"],
               "val": ["val", "ImageClef-2019-VQA-Med-Validation"]}
    names = {1: "Modality", 2: "Plane", 3: "Organ", 4: "Abnormality"}

    def add(records, k, folder, image_id, question, answer, where):
        """One question of category k, or none for C4: the literature drops its free-text
        abnormality answers."""
        if k == 4:
            dropped["abnormality"] += 1
            return
        image_id = _text(image_id, where, "image_id")
        _unique(seen, f"{image_id}_C{k}", where)
        records.append({"id": f"{image_id}_C{k}", "image": _vqamed_image(folder, image_id, where),
                        "question": _text(question, where, "question"),
                        "answer": _answer(answer, where),
                        "answer_type": "open"})

    for split, candidates in folders.items():
        split_dir = _one_existing(root, candidates, f"VQA-Med 2019 {split} folder")
        records = []
        for k in (1, 2, 3, 4):
            path = os.path.join(split_dir, "QAPairsByCategory", f"C{k}_{names[k]}_{split}.txt")
            for n, parts in _bar(_vqamed_pipe(path), f"medvqa2019 {split} C{k}"):
                where = f"{path}, line {n}"
                if len(parts) != 3:
                    raise ValueError(f"{where}: expected `image_id|question|answer`, got "
                                     f"{len(parts)} fields")
                add(records, k, split_dir, parts[0], parts[1], parts[2], where)
        splits[split] = records
    test_dir = _one_existing(root, ["test", "VQAMed2019Test"], "VQA-Med 2019 test folder")
    path = os.path.join(test_dir, "VQAMed2019_Test_Questions_w_Ref_Answers.txt")
    records = []
    for n, parts in _bar(_vqamed_pipe(path), "medvqa2019 test"):
        where = f"{path}, line {n}"
        if len(parts) != 4:
            raise ValueError(f"{where}: expected `image_id|category|question|answer`, got "
                             f"{len(parts)} fields")
        k = _VQAMED_CATEGORIES.get(_norm(parts[1]).lower())
        if k is None:
            raise ValueError(f"{where}: category {parts[1]!r} is not one of C1..C4 / modality, "
                             "plane, organ, abnormality")
        add(records, k, test_dir, parts[0], parts[2], parts[3], where)
    splits["test"] = records
    rules = {"abnormality": "category C4 (abnormality) is dropped; "
                            "C1-C3 are kept and all count as open",
             "split": "official train / val / test",
             "answers": "vocabulary = answers of train + val; test answers outside it get label -1"}
    return [("medvqa2019", splits, {"dropped": dropped, "rules": rules, **_vqa_labels(splits)})]


# the cache's default short side: >= the largest preset's image size (the paper's 288)
CACHE_SHORT_SIDE = 384


def shrink(img, short_side):
    """Resize so that the shorter side is `short_side`, with the resampling of ImageTransform
    (bicubic). Never upscales: an image already that small is returned as it is, so a cached copy of
    it holds the very same pixels."""
    w, h = img.size
    if min(w, h) <= short_side:
        return img
    s = short_side / min(w, h)
    size = (short_side, max(1, round(h * s))) if w <= h else (max(1, round(w * s)), short_side)
    return img.resize(size, Image.Resampling.BICUBIC)


def cache_file(cache_dir, path, short_side):
    """Where the cached copy of the image `path` lives: <stem>-<key>.pgm in cache_dir.

    The key hashes the original's real path, byte size and modification time (ns), and the short
    side: an original that is replaced or edited gets a new name, so an entry is valid exactly when
    its file exists, and checking that costs one stat per image. A content hash would also survive a
    copy that resets modification times, but it reads every original in full on every run
    (MIMIC-CXR-JPG alone is ~570 GB) just to find that nothing changed."""
    st = os.stat(path)
    key = hashlib.blake2b(
        f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{short_side}".encode("utf-8"),
        digest_size=10).hexdigest()
    # readable, and short enough for any file system
    stem = os.path.splitext(os.path.basename(path))[0][:80]
    return os.path.join(cache_dir, f"{stem}-{key}.pgm")


def _decode(job):
    """Decode one image (the loader training uses: what decodes here decodes there) and, when `dest`
    is given, write its cached copy. Returns (error message or None, bytes written). A copy whose
    file exists is skipped without decoding: it was written, through a temporary file and a rename,
    from this very original (see cache_file). A job (path, dest, short_side, True) asks for the
    size too, (width, height) as decoded, as a third item (None for an image that does not decode):
    it is decoded even when its copy exists, because its records' boxes are in its pixels."""
    path, dest, short_side, *sized = job
    if dest is not None and os.path.exists(dest) and not sized:
        return None, 0
    try:
        img = load_image(path)
    except ValueError as e:
        return (str(e), 0) + ((None,) if sized else ())
    n = 0 if dest is None or os.path.exists(dest) else write_cached(img, dest, short_side)
    return (None, n) + ((img.size,) if sized else ())


def write_cached(img, dest, short_side):
    """Write the cached copy of a decoded image (what load_image returned: EXIF orientation,
    16-bit rescale and DICOM already applied), resized by shrink, to dest; through a temporary file
    and a rename, so that a kill never leaves a half file under the name that marks a valid copy.
    Returns the bytes written.

    The format is PGM: the 8-bit pixels as they are, after a 15-byte header. Lossless, as PNG is,
    but PIL decodes a PNG of 384 x 460 in ~2.5 ms (zlib, then undoing the row filters), about what
    the transform itself takes, and the PGM in ~0.1 ms, for ~2.7x the PNG's bytes (~170 kB an image:
    ~65 GB for MIMIC-CXR's 377k films, whose JPEGs take 570 GB)."""
    tmp = f"{dest}.tmp{os.getpid()}"
    small = shrink(img, short_side)
    # a stop signal waits for the rename (a worker has the signals' default actions: it would die
    # mid-write, leaving the temporary)
    with deferred_stop():
        try:
            # an "L" image is written as a binary PGM (P5)
            small.save(tmp, format="PPM")
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    return os.path.getsize(dest)


POOL_MIN_IMAGES = 64  # below this, starting worker processes costs more than it saves


def _decode_all(jobs, workers):
    """_decode over all jobs, in order, on `workers` processes (workers.ordered_map)."""
    return ordered_map(_decode, jobs, workers, chunksize=8, min_jobs=POOL_MIN_IMAGES,
                       bar=dict(desc="checking images", unit=" images", leave=False, disable=None,
                                mininterval=1.0))


def _check_images(folders, on_bad_image, cache_dir=None, short_side=CACHE_SHORT_SIDE, workers=1):
    """Decode every image once, fully, so that a corrupt, truncated or oversized file stops
    preparation ("error") or is dropped and counted under dropped["bad_image"] ("skip") instead of
    failing hours into training (where a bad image is always an error: see data.PretrainDataset). It
    runs on the finished splits, so a dropped image leaves the seeded split of every other record as
    it was; a VQA vocabulary keeps answers of dropped questions.

    With a cache_dir, the decoded image is also written there, resized (see shrink), and every
    record gains its path as "image_cache" (data.image_path reads it): a loader worker then reads a
    ~384 px PGM instead of decoding a ~3,000 px JPEG (tools/bench.py's bench_loader). Copies already
    there are kept (a killed run resumes; see cache_file)."""
    paths = sorted({r["image"] for _, splits, _ in folders for s in SPLITS for r in splits[s]
                    if "image" in r})
    dest = {p: cache_file(cache_dir, p, short_side) if cache_dir else None for p in paths}
    # the size a record states for its image (MS-CXR: its boxes are in those pixels)
    stated = {r["image"]: (r["width"], r["height"], name, s, r["id"])
              for name, splits, _ in folders for s in SPLITS for r in splits[s] if "width" in r}
    if cache_dir and paths:
        os.makedirs(cache_dir, exist_ok=True)
    t0 = time.time()
    results = _decode_all([(p, dest[p], short_side) + (True,) * (p in stated) for p in paths],
                          workers)
    bad = {p: r[0] for p, r in zip(paths, results) if r[0]}
    for p, r in zip(paths, results):
        if p in stated and r[2] is not None and r[2] != stated[p][:2]:
            w, h, name, split, rid = stated[p]
            raise ValueError(f"{name} {split}, id {rid}: its row gives image_width x image_height "
                             f"{w} x {h}, but the image file {p} is {r[2][0]} x {r[2][1]}: its "
                             "boxes are in the pixels of the original MIMIC-CXR-JPG file (a "
                             "resized copy needs them rescaled)")
    if cache_dir:
        built = sum(r[1] > 0 for r in results)
        print(f"image cache {cache_dir}: {len(paths) - len(bad)} images at short side "
              f"{short_side} ({built} built, {len(paths) - len(bad) - built} already there), "
              f"{sum(r[1] for r in results) / 1e6:.1f} MB written in {time.time() - t0:.1f} s")
        for _, splits, _ in folders:
            for s in SPLITS:
                for r in splits[s]:
                    if "image" in r and r["image"] not in bad:
                        r["image_cache"] = dest[r["image"]]
    if bad and on_bad_image == "error":
        name, split, r = next((name, s, r)
                              for name, splits, _ in folders for s in SPLITS for r in splits[s]
                              if r.get("image") in bad)
        raise ValueError(f"{name} {split}, id {r['id']}: {bad[r['image']]}; {len(bad)} image(s) "
                         "cannot be decoded in all: fix or remove them, or prepare with "
                         "--on-bad-image skip to drop and count them")
    if on_bad_image == "skip":
        for path in sorted(bad):
            print(f"skipped: {bad[path]}")
        for _, splits, meta in folders:
            n = 0
            for s in SPLITS:
                kept = [r for r in splits[s] if r.get("image") not in bad]
                n, splits[s] = n + len(splits[s]) - len(kept), kept
            meta["dropped"]["bad_image"] = n
            meta["rules"]["bad_image"] = ("records whose image cannot be decoded are dropped "
                                          "(--on-bad-image skip)")
            if "oov_test_share" in meta:
                test = splits["test"]
                meta["oov_test_share"] = (sum(r["label"] == -1 for r in test) / len(test)
                                          if test else 0.0)
            if "box_prior" in meta:
                meta["box_prior"] = _box_prior(splits["train"])
    return folders


# Rules whose count is not a number of records: short_text counts texts of records that may stay
# (MedICaT, MIMIC); box_rows_merged counts label rows folded into their patient's record, not
# records lost.
_NOT_RECORDS = {"short_text", "box_rows_merged"}
# the largest share of a folder any rule drops on the real releases is about half (SLAKE zh)
IMPLAUSIBLE_DROP = 0.9


def _check_counts(folders, allow_empty):
    """Stop before writing when a folder would be written with an empty split, or when its rules
    drop more than IMPLAUSIBLE_DROP of the records they saw: both mean a release that is not what
    its layout promises (all views blank, every q_lang "EN", a split file cut short), and training
    would fail on it hours later, or worse, not."""
    for name, splits, meta in folders:
        counts = {s: len(splits[s]) for s in SPLITS}
        kept = " / ".join(f"{s} {counts[s]}" for s in SPLITS)
        drops = {k: v for k, v in meta["dropped"].items() if k not in _NOT_RECORDS and v}
        seen = sum(counts.values()) + sum(drops.values())
        if seen and sum(drops.values()) > IMPLAUSIBLE_DROP * seen:
            rules = "; ".join(f"{k} {v} ({meta['rules'].get(k, 'see meta.json')})"
                              for k, v in drops.items())
            n = sum(drops.values())
            raise ValueError(f"{name}: the rules drop {n} of {seen} records ({n / seen:.0%}, over "
                             f"{IMPLAUSIBLE_DROP:.0%}): {rules}; kept {kept}. The release does not "
                             "look like its official layout: check the rows these rules read")
        empty = [s for s in SPLITS if not counts[s]]
        if empty and not allow_empty:
            raise ValueError(f"{name}: the {' and '.join(empty)} split(s) would be written empty "
                             f"(kept {kept}; dropped {meta['dropped']}); a stage that reads them "
                             "would fail later. Prepare the full release, or pass "
                             "--allow-empty-splits for a deliberately cut-down one")


def _missing_folders(path):
    """The folders that making `path` would create, deepest first."""
    made, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def _prune_cache(cache_dir, folders):
    """Remove the copies no record of this preparation points to: those of replaced or removed
    originals, of another short side, and the temporary files of a killed run. The folder is this
    dataset's alone, so nothing else's goes."""
    if not os.path.isdir(cache_dir):
        return
    keep = {os.path.basename(r["image_cache"])
            for _, splits, _ in folders for s in SPLITS for r in splits[s]
            if "image_cache" in r}
    for name in os.listdir(cache_dir):
        if name not in keep and ".pgm" in name:
            os.remove(os.path.join(cache_dir, name))


def _check_writable(out):
    """Try a file in `out` now, not after hours of decoding images: a read-only disk, a path through
    a file, a folder of another user. Folders made for the try are removed, so a failed preparation
    leaves nothing behind."""
    made = _missing_folders(out)
    probe = os.path.join(os.path.abspath(out), f".write_test{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, f"--out {out} is not a writable folder ({e.strerror}: "
                               f"{e.filename}); nothing was read or written") from None
    finally:
        for folder in made:  # deepest first
            if os.path.isdir(folder):
                os.rmdir(folder)


_READERS = {"roco": _roco, "medicat": _medicat, "mimic_cxr": _mimic, "chexpert": _chexpert,
            "rsna": _rsna, "radnli": _radnli, "vqa_rad": _vqa_rad, "slake": _slake,
            "medvqa2019": _medvqa2019, "ms_cxr": _ms_cxr}


def prepare(dataset, root, out, seed=0, on_bad_image="error", allow_empty=False, cache_short_side=0,
            workers=None, mimic_root=None):
    """Prepare one dataset (or "all": root/<name>/ for each of the paper's nine, ALL) from its
    official layout; return the folders written.

    on_bad_image: "error" (an image that does not decode stops preparation, naming file and record)
    or "skip" (such records are dropped and counted under dropped["bad_image"]). allow_empty: write
    a folder with an empty split (a deliberately cut-down release) instead of stopping.
    cache_short_side: write a copy of every image, resized to that shorter side, into
    out/<dataset>/image_cache/ (see _check_images); 0, the default here, writes none, so that a call
    writes only the manifests unless asked (the command line asks, with CACHE_SHORT_SIDE).
    workers: processes decoding images (default: up to 8). mimic_root: the MIMIC-CXR-JPG folder
    whose files MS-CXR's rows name (ms_cxr only, and needed there)."""
    if (dataset == "ms_cxr") != (mimic_root is not None):
        raise ValueError("ms_cxr reads its images from a MIMIC-CXR-JPG folder: pass --mimic-root"
                         if dataset == "ms_cxr" else
                         f"--mimic-root is read by ms_cxr only, not by {dataset} (all prepares "
                         "the paper's nine; prepare ms_cxr on its own)")
    if mimic_root is not None and not os.path.isdir(mimic_root):
        raise FileNotFoundError(f"--mimic-root {mimic_root}: folder not found")
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be error or skip, got {on_bad_image!r}")
    if cache_short_side < 0:
        raise ValueError(f"cache_short_side must be a number of pixels, or 0 for no cache; "
                         f"got {cache_short_side}")
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    _check_writable(out)
    if dataset == "all":
        missing = [d for d in ALL if not os.path.isdir(os.path.join(root, d))]
        if missing:
            raise FileNotFoundError(f"prepare all expects {os.path.join(root, '<dataset>')} for "
                                    f"every dataset; missing: {missing}")
        done = [p for d in ALL
                for p in prepare(d, os.path.join(root, d), out, seed, on_bad_image, allow_empty,
                                 cache_short_side, workers)]
        if os.path.isdir(os.path.join(root, "ms_cxr")):
            print(f"ms_cxr is not part of all: prepare ms_cxr --root "
                  f"{os.path.join(root, 'ms_cxr')} --mimic-root {os.path.join(root, 'mimic_cxr')}")
        return done
    if dataset not in _READERS:
        raise ValueError(f"unknown dataset {dataset!r}; "
                         f"expected one of {', '.join(DATASETS)} or all")
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset}: root folder not found: {root}")
    # everything is read and checked before the first manifest is written
    folders = (_ms_cxr(root, seed, os.path.abspath(mimic_root)) if dataset == "ms_cxr"
               else _READERS[dataset](root, seed))
    cache_dir = (os.path.join(os.path.abspath(out), dataset, "image_cache")
                 if cache_short_side else None)
    made = _missing_folders(cache_dir) if cache_dir else []
    before = set(os.listdir(cache_dir)) if cache_dir and os.path.isdir(cache_dir) else set()
    try:
        folders = _check_images(folders, on_bad_image, cache_dir, cache_short_side, workers)
        _check_counts(folders, allow_empty)
    except Exception:
        # A stop (a bad image, implausible counts) leaves the output as it found it, as it did
        # before there was a cache. A kill or Ctrl-C (not an Exception) keeps every copy written so
        # far: the next run resumes from them.
        if cache_dir and os.path.isdir(cache_dir):
            for name in set(os.listdir(cache_dir)) - before:
                os.remove(os.path.join(cache_dir, name))
        for folder in made:  # deepest first
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise
    if cache_dir:
        _prune_cache(cache_dir, folders)
    for name, _, _ in folders:
        # A stale meta.json would make a half-rewritten folder look complete; removed from all
        # folders of the dataset first, so that a crash in the second folder cannot leave an older
        # third one beside a newer first one.
        stale = os.path.join(out, name, "meta.json")
        if os.path.exists(stale):
            os.remove(stale)
    return [_write_folder(out, name, splits, {"source": root, "seed": seed, **meta})
            for name, splits, meta in folders]


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Prepare a dataset from its official layout (see datasets.md).")
    p.add_argument("dataset", choices=DATASETS + ("all",),
                   help="dataset to prepare, or all (the paper's nine; expects ROOT/<dataset>/)")
    p.add_argument("--root", required=True,
                   help="folder of the official release (real or synthetic)")
    p.add_argument("--out", required=True,
                   help="output folder; one sub-folder per downstream task is written")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every carved split and sampled subset")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="an image that does not decode: stop with an error naming it (default), "
                        "or drop its records and count them in meta.json dropped['bad_image']")
    p.add_argument("--allow-empty-splits", action="store_true",
                   help="write a folder even when one of its splits is empty "
                        "(a deliberately cut-down release); by default an empty split stops "
                        "prepare with the counts")
    p.add_argument("--cache-short-side", type=int, default=CACHE_SHORT_SIDE, metavar="PIXELS",
                   help="write a copy of every image, resized to this shorter side "
                        "(never enlarged), as an uncompressed PGM into "
                        "OUT/<dataset>/image_cache/, which training reads instead "
                        f"(default {CACHE_SHORT_SIDE}: at least the largest preset's image size); "
                        "0: no cache")
    p.add_argument("--workers", type=int, help="processes decoding images (default: up to 8)")
    p.add_argument("--mimic-root", metavar="FOLDER",
                   help="ms_cxr only, and needed there: the MIMIC-CXR-JPG folder (holding files/) "
                        "whose films the MS-CXR CSV's paths name; all does not prepare ms_cxr")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        folders = prepare(args.dataset, args.root, args.out, args.seed, args.on_bad_image,
                          args.allow_empty_splits, args.cache_short_side, args.workers,
                          args.mimic_root)
    # every one names its file and row: the message, not a traceback
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"prepare {args.dataset}: {e}") from None
    print(f"prepared {len(folders)} folder(s) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
