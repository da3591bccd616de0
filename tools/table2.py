"""The paper's Table 2 on the synthetic world, with seeds: does pre-training help each task?

    python tools/table2.py                       # seeds 0-4: runs/table2/, then tables.md
    python tools/table2.py --seeds 0,1,2 --jobs 1
    python tools/table2.py --table-only          # rebuild the tables from what is there

Per seed S, two runs, in <out>/<arm>/seed<S>/:
- pretrained: `python train.py --seed S` (the main job's recipe), its zero-shot evaluations
  (ROCO retrieval, CheXpert through label prompts, MS-CXR phrase grounding: eval.py), then
  `finetune.py --init <its checkpoint> --seed S` on every task of Table 2 and on CheXpert with 1%
  and 10% of the training labels;
- scratch: the same fine-tunes with `--init scratch` (the same architecture, tokenizer and recipe).
Each step writes its own results.json (one per run of a script); a step whose output is there is
done, so the command continues where it stopped (the runner is tools/ablations.py's).

Then <out>/tables.md (also printed) and <out>/summary.json: every cell is mean ± sample sd over the
seeds, and each column gets a paired verdict over seeds (tools/ablations.py's paired t-test,
two-sided 5%): "pre-trained better", "not better" (scratch better) or "inconclusive".
"""

import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import eval as eval_script  # noqa: E402
from ptunifier_min import config, tasks  # noqa: E402
from ptunifier_min.datasets import source  # noqa: E402
from ptunifier_min.distributed import Dist  # noqa: E402
from tools import ablations  # noqa: E402
from tools.ablations import Step, fmt, markdown, paired, read_json  # noqa: E402

ARMS = ("pretrained", "scratch")
# Fine-tune name (its folder) -> finetune.py flags: every task of Table 2, and label efficiency
FINETUNES = {**{t.name: ["--task", t.name] for t in tasks.TASKS.values() if t.kind.fine_tunes},
             "chexpert-1pct": ["--task", "chexpert", "--data-frac", "0.01"],
             "chexpert-10pct": ["--task", "chexpert", "--data-frac", "0.1"]}
ZERO_SHOT = [t.name for t in tasks.TASKS.values() if t.zero_shot]
# (heading, fine-tune, metric): Table 2's columns (eval.py's), then label efficiency
COLUMNS = ([(h, t, m) for h, t, m in eval_script.COLUMNS]
           + [("CheXpert 10% AUROC", "chexpert-10pct", "auroc"),
              ("CheXpert 1% AUROC", "chexpert-1pct", "auroc")])
ZERO_SHOT_COLUMNS = [("ROCO i2t R@1", "roco_retrieval", ("i2t_r1",)),
                     ("ROCO t2i R@1", "roco_retrieval", ("t2i_r1",)),
                     ("ROCO i2t R@10", "roco_retrieval", ("i2t_r10",)),
                     ("CheXpert AUROC", "chexpert", ("auroc",))]
GROUNDING_ROWS = ("similarity", "gradcam", "box_prior", "uniform")


def recipe_flags(args, steps):
    return ["--preset", args.preset, *(["--steps", str(steps)] if steps else []),
            "--num-workers", "1", *ablations.data_flags(args)]


def plan(arm, seed, args):
    run = os.path.join(args.out, arm, f"seed{seed}")
    pretrain = os.path.join(run, "pretrain")
    steps = []
    if arm == "pretrained":
        steps.append(Step("pretrain", [sys.executable, os.path.join(REPO, "train.py"),
                                       *recipe_flags(args, args.steps), "--seed", str(seed),
                                       "--out", pretrain, "--overwrite"],
                          os.path.join(pretrain, "log.jsonl")))
        for name in ZERO_SHOT:
            folder = os.path.join(run, f"zeroshot-{name}")
            steps.append(Step(f"zeroshot-{name}",
                              [sys.executable, os.path.join(REPO, "eval.py"), "--task", name,
                               "--ckpt", pretrain, "--num-workers", "1", "--out", folder,
                               *(["--overlays", "4"] if name == "ms_cxr" and seed == 0 else [])],
                              os.path.join(folder, "results.json")))
    init = pretrain if arm == "pretrained" else "scratch"
    for name in args.finetunes:
        folder = os.path.join(run, name)
        steps.append(Step(name, [sys.executable, os.path.join(REPO, "finetune.py"),
                                 *FINETUNES[name], *recipe_flags(args, args.finetune_steps),
                                 "--init", init, "--seed", str(seed), "--out", folder,
                                 "--overwrite"],
                          os.path.join(folder, "results.json")))
    return run, steps


def result(arm, seed, run):
    """A run's numbers: every results.json of its steps, and the seconds each step took."""
    names = [n for n in FINETUNES if os.path.isdir(os.path.join(run, n))]
    names += [f"zeroshot-{n}" for n in ZERO_SHOT] if arm == "pretrained" else []
    return {"arm": arm, "seed": seed,
            "seconds": read_json(os.path.join(run, "seconds.json")) or {},
            "results": {n: read_json(os.path.join(run, n, "results.json"))["metrics"]
                        for n in names}}


def values(results, arm, step, keys):
    """{seed: value} of a metric (keys: its path in the step's metrics) over the seeds present."""
    out = {}
    for seed, r in results.get(arm, {}).items():
        v = r["results"].get(step)
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            out[seed] = float(v)
    return out


VERDICT = {"held": "pre-trained better", "not held": "not better", "inconclusive": "inconclusive",
           "inconclusive (n<2)": "inconclusive (n<2)"}


def report(results):
    lines, summary = [], {"table2": {}, "zero_shot": {}, "grounding": {}}
    seeds = sorted({s for arm in results.values() for s in arm})
    header = ["", "n", *(h for h, _, _ in COLUMNS)]
    rows = []
    for arm in ARMS:
        cells = []
        for heading, step, metric in COLUMNS:
            v = {s: 100 * x for s, x in values(results, arm, step, (metric,)).items()}
            summary["table2"].setdefault(heading, {})[arm] = v
            cells.append(fmt(v, 1))
        rows.append([arm, len(results.get(arm, {})), *cells])
    verdicts = []
    for heading, step, metric in COLUMNS:
        test = paired(values(results, "pretrained", step, (metric,)),
                      values(results, "scratch", step, (metric,)))
        summary["table2"][heading]["paired"] = test
        verdicts.append(VERDICT[test["verdict"]] + (f" ({100 * test['mean']:+.1f})"
                                                    if test["mean"] is not None else ""))
    rows.append(["pre-training helps?", "", *verdicts])
    lines += markdown(f"### Table 2: pre-trained vs from scratch (%, mean ± sd over seeds "
                      f"{','.join(map(str, seeds))}; paired t-test per column)", header, rows)
    zs = [["pre-trained", len(results.get("pretrained", {})),
           *(fmt({s: 100 * x for s, x in values(results, "pretrained", f"zeroshot-{t}",
                                                keys).items()}, 1)
             for _, t, keys in ZERO_SHOT_COLUMNS)]]
    for heading, t, keys in ZERO_SHOT_COLUMNS:
        summary["zero_shot"][heading] = values(results, "pretrained", f"zeroshot-{t}", keys)
    lines += markdown("### Zero-shot, from the pre-training checkpoint (%)",
                      ["", "n", *(h for h, _, _ in ZERO_SHOT_COLUMNS)], zs)
    rows = []
    for method in GROUNDING_ROWS:
        cnr = values(results, "pretrained", "zeroshot-ms_cxr", (method, "cnr"))
        miou = values(results, "pretrained", "zeroshot-ms_cxr", (method, "miou"))
        summary["grounding"][method] = {"cnr": cnr, "miou": miou}
        rows.append([method, len(cnr), fmt(cnr, 3), fmt({s: 100 * x for s, x in miou.items()}, 1)])
    lines += markdown("### Phrase grounding on MS-CXR test, zero-shot (CNR; mIoU %)",
                      ["map", "n", "CNR", "mIoU"], rows)
    rows = []
    for a, b in (("similarity", "box_prior"), ("gradcam", "box_prior"),
                 ("similarity", "gradcam"), ("similarity", "uniform"), ("gradcam", "uniform")):
        for metric in ("cnr", "miou"):
            test = paired(summary["grounding"][a][metric], summary["grounding"][b][metric])
            summary["grounding"][f"{a} vs {b} ({metric})"] = test
            rows.append([f"{a} > {b}", metric, test["n"],
                         "–" if test["mean"] is None else f"{test['mean']:+.3f}",
                         {"held": "better", "not held": "worse"}.get(test["verdict"],
                                                                     test["verdict"])])
    lines += markdown("### Grounding: paired comparisons over seeds",
                      ["claim", "metric", "n", "mean difference", "verdict"], rows)
    minutes = [sum(r["seconds"].values()) / 60 for arm in results.values() for r in arm.values()]
    lines += [f"Wall clock: {sum(minutes):.0f} min of steps in all, "
              f"{statistics.mean(minutes) if minutes else 0:.1f} min per run on average.", ""]
    return "\n".join(lines), summary


def main(argv=None):
    p = ablations.parser(__doc__.split("\n")[0], "runs/table2", jobs=1, finetunes=FINETUNES)
    p.add_argument("--steps", type=ablations.at_least(0), default=0,
                   help="pre-training steps; 0 = train.py's default for the preset (default: 0)")
    args = ablations.parse(p, argv, {"finetunes": FINETUNES})
    failures = []
    if not args.table_only:
        ablations.check_recipe(args, {"preset": args.preset, "steps": args.steps,
                                      "finetune_steps": args.finetune_steps})
        # every dataset, made once before the runs start: two processes making it would race
        cfg = config.build(config.TrainConfig, {**config.PRESETS[args.preset],
                                                "data_root": args.data_root,
                                                "synth_root": args.synth_root})
        names = dict.fromkeys(list(ablations.PRETRAIN_DATA)
                              + [t.folder for t in tasks.TASKS.values()])
        source.ensure_prepared(cfg, list(names), Dist(), print)
        runs = [(arm, seed) for seed in args.seeds for arm in ARMS]
        print(f"{len(runs)} runs (pre-trained and scratch x seeds "
              f"{','.join(map(str, args.seeds))}) into {args.out}, {args.jobs} at a time; each "
              "step's console goes to <run>/<step>.out")
        failures = ablations.run_all(args, runs, ablations.Runner(args, plan, result),
                                     desc="Table 2 runs")
    _, summary = ablations.tabulate(args.out, report)
    ablations.stop_on(failures)
    return summary


if __name__ == "__main__":
    main()
