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
table. Under torchrun each rank evaluates its share of the records and rank 0 prints and writes; the
metrics are those of one process.
"""

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import torch

from ptunifier_min import config as config_lib
from ptunifier_min import checkpoint, data, distributed, tasks
from ptunifier_min.config import FinetuneConfig
from ptunifier_min.model import PTUnifier
from ptunifier_min.datasets.source import ensure_prepared

ZERO_SHOT = ("roco_retrieval", "chexpert")
PAPER_PAIRS = 2000  # the retrieval protocol of M3AE and PTUnifier: 2,000 pairs of the ROCO split

# Table 2 of the paper: (heading, task, metric), shown as percentages
COLUMNS = [("CheXpert AUROC", "chexpert", "auroc"), ("RSNA AUROC", "rsna", "auroc"),
           ("RadNLI Acc", "radnli", "accuracy"), ("MIMIC sum RG-L", "mimic_sum", "ROUGE_L"),
           ("MIMIC gen BL-4", "mimic_gen", "BLEU_4"), ("ROCO i2t R@1", "roco_retrieval", "i2t_r1"),
           ("ROCO t2i R@1", "roco_retrieval", "t2i_r1"), ("VQA-RAD Acc", "vqa_rad", "overall"),
           ("SLAKE Acc", "slake", "overall"), ("MedVQA-2019 Acc", "medvqa2019", "overall")]


_f = config_lib._f  # a field with its help and its allowed values, checked by parse_args


@dataclass
class EvalConfig:
    """eval.py's flags; everything else (architecture, data, decoding) comes from the checkpoint's
    own config."""

    task: str = _f("", "task to evaluate; empty = the fine-tuned checkpoint's task. "
                       "Zero-shot from a pre-training checkpoint: roco_retrieval | chexpert")
    ckpt: str = _f("", "checkpoint: a run folder (follows `latest`) or a step folder")
    table: str = _f("", "instead of evaluating: print Table 2 from every results.json under this "
                        "folder and write table.json")
    split: str = _f("test", "split to evaluate: test | val")
    rerank_top: int = _f(0, "retrieval: re-rank each image's top K texts with the ITM head "
                            "(0 = ITC ranking only)",
                         valid=">= 0")
    retrieval_pairs: str = _f(str(PAPER_PAIRS),
                              "retrieval: N = the first N (by id) of the ROCO pairs prepare.py "
                              f"drew for the paper's protocol (roco_retrieval: {PAPER_PAIRS:,} "
                              "of the split, all if it has fewer), at most as many as it holds; "
                              "all = every pair of the ROCO split (the prepared roco folder, "
                              "same filters)")
    data_root: str = _f("", "prepared data folder; empty = the one the checkpoint was trained on")
    synth_root: str = _f("", "synthetic world folder; empty = the checkpoint's")
    synth_scale: str = _f("", "synthetic world scale; empty = the checkpoint's")
    eval_batch_size: int = _f(64, "samples per evaluation batch", valid=">= 1")
    beam_size: int = _f(0, "beam size for TS / ITG; 0 = the fine-tuning run's", valid=">= 0")
    length_penalty: float = _f(-1.0, "beam length penalty; negative = the fine-tuning run's")
    precision: str = _f("auto", "bf16 | fp32 | auto (bf16 on CUDA and on CPUs with "
                                "AVX512-BF16/AMX, else fp32)")
    num_workers: int = _f(2, "data-loader worker processes", valid=">= 0")
    out: str = _f("", "folder to write results.json into (finetune.py's format); "
                      "empty = print only")
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
    proc = distributed.setup_distributed(0, args.dist_timeout_min)
    print0 = print if proc.main else (lambda *a, **k: None)
    precision = distributed.resolve_precision(args.precision, proc.device)
    ckpt = checkpoint.resolve_checkpoint(args.ckpt)
    saved = checkpoint.read_checkpoint_config(ckpt)["config"]
    tok_path = checkpoint.checkpoint_tokenizer(ckpt)
    tok = data.load_tokenizer(tok_path)
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
    if "retrieval_pairs" in args.given and task.metric != "recall":
        raise SystemExit(f"--retrieval-pairs chooses retrieval pairs; {task.name} is not a "
                         "retrieval task")
    for k in ("data_root", "synth_root", "synth_scale"):
        if getattr(args, k):
            setattr(cfg, k, getattr(args, k))
    cfg.eval_batch_size, cfg.num_workers, cfg.tokenizer = (
        args.eval_batch_size, args.num_workers, tok_path)

    whole = task.metric == "recall" and pairs == "all"
    root, _ = ensure_prepared(cfg, [task.folder] + (["roco"] if whole else []), proc, print0)
    folder = os.path.join(root, task.folder)
    meta = data.read_meta(folder)
    records = data.read_split(folder, args.split)
    if task.metric == "recall":
        records, what = choose_pairs(records, pairs, os.path.join(root, "roco"), args.split)
        print0(f"retrieval pairs: {what}")
    backbone = PTUnifier(cfg.model)
    print0(f"{'zero-shot' if zero_shot else 'fine-tuned'} {task.name} on {len(records):,} "
           f"{args.split} records of {folder}; checkpoint {ckpt}"
           + (f"; {proc.world} ranks, each evaluating its share" if proc.world > 1 else ""))
    inputs = dict(image_size=cfg.model.image_size, max_text_len=cfg.model.max_text_len,
                  device=proc.device, precision=precision, proc=proc)
    if zero_shot:
        checkpoint.load_weights(ckpt, backbone, strict=True)
        backbone.to(proc.device).eval()
        if task.name == "chexpert":
            m = tasks.zero_shot_classification(backbone, records, meta["label_names"], tok,
                                               **inputs)
        else:  # retrieval through the backbone's own ITC head
            m = tasks.evaluate(backbone, task, records, tok, **inputs, rerank_top=args.rerank_top,
                               print0=print0)
        init = ckpt
    else:
        model = tasks.TaskModel(backbone, task, tasks.num_outputs(task, meta), cfg.max_gen_len)
        checkpoint.load_weights(ckpt, model, strict=True)
        model.to(proc.device)
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
    if args.out and proc.main:
        os.makedirs(args.out, exist_ok=True)
        results = {"task": task.name, "metrics": m, "split": args.split, "zero_shot": zero_shot,
                   "init": init, "checkpoint": ckpt, "config": config_lib.to_dict(cfg),
                   "eval_config": dataclasses.asdict(args)}
        checkpoint.write_json(os.path.join(args.out, "results.json"), results)
        print0(f"wrote {os.path.join(args.out, 'results.json')}")
    distributed.barrier(proc)
    if proc.world > 1:
        torch.distributed.destroy_process_group()
    return 0


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


def collect(root):
    """{group: {heading: [(value or None, path), ...]}} from every results.json under root."""
    rows = {}
    for dirpath, _, files in sorted(os.walk(root)):
        if "results.json" not in files:
            continue
        path = os.path.join(dirpath, "results.json")
        with open(path) as f:
            r = json.load(f)
        for heading, task, key in COLUMNS:
            if r.get("task") == task and key in r.get("metrics", {}):
                rows.setdefault(run_group(r), {}).setdefault(heading, []).append(
                    (r["metrics"][key], path))
    return rows


def render_table(root):
    """Markdown in the layout of the paper's Table 2 (percentages; the mean when a cell has several
    runs), and root/table.json with the same numbers and the results.json files behind each cell."""
    rows = collect(root)
    if not rows:
        raise SystemExit(f"no results.json with a Table 2 metric under {root}")
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
    checkpoint.write_json(os.path.join(root, "table.json"),
                          {"columns": headings, "rows": table, "markdown": markdown})
    return markdown


if __name__ == "__main__":
    sys.exit(main())
