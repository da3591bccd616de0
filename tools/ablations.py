"""The paper's ablations (Tables 3 and 4, pool variants) over seeds, resumably, with claim verdicts.

Table 3 ablates the pre-training objectives, Table 4 the prompt-pool size, and the variants change
how the pool picks its rows; each arm x seed is run on our synthetic world through train.py and
finetune.py as subprocesses.

    python tools/ablations.py                 # every arm, seeds 0-4: runs/ablations/
    python tools/ablations.py --arms id5-all,none --seeds 0,1 --jobs 1
    python tools/ablations.py --table-only    # only rebuild the tables from what is there

One run = one arm x one seed, in <out>/<arm>/seed<S>/: pre-training (pretrain/, every arm: the cpu
preset for --steps steps, then zero-shot ROCO retrieval on --eval-pairs pairs), the pool diagnostics
of its checkpoint (poolstats.json, arms with prompts), the six fine-tunes of Table 3 (its five arms
only: CheXpert at 1% / 10% / 100% of the labels, RadNLI, MIMIC-CXR report generation, VQA-RAD, each
from the arm's checkpoint), then result.json, the run's numbers in one file. Each subprocess writes
its console into <run>/<step>.out; the console here shows one bar over the runs and one line per
finished step. Work goes seed by seed (every arm of seed 0 first), so a cut-short call leaves whole
seeds.

Resuming is by outputs: a pre-training is done when its log.jsonl holds the closing
zero_shot_retrieval line, a fine-tune when its results.json exists, the diagnostics when
poolstats.json exists (both newer than the pre-training they read); anything else is started afresh
with --overwrite (the scripts move an earlier attempt aside into .replaced-<time>/, never delete
it). So killing this command and starting it again continues where it stopped. One --out holds one
recipe (preset, steps, eval pairs, fine-tune steps, data): <out>/recipe.json records it and another
recipe is refused, since the done checks cannot tell a 400-step run from an 800-step one.

Then <out>/tables.md (also printed) and <out>/summary.json: every cell is mean ± sample sd over the
seeds present, and each of the paper's claims of sections 6.2 and 6.3 gets a verdict from a paired
t-test over seeds (see `paired`); <out>/loss_curves.png draws each arm's pre-training loss.
"""

import argparse
import concurrent.futures
import glob
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import namedtuple

import torch
from safetensors import safe_open
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python tools/ablations.py` puts tools/ on the path, not the folder that holds the package
sys.path.insert(0, REPO)
from ptunifier_min import checkpoint, config, tasks
from ptunifier_min.datasets import source
from ptunifier_min.distributed import Dist
from ptunifier_min.files import write_atomic, write_json
from ptunifier_min.model import PTUnifier
from tools.plots import line_chart

POOLREPORT = os.path.join(REPO, "tools", "poolreport.py")

# ---- the arms ------------------------------------------------------------------------------------
# Arm name (its folder) -> its own train.py flags, on top of the shared recipe (`plan`). The order
# is the order of work within a seed: Table 3, then the rest of Table 4, then the pool variants.
ARMS = {
    "id1-mlm": ["--objectives", "mlm"],
    "id2-itm": ["--objectives", "itm"],
    "id3-mlm-itm": ["--objectives", "mlm,itm"],
    "id4-itc": ["--objectives", "itc"],
    # also Table 4's pool-64 row (the cpu preset's pool): run once
    "id5-all": ["--objectives", "mlm,itm,itc"],
    "none": ["--prompt-mode", "none"],
    "static": ["--prompt-mode", "static"],
    "pool16": ["--pool-size", "16"],
    "pool256": ["--pool-size", "256"],
    "cosine": ["--pool-select", "cosine"],
    "l2p-keys": ["--pool-keys", "separate", "--w-pool-pull", "0.1"],
    "balance": ["--w-pool-balance", "0.01"],
    "final-query": ["--pool-query", "final"],
}
# arm -> (row label, objectives)
TABLE3 = {"id1-mlm": ("ID1", "mlm"), "id2-itm": ("ID2", "itm"), "id3-mlm-itm": ("ID3", "mlm,itm"),
          "id4-itc": ("ID4", "itc"), "id5-all": ("ID5", "mlm,itm,itc")}
TABLE4 = ("none", "static", "pool16", "id5-all", "pool256")
# pool 64 and no prompts for reference
VARIANTS = ("id5-all", "cosine", "l2p-keys", "balance", "final-query", "none")

# Fine-tune name (its folder) -> finetune.py flags; each runs with the recipe's defaults from the
# arm's checkpoint.
FINETUNES = {
    "chexpert-1pct": ["--task", "chexpert", "--data-frac", "0.01"],
    "chexpert-10pct": ["--task", "chexpert", "--data-frac", "0.1"],
    "chexpert-100pct": ["--task", "chexpert", "--data-frac", "1"],
    "radnli": ["--task", "radnli"],
    "mimic_gen": ["--task", "mimic_gen"],
    "vqa_rad": ["--task", "vqa_rad"],
}
# train.py's corpora and its zero-shot pairs
PRETRAIN_DATA = ("roco", "medicat", "mimic_cxr", "roco_retrieval")


# ---- running -------------------------------------------------------------------------------------
# output: the file whose existence says the step is done
Step = namedtuple("Step", "name cmd output")


def read_jsonl(path):
    """The JSON lines of a file; a line torn by a kill mid-write is skipped (train.py's Log drops it
    too)."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return [r for r in rows if isinstance(r, dict)]


def pretrain_done(folder):
    # the closing line is written after the last checkpoint: with it, the run and its evaluation
    # are complete
    return any("zero_shot_retrieval" in r for r in read_jsonl(os.path.join(folder, "log.jsonl")))


def step_done(step, pretrain):
    return pretrain_done(pretrain) if step.name == "pretrain" else fresh(step.output, pretrain)


def fresh(path, pretrain):
    # make's rule: an output older than the pre-training it was made from (one redone since)
    # is stale; a run without pre-training (from scratch) has only its outputs
    log = os.path.join(pretrain, "log.jsonl")
    if not os.path.isdir(pretrain):
        return os.path.isfile(path)
    return (os.path.isfile(path) and os.path.isfile(log)
            and os.path.getmtime(path) >= os.path.getmtime(log))


def data_flags(args):
    return ["--data-root", args.data_root] if args.data_root else ["--synth-root", args.synth_root]


def plan(arm, seed, args):
    """The steps of one run, in order; the pre-training first, everything else reads its
    checkpoint."""
    run = os.path.join(args.out, arm, f"seed{seed}")
    pretrain = os.path.join(run, "pretrain")
    steps = [Step("pretrain",
                  [sys.executable, os.path.join(REPO, "train.py"), "--preset", args.preset,
                   "--steps", str(args.steps), "--seed", str(seed), "--log-every", "10",
                   "--eval-pairs", str(args.eval_pairs), "--save-every", str(args.steps),
                   "--num-workers", "1", *data_flags(args), *ARMS[arm], "--out", pretrain,
                   "--overwrite"],
                  os.path.join(pretrain, "log.jsonl"))]
    if args.diagnostics and prompt_mode(arm) != "none":
        out = os.path.join(run, "poolstats.json")
        steps.append(Step("diagnostics",
                          [sys.executable, POOLREPORT, pretrain, "--out", out,
                           *(["--data-root", args.data_root] if args.data_root else [])],
                          out))
    if arm in TABLE3:
        for name in args.finetunes:
            flags, folder = FINETUNES[name], os.path.join(run, name)
            steps.append(Step(name,
                              [sys.executable, os.path.join(REPO, "finetune.py"),
                               "--preset", args.preset, *flags, "--init", pretrain, "--out", folder,
                               "--seed", str(seed), "--num-workers", "1", *data_flags(args),
                               *(["--steps", str(args.finetune_steps)]
                                 if args.finetune_steps else []),
                               "--overwrite"],
                              os.path.join(folder, "results.json")))
    return run, steps


def prompt_mode(arm):
    flags = ARMS[arm]
    return flags[flags.index("--prompt-mode") + 1] if "--prompt-mode" in flags else "pool"


class Runner:
    """Runs the runs of a call, `jobs` at a time, each in a worker thread that starts its steps'
    subprocesses in turn. Threads are enough: the work is in the subprocesses, a thread only waits
    for them. plan(arm, seed, args) -> (run folder, steps) and result(arm, seed, run) -> result.json
    are the ablations' unless given (tools/table2.py has its own)."""

    def __init__(self, args, plan=None, result=None):
        self.args, self.lock, self.stop, self.live = (
            args, threading.Lock(), threading.Event(), set())
        self.plan, self.result = plan or globals()["plan"], result or run_result
        # each subprocess gets its share of the cores: torch would otherwise start one thread per
        # core in every one
        self.env = dict(os.environ,
                        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)),
                        TOKENIZERS_PARALLELISM="false")

    def say(self, line):
        with self.lock:
            tqdm.write(line)

    def call(self, step, log_path):
        """One subprocess, its stdout and stderr into log_path; returns its exit code. Popen rather
        than subprocess.run, so that an interrupted runner can stop the children it started
        (`terminate`)."""
        with open(log_path, "w") as log:
            log.write(shlex.join(step.cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(step.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
            with self.lock:
                self.live.add(proc)
                if self.stop.is_set():  # started as `terminate` ran: it did not see this one
                    proc.terminate()
            try:
                return proc.wait()
            finally:
                with self.lock:
                    self.live.discard(proc)

    def terminate(self):
        # SIGTERM: train.py and finetune.py finish the step in flight, save it and stop, saying
        # where the checkpoint is
        with self.lock:
            for proc in self.live:
                proc.terminate()

    def run(self, arm, seed):
        """All steps of one run that are not done yet, then its result.json. Returns the names of
        the failed steps."""
        run, steps = self.plan(arm, seed, self.args)
        os.makedirs(run, exist_ok=True)
        pretrain = os.path.join(run, "pretrain")
        seconds_path = os.path.join(run, "seconds.json")
        failed = []
        if (not all(step_done(step, pretrain) for step in steps)
                and os.path.isfile(os.path.join(run, "result.json"))):
            # derived from the step folders, and about to be out of date: a failed step must not
            # leave it standing
            os.remove(os.path.join(run, "result.json"))
        for step in steps:
            if self.stop.is_set():
                return failed + ["interrupted"]
            if step_done(step, pretrain):
                continue
            log_path, t0 = os.path.join(run, f"{step.name}.out"), time.time()
            rc = self.call(step, log_path)
            if self.stop.is_set():
                return failed + ["interrupted"]
            if rc != 0:
                self.say(f"FAILED {arm} seed{seed} {step.name} (exit code {rc}): "
                         f"{shlex.join(step.cmd)}\n"
                         f"  last lines of {log_path}:\n"
                         + "\n".join("  | " + line for line in tail(log_path, 20)))
                failed.append(step.name)
                if step.name == "pretrain":
                    return failed  # everything else reads its checkpoint
                continue
            seconds = time.time() - t0
            times = read_json(seconds_path) or {}
            times[step.name] = seconds
            write_json(seconds_path, times)
            self.say(f"{arm} seed{seed} {step.name}: {seconds:.1f} s")
        if not failed:
            write_json(os.path.join(run, "result.json"), self.result(arm, seed, run))
        return failed


def tail(path, n):
    """The last n lines of a console log as a terminal would show them: a progress bar's redraws
    (\\r) collapsed."""
    with open(path, errors="replace") as f:
        lines = [line.rstrip().split("\r")[-1] for line in f.read().split("\n")]
    return [line for line in lines if line.strip()][-n:]


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_all(args, runs=None, runner=None, desc="ablation runs"):
    """Every run of the call (runs: [(arm, seed)], the ablations' unless given); returns
    ["arm seedS (steps)", ...] for the runs that failed."""
    # seed-major: whole seeds first
    runs = runs or [(arm, seed) for seed in args.seeds for arm in ARMS if arm in args.arms]
    runner, failures = runner or Runner(args), []
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    # SIGTERM (a scheduler, `kill`) becomes the KeyboardInterrupt below, so that the children
    # go with us
    # only it may set signal handlers
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        futures = {pool.submit(runner.run, arm, seed): (arm, seed) for arm, seed in runs}
        bar = tqdm(total=len(runs), desc=desc, unit="run")
        for future in concurrent.futures.as_completed(futures):
            arm, seed = futures[future]
            try:
                failed = future.result()
            # e.g. a result.json that cannot be built: this run fails, the others go on
            except Exception as e:
                runner.say(f"FAILED {arm} seed{seed}: {type(e).__name__}: {e}")
                failed = ["result.json"]
            if failed:
                failures.append(f"{arm} seed{seed} ({', '.join(failed)})")
            bar.update(1)
        bar.close()
    except KeyboardInterrupt:
        runner.stop.set()
        runner.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise SystemExit("interrupted: the finished steps are kept; "
                         "run the same command again to continue")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
    return failures


# ---- one run's numbers ---------------------------------------------------------------------------
def weight_counts(ckpt):
    """(pool parameters, all parameters) of a checkpoint's model.safetensors, from the tensor shapes
    in its header: safe_open reads no values."""
    pool = total = 0
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safe_open handle is no dict)
            n = math.prod(f.get_slice(name).get_shape())
            total += n
            pool += n if "prompts" in name else 0
    return pool, total


def pretrain_result(folder, seconds):
    rows = read_jsonl(os.path.join(folder, "log.jsonl"))
    # the training lines; the closing line holds zero_shot_retrieval only
    logged = [r for r in rows if "loss" in r]
    last = logged[-1] if logged else {}
    zero_shot = [r["zero_shot_retrieval"] for r in rows if "zero_shot_retrieval" in r][-1]

    # the last 5 logged windows: one window's loss is a noisy reading of where training ended
    def mean_of_last(key):
        values = [r[key] for r in logged[-5:] if key in r]
        return statistics.mean(values) if values else None

    ckpt = checkpoint.resolve_checkpoint(folder)
    pool_params, total_params = weight_counts(ckpt)
    model_cfg = checkpoint.read_checkpoint_config(ckpt)["config"]["model"]
    final = {k: mean_of_last(k) for k in ("mlm_loss", "itm_loss", "itc_loss", "loss")}
    # how the pools were used at the end (poolwatch.PoolWatch's log fields; absent without a pool)
    final.update({f"{k}_{m}": mean_of_last(f"{k}_{m}")
                  for k in ("pool_grad_norm", "probe_topk_changed")
                  for m in ("visual", "textual")})
    final.update({k: mean_of_last(k) for k in ("pool_pull", "pool_balance")})
    # the paper's Table 4 total: the objectives' sum. `loss` is what was optimised, which also holds
    # the weighted auxiliary pool terms of some variants (--w-pool-pull, --w-pool-balance): not
    # comparable across arms
    final["objectives"] = sum(final[k] for k in ("mlm_loss", "itm_loss", "itc_loss")
                              if final[k] is not None)
    return {
        "final": final,
        "prompt_mode": model_cfg["prompt_mode"], "pool_size": model_cfg["pool_size"],
        "pool_params": pool_params, "total_params": total_params,
        "rows_in_use": {k: last.get(f"selected_{k}_rows") for k in ("visual", "textual")},
        "entropy": {k: last.get(f"selected_{k}_entropy") for k in ("visual", "textual")},
        "zero_shot": {k: zero_shot[k] for k in ("i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10")},
        # the diagnostics train.py logs (pool_*, probe_*) are copied whatever their names, so new
        # ones need no change
        "history": [{k: v for k, v in r.items() if k == "step" or k == "loss" or k.endswith("_loss")
                     or k.startswith(("selected_", "pool_", "probe_"))} for r in logged],
        "seconds": seconds,
    }


def run_result(arm, seed, run):
    """result.json of a run, from what its folder holds: also the outputs of steps this call left
    out (--no-diagnostics, --finetunes) that an earlier call made from this same pre-training."""
    times = read_json(os.path.join(run, "seconds.json")) or {}
    pretrain, diagnostics = os.path.join(run, "pretrain"), os.path.join(run, "poolstats.json")
    finetuned = {name: os.path.join(run, name, "results.json") for name in FINETUNES}
    return {
        "arm": arm, "seed": seed, "flags": ARMS[arm],
        "pretrain": pretrain_result(pretrain, times.get("pretrain")),
        "diagnostics": read_json(diagnostics) if fresh(diagnostics, pretrain) else None,
        "finetune": {name: {"metrics": read_json(path)["metrics"], "seconds": times.get(name)}
                     for name, path in finetuned.items() if fresh(path, pretrain)},
    }


def loss_curves(out, arms, path):
    """Each arm's pre-training loss (the optimised weighted total), mean over its seeds at every
    logged step, as one line chart."""
    series = {}
    for arm in arms:
        by_step = {}
        for log in sorted(glob.glob(os.path.join(out, arm, "seed*", "pretrain", "log.jsonl"))):
            for r in read_jsonl(log):
                if "loss" in r:
                    by_step.setdefault(r["step"], []).append(r["loss"])
        series[arm] = [(step, statistics.mean(v)) for step, v in sorted(by_step.items())]
    return line_chart(path, series, "pre-training loss (weighted total), mean over seeds",
                      "step", "loss")


def load_results(out):
    """{arm: {seed: result}} from every <out>/<arm>/seed<S>/result.json present."""
    results = {}
    for path in sorted(glob.glob(os.path.join(out, "*", "seed*", "result.json"))):
        r = read_json(path)
        results.setdefault(r["arm"], {})[r["seed"]] = r
    return results


# ---- statistics ----------------------------------------------------------------------------------
# Student t, 0.975 quantile (two-sided 5%), by degrees of freedom; beyond 30 the normal's 1.960 is
# within 4%.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_crit(df):
    return T975[df - 1] if df <= len(T975) else 1.960


def paired(a, b, higher=True):
    """Paired t-test of "A better than B" over the seeds both have (a, b: {seed: value});
    higher=False for losses. Returns {n, mean, sd, t, verdict}, mean and sd of the differences
    A - B: "held" when the mean favours A with |t| >= the two-sided 5% critical value, "not held"
    when it favours B as clearly, else "inconclusive". Seeds pair up because a seed fixes the data
    order of both arms alike, and their initialisation where the shapes agree."""
    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    n = len(d)
    out = {"n": n, "mean": statistics.mean(d) if d else None,
           "sd": statistics.stdev(d) if n > 1 else None, "t": None}
    if n < 2:
        return {**out, "verdict": "inconclusive (n<2)"}
    m, sd = out["mean"], out["sd"]
    # identical differences on every seed (sd 0, up to float rounding: a recall moves in steps of
    # 1 / pairs) are as clear as a difference can be, unless they are all 0
    if sd <= 1e-9 * max(1.0, abs(m)):
        t = math.copysign(math.inf, m) if abs(m) > 1e-12 else 0.0
    else:
        t = m / (sd / math.sqrt(n))
    favours = m > 0 if higher else m < 0
    significant = abs(t) >= t_crit(n - 1)
    return {**out, "t": t,
            "verdict": ("held" if favours else "not held") if significant else "inconclusive"}


def combine(verdicts):
    """A claim made of several comparisons: held if all are, not held if any is not, else
    inconclusive."""
    if "not held" in verdicts:
        return "not held"
    if all(v == "held" for v in verdicts):
        return "held"
    return ("inconclusive (n<2)" if all(v == "inconclusive (n<2)" for v in verdicts)
            else "inconclusive")


def fmt(values, digits):
    """A cell: mean ± sample sd of its per-seed values; one value alone; a dash for none."""
    v = list(values.values()) if isinstance(values, dict) else list(values)
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:,.{digits}f}"
    return f"{statistics.mean(v):,.{digits}f} ± {statistics.stdev(v):,.{digits}f}"


# ---- tables --------------------------------------------------------------------------------------
# A column: header, where its number is in result.json, the factor it is shown with (100: a fraction
# shown in %, as the paper does, CIDEr and BLEU-4 included), the decimals, and whether higher is
# better (losses: lower).
Column = namedtuple("Column", "label path scale digits higher")


def finetuned(name, key, label):
    return Column(label, ("finetune", name, "metrics", key), 100, 1, True)


TABLE3_COLUMNS = {
    "chexpert_1": finetuned("chexpert-1pct", "auroc", "CheXpert 1% AUROC"),
    "chexpert_10": finetuned("chexpert-10pct", "auroc", "CheXpert 10% AUROC"),
    "chexpert_100": finetuned("chexpert-100pct", "auroc", "CheXpert 100% AUROC"),
    "radnli": finetuned("radnli", "accuracy", "RadNLI acc"),
    "bleu4": finetuned("mimic_gen", "BLEU_4", "MIMIC BL4"),
    "cider": finetuned("mimic_gen", "CIDEr", "MIMIC CDr"),
    "vqa_open": finetuned("vqa_rad", "open", "VQA-RAD open"),
    "vqa_closed": finetuned("vqa_rad", "closed", "VQA-RAD closed"),
    "vqa_overall": finetuned("vqa_rad", "overall", "VQA-RAD overall"),
    "zs_i2t": Column("ZS ROCO i2t R@1", ("pretrain", "zero_shot", "i2t_r1"), 100, 1, True),
    "zs_t2i": Column("ZS ROCO t2i R@1", ("pretrain", "zero_shot", "t2i_r1"), 100, 1, True),
}
POOL_COLUMNS = {
    "mlm": Column("MLM", ("pretrain", "final", "mlm_loss"), 1, 3, False),
    "itm": Column("ITM", ("pretrain", "final", "itm_loss"), 1, 3, False),
    "itc": Column("ITC", ("pretrain", "final", "itc_loss"), 1, 3, False),
    "total": Column("total", ("pretrain", "final", "objectives"), 1, 3, False),  # MLM + ITM + ITC
    "pool_params": Column("pool params", ("pretrain", "pool_params"), 1, 0, False),
    "rows_v": Column("rows used v", ("pretrain", "rows_in_use", "visual"), 1, 1, True),
    "rows_t": Column("rows used t", ("pretrain", "rows_in_use", "textual"), 1, 1, True),
    "entropy_v": Column("entropy v", ("pretrain", "entropy", "visual"), 1, 2, True),
    "entropy_t": Column("entropy t", ("pretrain", "entropy", "textual"), 1, 2, True),
    "zs_i2t": TABLE3_COLUMNS["zs_i2t"],
    "zs_t2i": TABLE3_COLUMNS["zs_t2i"],
    # R@1 at this scale is a handful of hits in 1,000 pairs; R@10 moves in finer steps relative to
    # its size
    "zs_i2t10": Column("ZS i2t R@10", ("pretrain", "zero_shot", "i2t_r10"), 100, 1, True),
    "zs_t2i10": Column("ZS t2i R@10", ("pretrain", "zero_shot", "t2i_r10"), 100, 1, True),
}


# Pool diagnostics. A path may end in a ratio: ("/", numerator key, denominator key) of the dict it
# reaches.
DIAGNOSED = ("static", "pool16", "id5-all", "pool256", "cosine", "l2p-keys", "balance",
             "final-query")
_attention = ("diagnostics", "attention")
DIAGNOSTIC_COLUMNS = {
    "sets_v": Column("distinct top-k v",
                     ("diagnostics", "pools", "visual", "distinct_selections"), 1, 1, True),
    "sets_t": Column("distinct top-k t",
                     ("diagnostics", "pools", "textual", "distinct_selections"), 1, 1, True),
    "changed_v": Column("top-k changed v",
                        ("pretrain", "final", "probe_topk_changed_visual"), 1, 3, True),
    "changed_t": Column("top-k changed t",
                        ("pretrain", "final", "probe_topk_changed_textual"), 1, 3, True),
    "grad_v": Column("pool grad v",
                     ("pretrain", "final", "pool_grad_norm_visual"), 1, 3, True),
    "grad_t": Column("pool grad t",
                     ("pretrain", "final", "pool_grad_norm_textual"), 1, 3, True),
    "pull": Column("1 - cos(q, key)", ("pretrain", "final", "pool_pull"), 1, 3, False),
    "cls_img": Column("[CLS]->prompts img-only",
                      (*_attention, "image_only",
                       ("/", "cls_to_prompts", "uniform_cls_to_prompts")), 1, 2, True),
    "cls_txt": Column("[IMG_CLS]->prompts txt-only",
                      (*_attention, "text_only",
                       ("/", "cls_to_prompts", "uniform_cls_to_prompts")), 1, 2, True),
    "read_img": Column("prompts->image",
                       (*_attention, "image_only",
                        ("/", "prompts_to_present_modality",
                         "uniform_prompts_to_present_modality")), 1, 2, True),
    "read_txt": Column("prompts->text",
                       (*_attention, "text_only",
                        ("/", "prompts_to_present_modality",
                         "uniform_prompts_to_present_modality")), 1, 2, True),
}


def lookup(result, path):
    for key in path:
        # ("/", a, b): the ratio result[a] / result[b]
        if isinstance(key, tuple) and isinstance(result, dict):
            a, b = result.get(key[1]), result.get(key[2])
            return a / b if a is not None and b else None
        if not isinstance(result, dict) or result.get(key) is None:
            return None
        result = result[key]
    return result


def cell(results, arm, col):
    """{seed: value in the column's units} over the seeds of `arm` where the number exists and is
    finite."""
    out = {}
    for seed, r in results.get(arm, {}).items():
        v = lookup(r, col.path)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[seed] = v * col.scale
    return out


def markdown(title, header, rows):
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def table(results, title, arms, labels, columns, lead=None):
    """Rows = arms present, a cell = mean ± sd; n per row (seeds with a result.json), and per cell
    where it has fewer. lead: extra leading cells per arm (Table 3's check marks). Returns (markdown
    lines, {arm: {column: stats}})."""
    rows, numbers = [], {}
    for arm in arms:
        if arm not in results:
            continue
        n = len(results[arm])
        cells = []
        for key, col in columns.items():
            v = cell(results, arm, col)
            numbers.setdefault(arm, {})[key] = {
                "mean": statistics.mean(v.values()) if v else None,
                "sd": statistics.stdev(v.values()) if len(v) > 1 else None,
                "n": len(v), "values": {str(s): x for s, x in sorted(v.items())}}
            cells.append(fmt(v, col.digits) + (f" (n={len(v)})" if v and len(v) != n else ""))
        rows.append([labels[arm], *lead(arm), n, *cells] if lead else [labels[arm], n, *cells])
    lead_header = ["MLM", "ITM", "ITC"] if lead else []
    return (markdown(title, ["", *lead_header, "n", *(c.label for c in columns.values())], rows),
            numbers)


def pool_label(results, arm):
    r = next(iter(results.get(arm, {}).values()), None)
    if r is None:
        return arm
    mode, size = r["pretrain"]["prompt_mode"], r["pretrain"]["pool_size"]
    if mode != "pool":
        return {"none": "no prompts"}.get(mode, mode)
    return f"pool {size}" if arm.startswith("pool") else f"pool {size} ({arm})"


# ---- the claims ----------------------------------------------------------------------------------
def comparison(results, a, b, col, labels):
    """One paired comparison "a better than b on col", with the line that shows its numbers."""
    p = paired(cell(results, a, col), cell(results, b, col), col.higher)
    d = col.digits
    numbers = ("no paired seeds" if p["n"] == 0
               else f"{p['mean']:+.{d}f} (n = 1)" if p["n"] == 1
               else f"{p['mean']:+.{d}f} ± {p['sd']:.{d}f}, t = {p['t']:.3g}, n = {p['n']} "
                    f"({p['verdict']})")
    return {**p, "a": a, "b": b, "column": col.label,
            "line": f"{labels[a]} − {labels[b]} {col.label}: {numbers}"}


def claims(results):
    # section 6.2 speaks of IDs
    labels = {arm: TABLE3[arm][0] if arm in TABLE3 else arm for arm in ARMS}
    pools = {arm: pool_label(results, arm) for arm in ARMS}  # section 6.3 of pool sizes
    c3, cp = TABLE3_COLUMNS, POOL_COLUMNS
    out = []

    def claim(cid, text, comps, verdict=None, note="", shown=None):
        """shown: the comparisons the line prints (default: all; summary.json keeps all)"""
        lines = [note] * bool(note) + [c["line"] for c in (comps if shown is None else shown)]
        out.append({"id": cid, "claim": text,
                    "verdict": verdict or combine([c["verdict"] for c in comps]),
                    "comparisons": comps, "numbers": "; ".join(lines)})

    def cmp(a, b, col, names=labels):
        return comparison(results, a, b, col, names)

    claim("6.2 (1)", "MLM and ITM give the better multi-modal representations (VQA-RAD)",
          [cmp("id3-mlm-itm", "id4-itc", c3["vqa_overall"]),
           cmp("id5-all", "id4-itc", c3["vqa_overall"])])
    claim("6.2 (2)",
          "ITC helps uni-modal image and cross-modal representations, and label efficiency",
          [cmp("id5-all", "id3-mlm-itm", c3[k])
           for k in ("chexpert_1", "chexpert_10", "chexpert_100", "cider", "zs_i2t")]
          + [cmp("id4-itc", "id3-mlm-itm", c3[k]) for k in ("chexpert_1", "chexpert_10")])
    radnli = cmp("id5-all", "id3-mlm-itm", c3["radnli"])
    claim("6.2 (3)", "ITC does not improve text classification (RadNLI)", [radnli],
          {"held": "not held", "not held": "held", "inconclusive": "held"}.get(
              radnli["verdict"], radnli["verdict"]),
          "a claim of an absence: "
          "held unless ID5 is significantly better than ID3 on RadNLI accuracy")

    # (4): ID5 against every other ID on every task column. Not held if any beats it significantly;
    # held if none does, every comparison has 2+ paired seeds, and ID5 has the highest mean on every
    # column.
    comps, leaders = [], {}
    for key, col in c3.items():
        if key.startswith("zs_"):
            continue
        comps += [cmp("id5-all", other, col) for other in TABLE3 if other != "id5-all"]
        means = {arm: statistics.mean(v.values())
                 for arm in TABLE3 if (v := cell(results, arm, col))}
        leaders[col.label] = (max(means, key=lambda arm: means[arm] if col.higher else -means[arm])
                              if means else None)
    verdicts = [c["verdict"] for c in comps]
    top = all(arm == "id5-all" for arm in leaders.values())
    verdict = ("not held" if "not held" in verdicts
               else "inconclusive (n<2)" if "inconclusive (n<2)" in verdicts
               else "held" if top else "inconclusive")
    note = "highest mean: " + ", ".join(f"{k} {labels.get(a, '–')}" for k, a in leaders.items())
    few = sum(v == "inconclusive (n<2)" for v in verdicts)
    note += f"; {few} of {len(comps)} comparisons have fewer than 2 paired seeds" if few else ""
    claim("6.2 (4)", "all three objectives (ID5) are best on every task", comps, verdict, note,
          shown=[c for c in comps if c["verdict"] == "not held"])

    # 6.3 (i): a fact about parameter counts
    shares = [r["pretrain"]["pool_params"] / r["pretrain"]["total_params"]
              for r in results.get("id5-all", {}).values()]
    pool, total = paper_pool_params()
    note = (f"paper preset: {pool:,} of {total:,} = {100 * pool / total:.2f}% "
            "(paper: 784.4k of 350M = 0.22%)")
    if shares:
        r = next(iter(results["id5-all"].values()))["pretrain"]
        note = (f"id5-all: {r['pool_params']:,} of {r['total_params']:,} = {100 * shares[0]:.2f}%; "
                + note)
    claim("6.3 (i)", "the pools add few parameters (< 0.5% of the model)", [],
          (("held" if shares[0] < 0.005 else "not held") if shares
           else "inconclusive (no id5-all run)"), note)

    claim("6.3 (ii)", "every pool size lowers the pre-training loss against no prompts",
          [cmp(arm, "none", cp["total"], pools) for arm in ("pool16", "id5-all", "pool256")])
    claim("6.3 (iii)", "a proper (middle) pool size is best",
          [cmp("id5-all", arm, cp["total"], pools) for arm in ("pool16", "pool256")])
    claim("extra", "pool beats static prompts (not a paper claim)",
          [cmp("id5-all", "static", cp["total"], pools)])
    claim("extra", "pool beats no prompts at zero-shot retrieval (not a paper claim)",
          [cmp("id5-all", "none", cp[k], pools) for k in ("zs_i2t10", "zs_t2i10")])
    for arm in VARIANTS[1:-1]:
        claim("variant", f"{arm} better than {pools['id5-all']} (not a paper claim)",
              [cmp(arm, "id5-all", cp["total"], pools), cmp(arm, "id5-all", cp["zs_i2t10"], pools)])
    rho, n = selection_vs_retrieval(results)
    if n:
        out.append({"id": "observation",
                    "claim": "the more input-dependent the selection, the worse the retrieval",
                    "verdict": f"Spearman rho = {rho:+.2f}", "comparisons": [],
                    "numbers": f"over the {n} runs with a pool and all objectives: distinct top-k "
                               "sets on 256 validation pairs (visual + textual) against zero-shot "
                               "R@10 (mean of i2t and t2i)"})
    return out


def _ranks(values):
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x, y):
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def selection_vs_retrieval(results):
    """(Spearman rho, runs) between how input-dependent a run's pool selection is (distinct top-k
    sets on the diagnostics' validation pairs, both pools) and its zero-shot R@10, over every run
    with a pool and all three objectives."""
    x, y = [], []
    for arm, runs in results.items():
        # other objectives: without ITC, retrieval stays at chance anyway
        if arm in TABLE3 and arm != "id5-all":
            continue
        for r in runs.values():
            pools = ((r.get("diagnostics") or {}).get("pools") or {})
            zs = r["pretrain"]["zero_shot"]
            if len(pools) == 2 and zs.get("i2t_r10") is not None:
                x.append(sum(p["distinct_selections"] for p in pools.values()))
                y.append((zs["i2t_r10"] + zs["t2i_r10"]) / 2)
    return ((spearman(x, y), len(x)) if len(x) > 2 and len(set(x)) > 1 and len(set(y)) > 1
            else (None, 0))


def paper_pool_params():
    """(pool, all) parameters of the paper preset's model, built on the meta device: shapes only,
    nothing allocated."""
    cfg = config.build(config.TrainConfig, dict(config.PRESETS["paper"]))
    with torch.device("meta"):
        model = PTUnifier(cfg.model)
    counts = {name: p.numel() for name, p in model.named_parameters()}
    return sum(n for name, n in counts.items() if "prompts" in name), sum(counts.values())


def report(results):
    """(tables.md text, summary dict) of every result present."""
    t3_labels = {arm: label for arm, (label, _) in TABLE3.items()}
    marks = {arm: ["✓" if o in objectives.split(",") else "" for o in ("mlm", "itm", "itc")]
             for arm, (_, objectives) in TABLE3.items()}
    pool_labels = {arm: pool_label(results, arm) for arm in ARMS}
    n_seeds = sorted({s for runs in results.values() for s in runs})
    lines = [(f"# Ablations: mean ± sample sd over seeds ({', '.join(map(str, n_seeds))}); "
              "n = seeds per row, and per cell where fewer. "
              "Percentages: AUROC, accuracy, BLEU-4, CIDEr, R@1 x100."), ""]
    t3, n3 = table(results, "## Table 3: pre-training objectives", TABLE3, t3_labels,
                   TABLE3_COLUMNS, marks.get)
    t4, n4 = table(results, "## Table 4: prompt-pool size (final pre-training losses, mean of the "
                            "last 5 log lines; total = MLM + ITM + ITC)",
                   TABLE4, pool_labels, POOL_COLUMNS)
    tv, nv = table(results, "## Pool variants", VARIANTS, pool_labels, POOL_COLUMNS)
    lines += t3 + t4 + tv
    td, nd = table(results, "## Pool diagnostics (end of pre-training: the last 5 log lines; "
                            "poolstats on 256 ROCO validation pairs; attention as a ratio to "
                            "uniform attention, 1 = no preference)",
                   DIAGNOSED, pool_labels, DIAGNOSTIC_COLUMNS)
    lines += td
    found = claims(results)
    lines += ["## Claims (paired t-test over seeds, two-sided 5%)", ""]
    lines += [f"- **{c['id']}** {c['claim']} — **{c['verdict']}** — {c['numbers']}"
              for c in found]
    summary = {"seeds": n_seeds,
               "tables": {"table3": n3, "table4": n4, "variants": nv, "diagnostics": nd},
               "claims": [{**c, "comparisons": [{k: v for k, v in x.items() if k != "line"}
                                                for x in c["comparisons"]]}
                          for c in found]}
    return "\n".join(lines) + "\n", summary


# ---- command line --------------------------------------------------------------------------------
def at_least(minimum):
    def parse(s):
        v = int(s)
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


def parser(description, out, jobs, finetunes):
    """The flags every seeded experiment shares (ablations.py, table2.py); parse with parse."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.add_argument("--out", default=out,
                   help=f"folder of the runs, tables.md and summary.json (default: {out})")
    p.add_argument("--seeds", default="0,1,2,3,4",
                   help="comma-separated seeds (default: 0,1,2,3,4; 3 is the least that gives a "
                        "spread)")
    p.add_argument("--finetunes", default=",".join(finetunes),
                   help=f"comma-separated fine-tunes (default: all: {', '.join(finetunes)})")
    p.add_argument("--jobs", type=at_least(1), default=jobs,
                   help=f"runs at once; each subprocess gets cores / jobs threads "
                        f"(default: {jobs})")
    p.add_argument("--preset", default="cpu", choices=sorted(config.PRESETS),
                   help="train.py and finetune.py preset (default: cpu, the main job's; tiny for "
                        "a smoke test)")
    p.add_argument("--finetune-steps", type=at_least(0), default=0,
                   help="fine-tuning steps; 0 = finetune.py's default for the task (default: 0)")
    p.add_argument("--data-root", default="",
                   help="prepared datasets, passed to every subprocess; empty = the synthetic "
                        "world (default: empty)")
    p.add_argument("--synth-root", default=config.RunConfig.synth_root,
                   help=f"where the synthetic world lives when --data-root is empty (default: "
                        f"{config.RunConfig.synth_root})")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing; rebuild tables.md and summary.json from the runs present")
    return p


def parse(p, argv, lists):
    """p's arguments, --seeds as a list of ints and each flag of `lists` ({name: valid values}) as
    a list in the order of its valid values (the order of work is ours, whatever the order
    given)."""
    args = p.parse_args(argv)
    for name, valid in lists.items():
        given = list(dict.fromkeys(a for a in getattr(args, name).split(",") if a))
        unknown = [a for a in given if a not in valid]
        if unknown or not given:
            p.error(f"unknown --{name} {', '.join(unknown) or '(none given)'}; "
                    f"valid: {', '.join(valid)}")
        setattr(args, name, [a for a in valid if a in given])
    try:
        args.seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s))
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or min(args.seeds) < 0:
        p.error(f"--seeds must be non-negative integers, got {args.seeds}")
    return args


def parse_args(argv=None):
    p = parser(__doc__.split("\n")[0], "runs/ablations", jobs=2, finetunes=FINETUNES)
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated arms (default: all: {', '.join(ARMS)})")
    p.add_argument("--steps", type=at_least(1), default=400,
                   help="pre-training steps of every arm (default: 400)")
    p.add_argument("--eval-pairs", type=at_least(1), default=1000,
                   help="ROCO test pairs of the closing zero-shot retrieval, whose log line marks "
                        "a finished pre-training (default: 1000)")
    p.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                   help="leave out the tools/poolreport.py step of the arms with prompts")
    return parse(p, argv, {"arms": ARMS, "finetunes": FINETUNES})


def tabulate(out, report):
    """Rebuild <out>/tables.md and summary.json from every result.json present (report(results) ->
    (markdown, summary)); print the tables; return (results, summary)."""
    results = load_results(out)
    if not results:
        raise SystemExit(f"no result.json under {out}/<arm>/seed<S>/: nothing to tabulate")
    text, summary = report(results)
    print(text, end="")
    write_atomic(os.path.join(out, "tables.md"), text)
    write_json(os.path.join(out, "summary.json"), summary)
    print(f"tables: {os.path.join(out, 'tables.md')}, numbers: {os.path.join(out, 'summary.json')}")
    return results, summary


def stop_on(failures):
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed: {'; '.join(failures)}; each step's .out "
                         "file in its run folder says why; run the same command again to retry "
                         "them")


def check_recipe(args, recipe=None):
    """Refuse to mix recipes in one --out: outputs count as done whatever flags made them."""
    recipe = recipe or {"preset": args.preset, "steps": args.steps, "eval_pairs": args.eval_pairs,
                        "finetune_steps": args.finetune_steps}
    recipe = {**recipe, "data_root": os.path.abspath(args.data_root) if args.data_root else "",
              "synth_root": "" if args.data_root else os.path.abspath(args.synth_root)}
    path = os.path.join(args.out, "recipe.json")
    saved = read_json(path)
    if saved is not None and saved != recipe:
        diff = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}"
                         for k, v in recipe.items() if saved.get(k) != v)
        raise SystemExit(f"{args.out} holds runs of another recipe ({diff}): choose another --out, "
                         f"or run with the same flags to continue them")
    os.makedirs(args.out, exist_ok=True)
    write_json(path, recipe)


def prepare_data(args):
    """The datasets every run reads, made here, once, before the runs start in parallel: two
    subprocesses making the synthetic world at once would race on its files."""
    cfg = config.build(config.TrainConfig, {**config.PRESETS[args.preset],
                                            "data_root": args.data_root,
                                            "synth_root": args.synth_root})
    tasks_run = dict.fromkeys(flags[flags.index("--task") + 1] for flags in FINETUNES.values())
    names = list(PRETRAIN_DATA) + [tasks.TASKS[t].folder for t in tasks_run]
    # a single process: rank 0 of 1, so ensure_prepared makes what is missing
    root, _ = source.ensure_prepared(cfg, names, Dist(), print)
    print(f"data: {', '.join(names)} in {root}")


def main(argv=None):
    args = parse_args(argv)
    failures = []
    if not args.table_only:
        check_recipe(args)
        prepare_data(args)
        n = len(args.arms) * len(args.seeds)
        print(f"{n} runs ({len(args.arms)} arms x seeds {','.join(map(str, args.seeds))}) "
              f"into {args.out}, {args.jobs} at a time; "
              f"each step's console goes to <run>/<step>.out")
        failures = run_all(args)
    results, summary = tabulate(args.out, report)
    figure = loss_curves(args.out, sorted(results), os.path.join(args.out, "loss_curves.png"))
    print(f"pre-training losses: {figure}")
    stop_on(failures)
    return summary


if __name__ == "__main__":
    main()
