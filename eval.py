"""Evaluate a checkpoint on a downstream test set, or gather fine-tuning results into Table 2.

    python eval.py --task roco_retrieval --ckpt runs/pretrain  # zero-shot retrieval (ITC head)
    python eval.py --task roco_retrieval --ckpt runs/pretrain --rerank-top 16  # ... ITM re-ranking
    python eval.py --task roco_retrieval --ckpt runs/pretrain --retrieval-pairs all  # whole split
    torchrun --nproc_per_node=8 eval.py --ckpt runs/finetune/mimic_gen-pretrained  # 8 shares
    python eval.py --task chexpert --ckpt runs/pretrain        # zero-shot CheXpert via text prompts
    python eval.py --ckpt runs/finetune/vqa_rad-pretrained     # re-evaluate a fine-tuned checkpoint
    python eval.py --table runs/finetune                       # Table 2 from every results.json

A pre-training checkpoint is evaluated zero-shot (retrieval and CheXpert only: the other tasks need
a trained head); a fine-tuned checkpoint is rebuilt from its own config and evaluated on its task.
--out DIR writes DIR/results.json in finetune.py's format, so that zero-shot numbers can join the
table; a training run's folder is refused as --out (its own results.json is never overwritten).
A checkpoint is scored only on the splits it was trained against (the ids it recorded), and only
a finished fine-tuning run is scored (an unfinished one is named, with how to finish it). The table
counts the test results of live runs, each checkpoint once: a run --overwrite moved aside
(.replaced-*) and val results are left out and said. Under torchrun each rank evaluates its share
of the records and rank 0 prints and writes; the metrics are those of one process.
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from ptunifier_min import checkpoint, data, distributed, grounding, manifests, runs, tasks
from ptunifier_min import config as config_lib
from ptunifier_min.config import FinetuneConfig
from ptunifier_min.datasets.source import SOURCE, ensure_prepared
from ptunifier_min.fields import option
from ptunifier_min.files import write_json
from ptunifier_min.api import load_checkpoint
from ptunifier_min.tokenizer import load_tokenizer

ZERO_SHOT = [name for name, task in tasks.TASKS.items() if task.zero_shot]
PAPER_PAIRS = 2000  # the retrieval protocol of M3AE and PTUnifier: 2,000 pairs of the ROCO split

# Table 2 of the paper: (heading, task, metric), shown as percentages
COLUMNS = [("CheXpert AUROC", "chexpert", "auroc"), ("RSNA AUROC", "rsna", "auroc"),
           ("RadNLI Acc", "radnli", "accuracy"), ("MIMIC sum RG-L", "mimic_sum", "ROUGE_L"),
           ("MIMIC gen BL-4", "mimic_gen", "BLEU_4"), ("ROCO i2t R@1", "roco_retrieval", "i2t_r1"),
           ("ROCO t2i R@1", "roco_retrieval", "t2i_r1"), ("VQA-RAD Acc", "vqa_rad", "overall"),
           ("SLAKE Acc", "slake", "overall"), ("MedVQA-2019 Acc", "medvqa2019", "overall")]




@dataclass
class EvalConfig:
    """eval.py's flags; everything else (architecture, data, decoding) comes from the checkpoint's
    own config."""

    task: str = option("", "task to evaluate; empty = the fine-tuned checkpoint's task. Zero-shot "
                       "from a pre-training checkpoint: roco_retrieval | chexpert")
    ckpt: str = option("", "checkpoint: a run folder (follows `latest`) or a step folder")
    table: str = option("", "instead of evaluating: print Table 2 from every results.json under "
                        "this folder and write table.json")
    split: str = option("test", "split to evaluate: test | val")
    rerank_top: int = option(0, "retrieval: re-rank each image's top K texts with the ITM head (0 "
                             "= ITC ranking only)", valid=">= 0")
    retrieval_pairs: str = option(str(PAPER_PAIRS),
                                  "retrieval: N = the first N (by id) of the ROCO pairs "
                                  "prepare.py drew for the paper's protocol (roco_retrieval: "
                                  f"{PAPER_PAIRS:,} of the split, all if it has fewer), at most as "
                                  "many as it holds; all = every pair of the ROCO split (the "
                                  "prepared roco folder, same filters)")
    data_root: str = option("", "prepared data folder; empty = the one the checkpoint was trained "
                            "on")
    synth_root: str = option("", "synthetic world folder; empty = the checkpoint's")
    synth_scale: str = option("", "synthetic world scale; empty = the checkpoint's")
    eval_batch_size: int = option(64, "samples per evaluation batch", valid=">= 1")
    beam_size: int = option(0, "beam size for TS / ITG; 0 = the fine-tuning run's", valid=">= 0")
    length_penalty: float = option(-1.0, "beam length penalty; negative = the fine-tuning run's")
    precision: str = option("auto", "bf16 | fp32 | auto (bf16 on CUDA and on CPUs with "
                            "AVX512-BF16/AMX, else fp32)")
    num_workers: int = option(2, "data-loader worker processes", valid=">= 0")
    out: str = option("", "folder to write results.json into (finetune.py's format); empty = print "
                      "only")
    overlays: int = option(0, "ms_cxr: also write this many PNG overlays (the film with each "
                              "method's map and the sentence's boxes) into <--out>/overlays",
                           valid=">= 0")
    dist_timeout_min: float = config_lib.dist_timeout_field()


def main(argv=None):
    args = config_lib.parse_args(EvalConfig, {}, argv, description=__doc__.split("\n")[0])
    if args.table:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("eval.py --table reads results files: run it as one process "
                             "(python eval.py --table DIR), not under torchrun")
        print(render_table(args.table))
        return 0
    if not args.ckpt:
        raise SystemExit("eval.py needs --ckpt DIR (or --table DIR)")
    if args.split not in ("test", "val"):
        raise SystemExit(f"--split must be test or val, got {args.split!r}")
    if args.task:
        tasks.get_task(args.task)  # an unknown name fails here, listing the tasks
    pairs = retrieval_pairs(args.retrieval_pairs)
    if args.out:
        refuse_run_folder(args.out)
    ckpt = finished_checkpoint(args.ckpt)
    proc = distributed.setup_distributed(0, args.dist_timeout_min)
    print0 = print if proc.main else (lambda *a, **k: None)
    precision = distributed.resolve_precision(args.precision, proc.device)
    saved = checkpoint.read_checkpoint_config(ckpt)["config"]
    tok_path = checkpoint.checkpoint_tokenizer(ckpt)
    tok = load_tokenizer(tok_path)
    zero_shot = "task" not in saved  # a pre-training checkpoint: no task head, the ITC head only

    if zero_shot:
        name = args.task or "roco_retrieval"
        if name not in ZERO_SHOT:
            raise SystemExit(f"{ckpt} is a pre-training checkpoint: zero-shot evaluation covers "
                             f"{', '.join(ZERO_SHOT)}; "
                             f"for {name} fine-tune first: "
                             f"python finetune.py --task {name} --init {args.ckpt}")
        keep = {k: saved[k] for k in ("data_root", "synth_root", "synth_scale", "seed")
                if k in saved}
        cfg = config_lib.build(FinetuneConfig, {**keep, **saved["model"], "task": name})
    else:
        cfg = config_lib.from_dict(FinetuneConfig, saved)
        if args.task and args.task != cfg.task:
            raise SystemExit(f"{ckpt} was fine-tuned on {cfg.task}, not {args.task}")
        cfg.beam_size = args.beam_size or cfg.beam_size
        cfg.length_penalty = cfg.length_penalty if args.length_penalty < 0 else args.length_penalty
    task = tasks.get_task(cfg.task)
    retrieves = task.kind is tasks.RETRIEVE  # the pairs it scores are chosen by --retrieval-pairs
    if args.overlays and (task.kind is not tasks.GROUND or not args.out):
        raise SystemExit("--overlays draws phrase-grounding maps: it needs --task ms_cxr and --out")
    if "retrieval_pairs" in args.given and not retrieves:
        raise SystemExit(f"--retrieval-pairs chooses retrieval pairs; {task.name} is not a "
                         "retrieval task")
    for k in ("data_root", "synth_root", "synth_scale"):
        if getattr(args, k):
            setattr(cfg, k, getattr(args, k))
    cfg.eval_batch_size, cfg.num_workers, cfg.tokenizer = (
        args.eval_batch_size, args.num_workers, tok_path)

    whole = retrieves and pairs == "all"
    root, _ = ensure_prepared(cfg, [task.folder] + (["roco"] if whole else []), proc, print0)
    folder = os.path.join(root, task.folder)
    meta = data.read_meta(folder)
    # and the folder it is cut from (zero-shot ROCO retrieval: pre-training read roco's train)
    check_splits(ckpt, root, sorted({task.folder, SOURCE.get(task.folder, task.folder)}))
    records = data.read_split(folder, args.split, required=task.fields)
    if retrieves:
        records, what = choose_pairs(records, pairs, os.path.join(root, "roco"), args.split)
        print0(f"retrieval pairs: {what}")
    model = load_checkpoint(ckpt, proc.device)[0]  # the backbone, or the fine-tuned TaskModel
    print0(f"{'zero-shot' if zero_shot else 'fine-tuned'} {task.name} on {len(records):,} "
           f"{args.split} records of {folder}; checkpoint {ckpt}"
           + (f"; {proc.world} ranks, each evaluating its share" if proc.world > 1 else ""))
    inputs = dict(image_size=cfg.model.image_size, max_text_len=cfg.model.max_text_len,
                  device=proc.device, precision=precision, proc=proc)
    if zero_shot:
        # through the backbone's own ITC head: retrieval, or CheXpert's labels as text prompts
        m = task.zero_shot(model, task, records, meta, tok, **inputs,
                           rerank_top=args.rerank_top, print0=print0)
        init = ckpt
    else:
        m = tasks.evaluate(model, task, records, tok, **inputs, meta=meta,
                           max_gen_len=cfg.max_gen_len, batch_size=cfg.eval_batch_size,
                           beam_size=cfg.beam_size, length_penalty=cfg.length_penalty,
                           rerank_top=args.rerank_top, num_workers=cfg.num_workers,
                           print0=print0)
        init = saved.get("init") or "scratch"
        run = os.path.join(os.path.dirname(ckpt), "results.json")
        if os.path.isfile(run):  # the fine-tuning run recorded the init it resolved
            with open(run) as f:
                init = json.load(f).get("init", init)
    print0(json.dumps(m, indent=1))
    if args.overlays and proc.main:
        paths = grounding.write_overlays(model, records[:args.overlays], tok,
                                         cfg.model.image_size, cfg.model.max_text_len, proc.device,
                                         os.path.join(args.out, "overlays"))
        print0(f"overlays: {len(paths)} in {os.path.join(args.out, 'overlays')}")
    if args.out and proc.main:
        os.makedirs(args.out, exist_ok=True)
        results = {"task": task.name, "metrics": m, "split": args.split, "zero_shot": zero_shot,
                   "init": init, "checkpoint": os.path.abspath(ckpt),
                   "config": config_lib.to_dict(cfg),
                   "eval_config": dataclasses.asdict(args)}
        write_json(os.path.join(args.out, "results.json"), results)
        print0(f"wrote {os.path.join(args.out, 'results.json')}")
    distributed.leave(proc)
    return 0


def refuse_run_folder(out):
    """--out must not be a training run's folder: its results.json (test metrics, val_metrics,
    best_step, split_hash) would be lost. A results.json eval.py wrote may be replaced."""
    found = [n for n in runs.RUN_FILES if n != "results.json"
             and os.path.exists(os.path.join(out, n))]
    path = os.path.join(out, "results.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                ours = "eval_config" in json.load(f)
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            found.append("results.json")
    if found:
        raise SystemExit(f"--out {out} holds a training run ({', '.join(found)}): eval.py never "
                         f"writes over it; pass another folder, e.g. --out "
                         f"{os.path.normpath(out)}-eval")


def finished_checkpoint(path):
    """The checkpoint to score: a finished run's (its `latest`) or a step folder. A fine-tuning
    run that has not finished, or the resumable state inside one (train_state: the weights of its
    last validation, not those selected on val), is refused, saying how to finish it."""
    state = os.path.join(path, "train_state")
    if os.path.isdir(state) and not os.path.isfile(os.path.join(path, "latest")):
        try:
            saved = checkpoint.read_checkpoint_config(state)
        except checkpoint.CheckpointError:
            raise SystemExit(f"{path} is a fine-tuning run stopped before its first validation: "
                             "nothing to evaluate or resume; run it again with --overwrite")
        raise SystemExit(
            f"{path} is an unfinished fine-tuning run: it stopped at step {saved['step']} of "
            f"{saved['config']['steps']} ({checkpoint.resolve_checkpoint(state)}) and has no "
            "weights selected on val yet. Finish it with the command that started it plus "
            f"--resume: python finetune.py --task {saved['config']['task']} ... --out {path} "
            f"--resume {path} (its settings are in {os.path.join(path, 'config.json')}); it then "
            "scores the selected weights on test itself")
    try:
        ckpt = checkpoint.resolve_checkpoint(path)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"--ckpt {path}: {e}") from None
    if os.path.basename(os.path.dirname(os.path.abspath(ckpt))) == "train_state":
        run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
        raise SystemExit(f"{ckpt} is the resumable state of the fine-tuning run {run}: the weights "
                         "of its last validation, not those it selected on val; evaluate the run "
                         f"itself: --ckpt {run}")
    return ckpt


def check_splits(ckpt, root, folders):
    """Refuse to score a checkpoint on other splits than those it was trained against: the ids of
    every split of `folders` it recorded (data.json) must be those under `root` now. A folder
    prepared again with another --seed moves training records into test, and the scores would
    count them."""
    saved = checkpoint.read_data_record(ckpt)
    if saved is None:
        print(f"note: {ckpt} records no data (a checkpoint from an older version): "
              "its splits cannot be checked")
        return
    for folder in [f for f in folders if f in saved["splits"]]:
        if not os.path.isfile(os.path.join(root, folder, "meta.json")):
            print(f"note: {ckpt} was trained on {folder}, which {root} does not hold: "
                  "its splits cannot be compared")
            continue
        for split, want in sorted(saved["splits"][folder].items()):
            have = manifests.ids_hash(data.read_split(os.path.join(root, folder), split))
            if have != want:
                raise SystemExit(
                    f"{ckpt} was trained against another {folder} {split} split than "
                    f"{os.path.join(root, folder, split)}.jsonl holds: ids sha256 {want[:16]} "
                    f"then, {have[:16]} now (prepared again, with another --seed, or another "
                    "root?); its scores there could count training records as test. Evaluate "
                    "on the data it was trained on (--data-root), or train again on this one")


def retrieval_pairs(value):
    """--retrieval-pairs: 'all' or a number of pairs >= 1."""
    if value == "all":
        return value
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"--retrieval-pairs must be a number of pairs (>= 1) or all, "
                         f"got {value!r}")
    return int(value)


def choose_pairs(records, pairs, roco_folder, split):
    """The retrieval records --retrieval-pairs asks for, and a line saying which they are: the
    first `pairs` by id of the prepared roco_retrieval split (the paper's protocol: prepare.py's
    seeded 2,000 of the ROCO split), or, for 'all', every record of the ROCO split itself."""
    if pairs == "all":
        every = data.read_split(roco_folder, split, allow_empty=False)
        return every, (f"all {len(every):,} of the ROCO {split} split ({roco_folder}); the "
                       f"paper's protocol uses {min(PAPER_PAIRS, len(every)):,} of them")
    records = sorted(records, key=lambda r: r["id"])
    what = (f"{min(pairs, len(records)):,} of the {len(records):,} prepared for the paper's "
            f"protocol ({PAPER_PAIRS:,} pairs of the ROCO {split} split, all if it has fewer)")
    if pairs > len(records):
        what += f"; --retrieval-pairs {pairs} asked for more: all scores the whole split"
    return records[:pairs], what


# ---- Table 2 -------------------------------------------------------------------------------------
def run_group(r):
    """The table row of a results.json: zero-shot, pre-trained or scratch, and the share of training
    data."""
    if r.get("zero_shot"):
        return "zero-shot"
    group = "scratch" if r.get("init", "scratch") == "scratch" else "pre-trained"
    frac = r.get("config", {}).get("data_frac", 1.0)
    return group if frac >= 1 else f"{group}, {100 * frac:g}% train"


def _row_order(group):
    base, _, frac = group.partition(", ")
    rank = {"pre-trained": 0, "scratch": 1, "zero-shot": 2}.get(base, 3)
    return (1, float(frac.split("%")[0]), rank) if frac else (0, 0.0, rank)


def read_results(path, root):
    """A results.json as finetune.py and eval.py write it, or an error naming the file. An error,
    not a skip: a table that leaves a run out in silence misstates its n, and every results.json
    this project writes is written whole, so a broken one is foreign or damaged: the user decides
    what it is."""
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        problem = _results_problem(r)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = "an empty file" if os.path.getsize(path) == 0 else f"not JSON ({e})"
    if problem:
        raise SystemExit(f"{path}: {problem}; not a results.json that finetune.py or eval.py "
                         f"writes. Move it out of {root} (or delete it) and run --table again")
    return r


def _results_problem(r):
    if not isinstance(r, dict):
        return f"{manifests.json_type(r)}, not an object"
    if not isinstance(r.get("task"), str) or not isinstance(r.get("metrics"), dict):
        return "no 'task' name and 'metrics' object"
    if r.get("split", "test") not in ("test", "val"):
        return f"split {r['split']!r}, not test or val"
    for _, task, key in COLUMNS:
        value = r["metrics"].get(key) if task == r["task"] else None
        if not isinstance(value, (int, float, type(None))) or isinstance(value, bool):
            return f"metric {key!r} is {manifests.json_type(value)}, not a number"
    return None


def checkpoint_of(r, path):
    """The checkpoint a results.json scored, as a real path: finetune.py's lies in the run folder
    beside it (its record may be relative to where the run started); eval.py's is absolute."""
    ckpt = r.get("checkpoint")
    if not isinstance(ckpt, str):
        return path
    if "eval_config" not in r:
        ckpt = os.path.join(os.path.dirname(path), os.path.basename(ckpt))
    return os.path.realpath(ckpt)


def collect(root):
    """({group: {heading: [(value or None, path), ...]}}, [what was left out, and why]) from the
    test results of every live run under root, each checkpoint once per task."""
    rows, seen, left_out = {}, {}, []
    for dirpath, dirnames, files in os.walk(root):
        # hidden folders hold no live run: .replaced-* (an earlier run --overwrite moved aside),
        # .tmp_* (a checkpoint being written)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if "results.json" not in files:
            continue
        path = os.path.join(dirpath, "results.json")
        r = read_results(path, root)
        if r.get("split", "test") != "test":
            left_out.append(f"{path}: {r['split']} results (Table 2 reports test)")
            continue
        key = (checkpoint_of(r, path), r["task"])
        if key in seen:
            left_out.append(f"{path}: the same checkpoint and task as {seen[key]}")
            continue
        seen[key] = path
        for heading, task, metric in COLUMNS:
            if r["task"] == task and metric in r["metrics"]:
                rows.setdefault(run_group(r), {}).setdefault(heading, []).append(
                    (r["metrics"][metric], path))
    return rows, left_out


def render_table(root):
    """Markdown in the layout of the paper's Table 2 (percentages; the mean when a cell has several
    runs), and root/table.json with the same numbers and the results.json files behind each cell."""
    rows, left_out = collect(root)
    for line in left_out:
        print(f"not counted: {line}", file=sys.stderr)
    if not rows:
        raise SystemExit(f"no results.json with a Table 2 test metric under {root}")
    headings = [h for h, _, _ in COLUMNS]
    lines = ["| run | " + " | ".join(headings) + " |", "|---|" + "---:|" * len(headings)]
    table = []
    for group in sorted(rows, key=_row_order):
        cells, out = [], {}
        for h in headings:
            runs = rows[group].get(h, [])
            values = [v for v, _ in runs if v is not None]
            mean = 100 * sum(values) / len(values) if values else None
            text = "-" if not runs else "undefined" if mean is None else f"{mean:.1f}"
            if len(runs) > 1:
                text += f" (n={len(runs)})"
            cells.append(text)
            out[h] = {"value": mean, "runs": [p for _, p in runs]}
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
        table.append({"run": group, "cells": out})
    markdown = "\n".join(lines)
    write_json(os.path.join(root, "table.json"),
                          {"columns": headings, "rows": table, "markdown": markdown,
                           "not_counted": left_out})
    return markdown


if __name__ == "__main__":
    runs.run_script(main)
