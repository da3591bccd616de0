"""Where the entry scripts find their data: a user's prepared folder, or the synthetic world, made
on demand.

    root, tokenizer_path = ensure_prepared(cfg, ["roco", "medicat", "mimic_cxr"], d, print)

With --data-root, every needed prepared folder must exist (the error prints the prepare command);
such a run never imports synth.py or prepare.py, which are loaded only in the branch that makes the
embedded world. Without it, rank 0 generates the synthetic world (synth.py) under
<synth_root>/<scale>/raw, prepares what is needed under .../prepared and trains the WordPiece
tokenizer on the pre-training texts, saying what it creates; other ranks wait at a barrier.
The root's tokenizer is bound to the pre-training corpora it was trained on: when more (or other)
corpora have been prepared into the root since, it is refused with what differs
(check_tokenizer_corpora).
"""

import hashlib
import json
import os

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from .. import data, distributed, manifests
from ..files import write_atomic
from ..tokenizer import SPECIAL_TOKENS, bert_pipeline, load_tokenizer

# prepared folder -> the dataset whose prepare step writes it
SOURCE = {"roco_retrieval": "roco", "mimic_gen": "mimic_cxr", "mimic_sum": "mimic_cxr"}
PRETRAIN_SETS = ("roco", "medicat", "mimic_cxr")
WORLD_SEED = 0  # the synthetic world is one fixed world; --seed varies training, not the data


def ensure_prepared(cfg, names, proc, print0=print, trained_with=None):
    """(prepared root, tokenizer file) for a run that reads the prepared folders `names`.

    trained_with: the tokenizer a resumed run's checkpoint carries. The run keeps it: the tokenizer
    it would otherwise use is taken only when its content is the same; an explicit --tokenizer
    (or --init's) that differs is refused, naming both; the root's, when it differs or is missing,
    is left as it is and the checkpoint's is used instead (copied into --out, said), so that a
    resumed run never trains a tokenizer into the root."""
    if cfg.data_root:
        root = cfg.data_root
        missing = [n for n in names if not os.path.isfile(os.path.join(root, n, "meta.json"))]
        if missing:
            cmds = "\n  ".join(
                f"python -m ptunifier_min.datasets.prepare {s} --root RAW/{s} --out {root}"
                + " --mimic-root RAW/mimic_cxr" * (s == "ms_cxr")
                for s in sorted({SOURCE.get(n, n) for n in missing}))
            raise SystemExit(f"--data-root {root} has no complete preparation of "
                             f"{', '.join(missing)}; run:\n  {cmds}")
    else:
        # here, not at the top: a run on a user's --data-root never loads the generator
        from . import prepare, synth
        base = os.path.join(cfg.synth_root, cfg.synth_scale)
        raw, root = os.path.join(base, "raw"), os.path.join(base, "prepared")
        # the tokenizer is trained on the pre-training texts, so those must be prepared too
        if not cfg.tokenizer:
            names = list(names) + list(PRETRAIN_SETS)
        if proc.main:
            # synth_counts.json is written last: without it, a world is absent or was interrupted
            if not os.path.isfile(os.path.join(raw, "synth_counts.json")):
                partial = os.path.isdir(raw) and bool(os.listdir(raw))
                print0(f"{'an interrupted' if partial else 'no'} synthetic world at {raw}: "
                       f"{'replacing' if partial else 'generating'} it "
                       f"(scale {cfg.synth_scale}, seed {WORLD_SEED})")
                synth.generate(raw, seed=WORLD_SEED, scale=cfg.synth_scale, overwrite=True)
            for name in sorted({SOURCE.get(n, n) for n in names
                                if not os.path.isfile(os.path.join(root, n, "meta.json"))}):
                if not os.path.isdir(os.path.join(raw, name)):  # a world older than this dataset
                    print0(f"the synthetic world at {raw} has no {name}: adding it")
                    synth.generate(raw, seed=WORLD_SEED, scale=cfg.synth_scale, datasets=[name])
                print0(f"preparing synthetic {name} into {root}")
                prepare.prepare(name, os.path.join(raw, name), root, seed=WORLD_SEED,
                                # what a user's run reads: the cache
                                cache_short_side=prepare.CACHE_SHORT_SIDE,
                                # MS-CXR's films are the MIMIC-CXR world's
                                mimic_root=os.path.join(raw, "mimic_cxr") if name == "ms_cxr"
                                else None)
        distributed.barrier(proc)
    tok_path = cfg.tokenizer or os.path.join(root, "tokenizer.json")
    if trained_with:
        return root, _resumed_tokenizer(trained_with, tok_path, bool(cfg.tokenizer), cfg.out, proc,
                                        print0)
    sets = [n for n in PRETRAIN_SETS if os.path.isfile(os.path.join(root, n, "meta.json"))]
    if not os.path.isfile(tok_path):
        if cfg.tokenizer or not sets:
            raise SystemExit(f"no tokenizer at {tok_path} and no prepared pre-training set under "
                             f"{root} to train one from: pass --tokenizer (a tokenizer.json or "
                             "BERT vocab.txt)")
        if proc.main:
            records = data.load_pretrain_records(root, sets, "train")
            texts = [t for r in records for t in r["texts"]]
            corpora = {n: {"records": sum(r["dataset"] == n for r in records),
                           "texts": sum(len(r["texts"]) for r in records if r["dataset"] == n)}
                       for n in sets}
            print0(f"training a WordPiece tokenizer on {len(texts):,} texts of {', '.join(sets)} "
                   f"-> {tok_path}")
            train_tokenizer(texts, cfg.model.vocab_size, tok_path, corpora=corpora)
        distributed.barrier(proc)
    elif not cfg.tokenizer:
        check_tokenizer_corpora(
            tok_path, {n: data.read_meta(os.path.join(root, n))["counts"]["train"] for n in sets})
    return root, tok_path


def _resumed_tokenizer(saved, wanted, explicit, out, proc, print0):
    """The tokenizer a resumed run uses (see ensure_prepared). Compared by content: on real data a
    retrained vocabulary has the same size as the old one, and nothing else tells them apart."""
    have = manifests.sha256_file(saved)
    if os.path.isfile(wanted) and _sha256(wanted) == have:
        return wanted
    found = (f"{wanted} (sha256 {_sha256(wanted)[:16]})"
             if os.path.isfile(wanted) else f"{wanted} (missing)")
    if explicit:
        raise SystemExit(f"the tokenizer {found} is not the one the run being resumed was trained "
                         f"with, {saved} (sha256 {have[:16]}): resume with the tokenizer it "
                         "started with, or start a new run in another --out")
    # the checkpoint's folder goes when a later checkpoint replaces it: keep a copy in --out
    copy = os.path.join(out, "tokenizer.json")
    print0(f"the root's tokenizer {found} is not the one this run was trained with: resuming with "
           f"the checkpoint's own {saved} (sha256 {have[:16]}), copied to {copy}")
    if proc.main:
        with open(saved, encoding="utf-8") as f:
            write_atomic(copy, f.read())
    distributed.barrier(proc)
    return copy


def _sha256(path):
    # RoBERTa's vocab.json + merges.txt travel in checkpoints as the one tokenizer.json made of them
    # (pretrained.single_file_tokenizer): compare that
    if os.path.basename(path) == "vocab.json":
        text = load_tokenizer(path).to_str(pretty=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    return manifests.sha256_file(path)


# ---- the tokenizer trained on the prepared pre-training texts -----------------------------------
def _continuation_pieces(texts, normalizer, pre_tokenizer):
    """'##c' for every character c that can continue a word of the corpus (i.e. is not split off as
    punctuation)."""
    chars = set()
    for t in texts:
        chars.update(t)
    chars = set(normalizer.normalize_str("".join(sorted(chars)))) - {" "}
    return ["##" + c for c in sorted(chars) if len(pre_tokenizer.pre_tokenize_str("a" + c)) == 1]


def train_tokenizer(texts, vocab_size, path, corpora=None):
    """Train a lower-cased BERT WordPiece tokenizer; save it as tokenizer.json (`path` is that file
    or its folder).

    corpora ({dataset: {"records": n, "texts": m}}, what `texts` came from) is written beside it as
    its record (see tokenizer_record), so that the tokenizer is never silently reused for other
    data."""
    texts = list(texts)
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the '##c' pieces in hash-map order, and merge ties are broken by those
    # numbers, so the vocabulary changes from run to run (huggingface/tokenizers#1794). Handing it
    # every '##c' up front, in sorted order, makes training deterministic; they are then made
    # ordinary vocabulary entries again below.
    pieces = _continuation_pieces(texts, normalizer, pre_tokenizer)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=SPECIAL_TOKENS + pieces,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(models.WordPiece(tok.get_vocab(), unk_token="[UNK]",
                                     continuing_subword_prefix="##"))
    tok.add_special_tokens(SPECIAL_TOKENS)  # already in the vocabulary: ids 0..4 stay
    tok = bert_pipeline(tok, lowercase=True)
    out = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # what tok.save writes; written here through write_atomic instead
    text = tok.to_str(pretty=True)
    # The record first: a crash between the two writes leaves a record whose sha256 matches no
    # tokenizer.json (or none at all), which tokenizer_record refuses, never a tokenizer without a
    # word on what it was trained on.
    record = {"corpora": corpora, "texts": len(texts), "vocab_size": tok.get_vocab_size(),
              "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    write_atomic(tokenizer_record_path(out), json.dumps(record, indent=1) + "\n")
    write_atomic(out, text)
    return tok


def tokenizer_record_path(path):
    """tokenizer.json -> tokenizer.meta.json. A file beside it, not a key inside: the tokenizers
    library does not promise to keep (or to accept) keys of its own JSON format it does not know,
    and a record that another program may drop on a re-save would bind nothing."""
    return os.path.splitext(path)[0] + ".meta.json"


def tokenizer_record(path):
    """The record of a tokenizer.json that train_tokenizer wrote: {"corpora", "texts", "vocab_size",
    "sha256"}.

    None when there is no record (a tokenizer made elsewhere, or by an older version); an error
    naming the files when the record is unreadable or describes another file than the tokenizer
    beside it (replaced, or a crash between the two writes)."""
    meta = tokenizer_record_path(path)
    if not os.path.exists(meta):
        return None
    try:
        with open(meta, encoding="utf-8") as f:
            record = json.load(f)
        sha = record["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta}: not a readable tokenizer record ({e}); "
                         f"delete it and {path} to retrain") from None
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != sha:
            raise ValueError(f"{path} is not the file its record {meta} describes "
                             "(replaced, damaged, or written half): delete both to retrain it")
    return record


def check_tokenizer_corpora(tok_path, prepared):
    """Refuse the root's tokenizer when the prepared pre-training corpora ({name: train records})
    are not the ones it was trained on: a vocabulary learnt on ROCO cuts MIMIC reports into ~3x as
    many pieces, and nothing else would say so. Refused, not retrained: a run resuming under this
    root must keep the vocabulary its weights were trained with, and deleting a file the user may
    still need is not ours to do. An explicit --tokenizer is used as given."""
    try:
        record = tokenizer_record(tok_path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if record is None or not isinstance(record.get("corpora"), dict):
        raise SystemExit(f"{tok_path} has no record of the corpora it was trained on (no valid "
                         f"{tokenizer_record_path(tok_path)}); delete it to retrain it on the "
                         f"prepared pre-training sets, or pass --tokenizer {tok_path} to use it "
                         "anyway")
    trained = {n: c.get("records") if isinstance(c, dict) else None
               for n, c in record["corpora"].items()}
    if trained != prepared:
        record_name = os.path.basename(tokenizer_record_path(tok_path))
        raise SystemExit(f"{tok_path} was trained on {_listing(trained)}, but the prepared "
                         f"pre-training corpora are now {_listing(prepared)}: delete it (and "
                         f"{record_name}) to retrain it on them, or pass --tokenizer {tok_path} "
                         f"to use it anyway")


def _listing(corpora):
    return (", ".join(f"{n} ({k:,} train records)" if isinstance(k, int) else n
                      for n, k in sorted(corpora.items()))
            or "none")
