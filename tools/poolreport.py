"""What a checkpoint's prompt pools hold and what its prompts attend to: a report, not the method.

    python tools/poolreport.py runs/pretrain [--pairs 256] [--out poolstats.json]

prints, on ROCO validation pairs: the rows each pool uses and their entropy, the norms of used and
unused rows, and what the prompts attend to (attention mass, averaged over heads, layers and inputs)
next to the share that uniform attention would give them. With --out it writes the report as JSON
and, beside it (poolstats.png), the pools' rows in use and entropy over the run's training, from the
statistics ptunifier_min/poolwatch.py logged.
"""

import argparse
import json
import math
import os
import sys

import torch

# `python tools/poolreport.py` puts tools/ on the path, not the folder that holds the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ptunifier_min import checkpoint, data  # noqa: E402
from ptunifier_min.api import load  # noqa: E402
from ptunifier_min.files import write_atomic  # noqa: E402
from ptunifier_min.poolwatch import pool_usage, prompt_pools  # noqa: E402
from tools.plots import line_chart  # noqa: E402


def _attention_maps(model, heads_mean=True, **inputs):
    """(Encoding, [layers] x [B, T, T] attention probabilities averaged over heads, or [B, H, T, T]
    per head) of one pass, recomputed from each block's input with the textbook formula (the fused
    kernel does not return them)."""
    captured = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: captured.append((m, args[0], args[1])))
             for blk in model.blocks]
    try:
        enc = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    # the pass itself (pool_query final runs one before)
    for blk, x, key_mask in captured[-len(model.blocks):]:
        B, T, D = x.shape
        H = blk.attn.heads
        q, k, _ = blk.attn.qkv(blk.norm1(x)).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D // H)  # [B, H, T, T]
        if key_mask is not None:
            att = att.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = att.softmax(-1)
        maps.append(att.mean(1) if heads_mean else att)
    return enc, maps


@torch.no_grad()
def attention_report(model, image, input_ids, attention_mask):
    """What the prompts attend to and who attends to them, in the image-only pass (textual prompts)
    and the text-only pass (visual prompts): attention mass averaged over heads, layers and inputs,
    and the share uniform attention over the keys would give (`uniform_*`)."""
    out = {}
    for name, kw in (("image_only", dict(image=image)),
                     ("text_only", dict(input_ids=input_ids, attention_mask=attention_mask))):
        enc, maps = _attention_maps(model, **kw)
        Tv, T = enc.n_visual, enc.hidden.shape[1]
        if name == "image_only":  # [IMG_CLS, patches | CLS, prompts, SEP]
            k = T - Tv - 2
            cls, prompts, other, keys = (Tv, slice(Tv + 1, Tv + 1 + k), slice(0, Tv),
                                         torch.ones(len(image), T))
        else:  # [IMG_CLS, prompts | text]
            k = Tv - 1
            cls, prompts, other = 0, slice(1, Tv), slice(Tv, T)
            keys = torch.cat([torch.ones(len(input_ids), Tv), attention_mask.float().cpu()], 1)
        if k == 0:
            continue
        att = torch.stack(maps).mean(0).cpu()  # [B, T, T]
        n_keys = keys.sum(1)
        out[name] = {
            # the pooled [CLS] of the prompted side: how much of what it reads comes from the
            # prompts
            "cls_to_prompts": float(att[:, cls, prompts].sum(-1).mean()),
            "uniform_cls_to_prompts": float((k / n_keys).mean()),
            # the prompts: do they read the present modality (input-specific) or themselves?
            "prompts_to_present_modality": float(att[:, prompts, other].sum(-1).mean()),
            "prompts_to_prompts": float(att[:, prompts, prompts].sum(-1).mean()),
            "uniform_prompts_to_present_modality": float((keys[:, other].sum(1) / n_keys).mean()),
            # the present modality's tokens: do they read the prompts?
            "present_modality_to_prompts": float(att[:, other, prompts].sum(-1).mean()),
        }
    return out


@torch.no_grad()
def pool_report(model, image, input_ids, attention_mask):
    """Selections of the checkpoint's pools on a batch: rows used, entropy, norms of used and unused
    rows."""
    out = {}
    txt = model(input_ids=input_ids, attention_mask=attention_mask)
    img = model(image=image)
    for k, rows in (("visual", txt.selected_visual), ("textual", img.selected_textual)):
        pool = prompt_pools(model)[k]
        if rows is None:
            continue
        hist = torch.bincount(rows.flatten(), minlength=len(pool.weight))
        used, entropy = pool_usage(hist)
        norms = pool.weight.float().norm(dim=-1)
        out[k] = {"pool_size": len(pool.weight), "rows_in_use": used, "entropy": entropy,
                  "max_entropy": math.log(min(len(pool.weight), rows.numel())),
                  "norm_used": float(norms[hist > 0].mean()),
                  "norm_unused": float(norms[hist == 0].mean()) if (hist == 0).any() else None,
                  "distinct_selections": len({tuple(sorted(r)) for r in rows.tolist()}),
                  "inputs": len(rows)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Diagnostics of a checkpoint's prompt pools on ROCO validation pairs",
        allow_abbrev=False)
    p.add_argument("ckpt", help="pre-training run folder (its latest checkpoint) or step folder")
    p.add_argument("--pairs", type=int, default=256,
                   help="ROCO validation pairs read (default: 256)")
    p.add_argument("--data-root", default="",
                   help="prepared datasets; empty = the checkpoint's own (default: empty)")
    p.add_argument("--out", default="",
                   help="also write the report here as JSON (default: print only)")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error(f"--pairs must be >= 1, got {args.pairs}")
    m = load(args.ckpt)
    cfg = m.cfg
    root = (args.data_root or cfg.data_root
            or os.path.join(cfg.synth_root, cfg.synth_scale, "prepared"))
    folder = os.path.join(root, "roco_retrieval")
    if not os.path.isfile(os.path.join(folder, "val.jsonl")):
        raise SystemExit(f"no prepared ROCO retrieval pairs at {folder}: pass --data-root")
    records = data.read_split(folder, "val")[:args.pairs]
    image = m._images([data.image_path(r) for r in records])
    text = m._texts([r["texts"][0] for r in records])
    ids, mask = text["input_ids"], text["attention_mask"]
    model = m.backbone
    report = {"ckpt": args.ckpt, "pairs": len(records), "prompt_mode": cfg.model.prompt_mode,
              "pools": (pool_report(model, image, ids, mask)
                        if cfg.model.prompt_mode == "pool" else {}),
              "attention": (attention_report(model, image, ids, mask)
                            if cfg.model.prompt_mode != "none" else {})}
    for k, r in report["pools"].items():
        print(f"{k} pool: {r['rows_in_use']} of {r['pool_size']} rows in use on {r['inputs']} "
              f"inputs ({r['distinct_selections']} distinct top-k sets), entropy "
              f"{r['entropy']:.2f} of at most {r['max_entropy']:.2f} nats; mean row norm used "
              f"{r['norm_used']:.3f}, unused "
              + ("-" if r["norm_unused"] is None else f"{r['norm_unused']:.3f}"))
    for name, a in report["attention"].items():
        print(f"{name}: [CLS] -> prompts {a['cls_to_prompts']:.3f} (uniform "
              f"{a['uniform_cls_to_prompts']:.3f}); prompts -> present modality "
              f"{a['prompts_to_present_modality']:.3f} (uniform "
              f"{a['uniform_prompts_to_present_modality']:.3f}), -> prompts "
              f"{a['prompts_to_prompts']:.3f}; present modality -> prompts "
              f"{a['present_modality_to_prompts']:.3f}")
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=2))
        figure = usage_over_training(checkpoint.resolve_checkpoint(args.ckpt),
                                     os.path.splitext(args.out)[0] + ".png")
        if figure:
            print(f"pool usage over training: {figure}")
    return report


def usage_over_training(ckpt, path):
    """Draw the rows in use and the selection entropy of each pool, per logging window, from the
    log.jsonl of the run that wrote the checkpoint `ckpt`; None when the run logged none (no pool,
    or no ITC)."""
    rows = []
    log = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "log.jsonl")
    if os.path.isfile(log):
        with open(log) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill mid-write
                    continue
    rows = [r for r in rows if "selected_visual_rows" in r]
    if not rows:
        return None
    series = {f"{k} {what}": [(r["step"], r[f"selected_{k}_{what}"]) for r in rows]
              for k in ("visual", "textual") for what in ("rows", "entropy")}
    return line_chart(path, series, "prompt-pool rows in use (and entropy, nats) per logging "
                      "window", "step", "rows / nats")


if __name__ == "__main__":
    main()
