r"""Fine-tune PTUnifier on one downstream task of Table 2 and report its test metrics (section 5.3).

    python finetune.py --task chexpert                   # CPU, synthetic, from runs/pretrain if any
    python finetune.py --task chexpert --data-frac 0.01  # label efficiency: seeded 1% train subset
    python finetune.py --task vqa_rad --init scratch     # the no-pre-training baseline
    torchrun --nproc_per_node=8 finetune.py --preset paper --task slake --init runs/paper \
        --data-root /data/prepared

Tasks: chexpert, rsna (image classification), radnli (text classification), mimic_sum
(summarisation), roco_retrieval, mimic_gen (report generation), vqa_rad, slake, medvqa2019 (VQA).
The model is selected on val every --eval-every steps and only the selected weights see test. Writes
<out>/results.json and the selected checkpoint.

Text lengths: --max-text-len (encoder input) and --max-gen-len (generation target) default per task
to the 95th percentile of the training split's token counts, rounded up to 8; a longer input length
than the checkpoint's extends its learned text position embeddings. The share of inputs and targets
cut in each split is printed and stored.

Read top to bottom: config -> initial checkpoint -> data -> model -> optimizer -> loop with
selection -> test.
"""

import contextlib
import dataclasses
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ptunifier_min import (checkpoint, data, distributed, manifests, optim, pretrained, runs,
                           stopping, tasks)
from ptunifier_min import config as config_lib
from ptunifier_min.config import FinetuneConfig
from ptunifier_min.datasets.source import ensure_prepared
from ptunifier_min.files import write_json
from ptunifier_min.images import ImageTransform
from ptunifier_min.model import ModelConfig, PTUnifier
from ptunifier_min.pretrained import set_image_size, set_text_len
from ptunifier_min.tokenizer import load_tokenizer, special_ids

DEFAULT_INIT = "runs/pretrain"  # where `python train.py` writes
# Model fields a run may change against its checkpoint: they resize or regularise, they hold no
# weights of their own.
CHANGEABLE = ("image_size", "max_text_len", "dropout")
# default text lengths hold this share of the training split's texts whole (choose_lengths)
COVER = 0.95


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = config_lib.parse_args(FinetuneConfig, config_lib.FINETUNE_PRESETS, argv,
                                description=__doc__.split("\n")[0])
    task = tasks.get_task(cfg.task)
    if not task.kind.fine_tunes:
        raise SystemExit(f"{task.name} is evaluated zero-shot, from a pre-training checkpoint: "
                         f"python eval.py --task {task.name} --ckpt RUN")
    runs.require_tracker(cfg.report_to)  # --report-to's package, before anything waits
    proc = distributed.setup_distributed(cfg.seed, cfg.dist_timeout_min)
    print0 = print if proc.main else (lambda *a, **k: None)
    precision = distributed.resolve_precision(cfg.precision, proc.device)

    if cfg.resume:
        runs.refuse_the_other_scripts_run(cfg.resume, "finetune.py")

    # ---- initial weights: a pre-training checkpoint decides the architecture and the tokenizer ---
    ckpt, ckpt_model = resolve_init(cfg, print0)
    cfg.out = cfg.out or default_out(task.name, ckpt, cfg.data_frac)
    # before any data is read: --out becomes this run's own (locked, no earlier run mixed in)
    if proc.main:
        runs.claim_run_folder(cfg.out, cfg.resume, cfg.overwrite, print0,
                                    # where the resumable state is
                                    checkpoints=os.path.join(cfg.out, "train_state"))

    # ---- data ------------------------------------------------------------------------------------
    # a resumed run keeps the tokenizer its checkpoint carries, and never trains one into the root
    trained_with = (checkpoint.resumed_tokenizer(os.path.join(cfg.resume, "train_state"))
                    if cfg.resume else None)
    root, tok_path = ensure_prepared(cfg, [task.folder], proc, print0, trained_with)
    tok = load_tokenizer(tok_path)
    special = special_ids(tok)
    if ckpt is None:
        cfg.model.vocab_size, cfg.model.cls_id, cfg.model.sep_id = (
            tok.get_vocab_size(), special["cls"], special["sep"])
    elif tok.get_vocab_size() != cfg.model.vocab_size:
        raise SystemExit(f"{tok_path} has {tok.get_vocab_size()} tokens, "
                         f"the checkpoint's model {cfg.model.vocab_size}")
    folder = os.path.join(root, task.folder)
    meta = data.read_meta(folder)
    splits = {s: data.read_split(folder, s, required=task.fields)
              for s in ("train", "val", "test")}
    # what this run reads, by content: compared on resume, and by eval.py (the same splits)
    record = manifests.data_record(root, {task.folder: splits}, tok_path)
    tok_path = pretrained.single_file_tokenizer(tok, tok_path, cfg.out, proc.main)
    lengths = choose_lengths(cfg, task, tasks.text_lengths(task, splits["train"], tok),
                             "max_text_len" in cfg.given, print0)
    splits["train"] = data.subset(splits["train"], cfg.data_frac, cfg.seed)
    n_val = len(splits["val"])
    splits["val"] = data.cap(splits["val"], cfg.val_max, cfg.seed)
    # VQA answers outside the vocabulary: no target
    oov = [r for r in splits["train"] if r.get("label") == -1]
    splits["train"] = [r for r in splits["train"] if r.get("label") != -1]
    empty = [s for s, recs in splits.items() if not recs]
    if empty:
        raise SystemExit(f"{folder}: no {' / '.join(empty)} records to fine-tune and select on")
    truncated = {s: tasks.truncated_shares(tasks.text_lengths(task, recs, tok),
                                           cfg.model.max_text_len, cfg.max_gen_len)
                 for s, recs in splits.items()}
    if truncated["train"]:
        print0("truncated: " +
               "; ".join(f"{s} " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in t.items())
                         for s, t in truncated.items()) +
               f" (inputs at --max-text-len {cfg.model.max_text_len}, "
               f"targets at --max-gen-len {cfg.max_gen_len})")
    # a 1% subset can be smaller than a batch
    batch_size = min(cfg.batch_size, len(splits["train"]) // proc.world)
    transform = ImageTransform(cfg.model.image_size, train=True,
                                    random_resized_crop=cfg.random_resized_crop)
    # uint8 one-channel pixels: the model normalises them on the device
    dataset = data.TaskDataset(splits["train"], task, transform.pixels, cfg.seed, train=True)
    collate = data.task_collate(tok, cfg.model.max_text_len, cfg.max_gen_len)
    # what tasks.evaluate reads besides the model and the records
    # (val during training, test at the end)
    eval_args = dict(meta=meta, image_size=cfg.model.image_size,
                     max_text_len=cfg.model.max_text_len, max_gen_len=cfg.max_gen_len,
                     batch_size=cfg.eval_batch_size, device=proc.device, precision=precision,
                     beam_size=cfg.beam_size, length_penalty=cfg.length_penalty,
                     num_workers=cfg.num_workers, proc=proc)
    order = data.BatchOrder(len(dataset), batch_size, proc.world, proc.rank, cfg.seed)

    # ---- model: backbone (pre-trained or not), then the task head; the decoder copies the
    # backbone's blocks ----------------------------------------------------------------------------
    # scratch runs only
    imported = pretrained.prepare(cfg.init_vision, cfg.init_text, tok, cfg.model, print0,
                                  cfg.given)
    # built at the checkpoint's sizes so that its weights load as they are, then resized to
    # this run's
    sizes = {k: ckpt_model[k] for k in ("image_size", "max_text_len")} if ckpt else {}
    backbone = PTUnifier(dataclasses.replace(cfg.model, **sizes))
    pretrained.load_into(backbone, imported, print0)
    if ckpt:
        checkpoint.load_weights(ckpt, backbone, strict=True)
        if sizes["image_size"] != cfg.model.image_size:
            print0(f"image size {sizes['image_size']} -> {cfg.model.image_size}: "
                   "position embeddings interpolated (bicubic)")
            set_image_size(backbone, cfg.model.image_size)
        if sizes["max_text_len"] != cfg.model.max_text_len:
            print0(f"text length {sizes['max_text_len']} -> {cfg.model.max_text_len}: "
                   "text position embeddings " +
                   ("extended (the learned rows, then rows 1.. repeated)"
                    if cfg.model.max_text_len > sizes["max_text_len"] else "truncated"))
            set_text_len(backbone, cfg.model.max_text_len)
    model = tasks.TaskModel(backbone, task, tasks.num_outputs(task, meta),
                            cfg.max_gen_len).to(proc.device)
    probe = data.to_device(collate([dataset[i] for i in range(min(2, len(dataset)))]), proc.device)
    with distributed.autocast(precision, proc.device):
        probe_loss, _ = task.kind.loss(model, model(probe), probe, special["pad"])
    frozen = optim.freeze_unreached(model, probe_loss)  # DDP then needs no unused-parameter search
    opt, groups = optim.build_optimizer(model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay,
                                        (cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.warmup_linear(cfg.steps, cfg.warmup_frac))
    start_step, best = 0, {"score": None, "step": 0, "metrics": None, "state": None}
    # a killed run goes on exactly: weights, optimizer, schedule, RNG, data position, best so far
    if cfg.resume:
        # refuses the settings a resumed run cannot change;
        # applies and prints those it may (new LRs too)
        state = checkpoint.resume_from(os.path.join(cfg.resume, "train_state"), cfg, model, opt,
                                       sched, print0, record=record)
        checkpoint.set_rng_state(state["rng"][proc.rank] if proc.rank < len(state["rng"])
                                 else state["rng"][0])  # its own
        start_step, best = state["step"], state["best"]
        print0(f"best so far: step {best['step']}")
    train_model = distributed.compile_model(model, cfg.compile, proc.device)
    if proc.world > 1:
        # the model's buffers are constants (the pixel table, the [CLS] [SEP] ids):
        # no broadcast before every forward
        train_model = DDP(train_model,
                          device_ids=[proc.local_rank] if proc.device.type == "cuda" else None,
                          forward_sync_buffers=False)

    n_params = sum(p.numel() for p in model.parameters())
    print0(f"config: {config_lib.to_dict(cfg)}")
    print0(f"task {task.name} ({type(task.kind).__name__}): {folder}; "
           f"train {len(splits['train']):,} ({100 * cfg.data_frac:g}% of the split"
           f"{f', {len(oov)} out-of-vocabulary answers left out' if oov else ''}), "
           f"val {len(splits['val']):,} of {n_val:,}, test {len(splits['test']):,}; "
           f"selection on val by {task.selection_metric}")
    print0(f"init: {ckpt or 'scratch (random backbone)'}; tokenizer {tok_path}")
    print0(f"model: {n_params:,} parameters; not reached by this task's loss, frozen: "
           f"{summarise(frozen) or 'none'}")
    print0("optimizer groups: " + ", ".join(f"{k} {v:,}" for k, v in groups.items()) +
        f"; lr backbone {cfg.lr_backbone:g}, head {cfg.lr_head:g}")
    print0(f"global batch {batch_size * cfg.grad_accum * proc.world} = {batch_size} per device "
           f"x {cfg.grad_accum} accumulation x {proc.world} ranks; {cfg.steps} steps; "
           f"precision {precision}; device {proc.device}")
    record_path = os.path.join(cfg.out, "data.json")  # every checkpoint carries it
    if proc.main:
        write_json(os.path.join(cfg.out, "config.json"), config_lib.to_dict(cfg))
        write_json(record_path, record)
    log = runs.Log(os.path.join(cfg.out, "log.jsonl"), proc.main,
                   resume_step=start_step if cfg.resume else None, report_to=cfg.report_to,
                   config=config_lib.to_dict(cfg))

    # ---- training loop: evaluate on val every eval_every steps, keep the best weights ------------
    batches = data.micro_batches(dataset, order, collate, cfg.num_workers,
                                 start_step * cfg.grad_accum)
    guard = optim.NonFiniteGuard(cfg.max_skips, cfg.out, log)
    window, t_start, t0 = [], time.perf_counter(), time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not proc.main, desc=f"fine-tune {task.name}")
    # messages between bar updates, without breaking the bar
    note = bar.write if proc.main else print0
    model.train()
    # from here a stop signal (SIGTERM, SIGINT, SIGUSR1) lets the step in flight finish and be saved
    stopping.finish_step_on_stop(True)
    for step in bar:
        step_stats = []
        for micro, batch in enumerate(data.next_micro_batches(batches, cfg.grad_accum,
                                                              proc.device)):
            # DDP all-reduces the gradients on the last micro-step only;
            # no_sync must wrap the forward pass too
            last = micro == cfg.grad_accum - 1
            with (train_model.no_sync() if proc.world > 1 and not last
                  else contextlib.nullcontext()):
                with distributed.autocast(precision, proc.device):
                    loss, scalars = task.kind.loss(model, train_model(batch), batch,
                                                   special["pad"])
                # the gradients add up to the mean over the micro-steps
                (loss / cfg.grad_accum).backward()
            # tensors: read on logging steps only, so the host does not wait here
            step_stats.append(scalars)
        # non-finite check (the host waits for the device here, once per step), clip, AdamW,
        # schedule
        grad_norm = optim.optimizer_step(model, opt, sched, loss, cfg.grad_clip, proc)
        if guard(grad_norm, step + 1):  # a skipped step is logged by the guard, saved as any
            window.append(step_stats)
        # a stop signal on any rank: every rank saves this step and stops (agreed on the host)
        stop = stopping.requested(proc)
        if window and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or stop):
            steps = [{k: sum(float(s[k]) for s in micros) / len(micros) for k in micros[0]}
                     for micros in window]
            rec = {"step": step + 1, **{k: sum(s[k] for s in steps) / len(steps) for k in steps[0]},
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "lr_backbone": sched.get_last_lr()[0],
                   "samples_per_s": (len(window) * batch_size * cfg.grad_accum * proc.world
                                     / (time.perf_counter() - t0))}
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            window, t0 = [], time.perf_counter()
        validate = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps
        if validate:
            # selection on val only. Every rank evaluates its share and receives the same metrics,
            # so every rank keeps the same best weights, which all of them test at the end.
            val = tasks.evaluate(model, task, splits["val"], tok, **eval_args, print0=note)
            score = tasks.selection_score(task, val)
            if best["state"] is None or score > best["score"]:
                best = {"score": score, "step": step + 1, "metrics": val,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            log.write({"step": step + 1, "val": val, "best_step": best["step"]})
            metric = task.selection_metric
            note(f"step {step + 1}: val {metric} {fmt(val.get(metric))} "
                 f"(best {fmt(best['score'])} at step {best['step']})")
        if validate or stop:
            # a collective, after validation: each rank's own state, for --resume
            rng = checkpoint.gather_rng(proc)
            if proc.main:
                # the resumable state, written at every validation so that a killed run loses at
                # most eval_every steps, and when a stop signal came
                checkpoint.save_checkpoint(
                    os.path.join(cfg.out, "train_state"), step + 1, model, cfg,
                    {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "step": step + 1, "rng": rng, "best": best}, files=[tok_path, record_path])
            distributed.barrier(proc)
            t0 = time.perf_counter()
        if stop:
            stopping.stop_run(stop)
    bar.close()
    stopping.finish_step_on_stop(False)  # the test below stops at once, as preparing did
    train_seconds = time.perf_counter() - t_start

    # ---- test, with the weights selected on val: every rank tests its share ----------------------
    model.load_state_dict(best["state"])
    if proc.main:
        # meta.json (label names, answers) goes along so that ptunifier_min.load(...).predict can
        # name its outputs
        path = checkpoint.save_checkpoint(cfg.out, best["step"], model, cfg,
                                          files=[tok_path, os.path.join(folder, "meta.json"),
                                                 record_path])
    t1 = time.perf_counter()
    test = tasks.evaluate(model, task, splits["test"], tok, **eval_args, print0=print0)
    if proc.main:
        results = {"task": task.name, "split": "test", "metrics": test,
                   "val_metrics": best["metrics"],
                   "best_step": best["step"], "config": config_lib.to_dict(cfg),
                   "init": ckpt or "scratch", "split_hash": data.split_hash(splits),
                   "counts": {s: len(r) for s, r in splits.items()}, "checkpoint": path,
                   "text_lengths": lengths, "truncated": truncated,
                   "seconds": {"train_and_val": round(train_seconds, 1),
                               "test": round(time.perf_counter() - t1, 1)}}
        write_json(os.path.join(cfg.out, "results.json"), results)
        print0(f"test {task.name} (weights of step {best['step']}): " + report(test))
        print0(f"results: {os.path.join(cfg.out, 'results.json')}; checkpoint: {path}")
    del train_model  # before the process group ends (distributed.leave)
    distributed.leave(proc)


def resolve_init(cfg, print0):
    """The checkpoint to start from (None = scratch) and its model config. With a checkpoint,
    cfg.model becomes the checkpoint's architecture and cfg.tokenizer its tokenizer; model flags the
    user gave must agree with it."""
    if (cfg.init_vision or cfg.init_text) and cfg.init not in ("", "scratch"):
        raise SystemExit("--init-vision / --init-text start a scratch run; "
                         "they cannot be combined with --init")
    if cfg.init == "scratch" or cfg.init_vision or cfg.init_text:
        return None, None
    path = cfg.init or DEFAULT_INIT
    try:
        ckpt = os.path.abspath(checkpoint.resolve_checkpoint(path))
    except checkpoint.CheckpointError as e:
        if cfg.init:
            raise SystemExit(str(e)) from None
        print0(f"no pre-training checkpoint at {DEFAULT_INIT} (python train.py writes one): "
               "fine-tuning from scratch")
        return None, None
    saved = checkpoint.read_checkpoint_config(ckpt)["config"]
    if "task" in saved:
        raise SystemExit(f"{ckpt} is a fine-tuned {saved['task']} checkpoint; "
                         "--init takes a pre-training checkpoint (evaluate this one with eval.py)")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    requested = {**saved["model"], **{k: getattr(cfg.model, k) for k in cfg.given & model_fields}}
    diffs = [line for line in checkpoint.config_differences(saved["model"], requested)
             if line.split(":")[0] not in CHANGEABLE]
    if diffs:
        raise SystemExit(f"--init {ckpt} was trained with another architecture than requested:\n"
                         "  " + "\n  ".join(diffs) +
                         "\ndrop these flags (the checkpoint decides the architecture) or use "
                         "--init scratch")
    try:
        cfg.model = ModelConfig(**requested)
    except TypeError as e:
        raise SystemExit(f"{ckpt}: its model config does not fit this version: {e}") from None
    cfg.tokenizer = checkpoint.checkpoint_tokenizer(ckpt)
    return ckpt, saved["model"]


def choose_lengths(cfg, task, train_lengths, text_len_given, print0):
    """Set the encoder input length (cfg.model.max_text_len) and the generation target length
    (cfg.max_gen_len) that the command line left open from the task's whole training split, and say
    why. Returns the choice for results.json.

    Default = the COVER (95th) percentile of the training texts' token counts, rounded up to a
    multiple of 8, so that at least 95% of them are read whole; the input length never goes below
    the backbone's own (the checkpoint's, or the preset's from scratch): a shorter table would cut
    texts the model can already read. The whole split, not the --data-frac subset, so that runs on
    1%, 10% and 100% of the data read texts alike.
    """
    chosen = {}
    for key, flag, given, current in (
            ("inputs", "--max-text-len", text_len_given, cfg.model.max_text_len),
            ("targets", "--max-gen-len", cfg.max_gen_len > 0, cfg.max_gen_len)):
        if key not in train_lengths:
            continue
        need, p = tasks.length_to_cover(train_lengths[key], COVER)
        value = current if given else max(current, need)
        chosen[key] = {"length": value, "percentile": p, "by": flag if given else "data"}
        why = f"given by {flag}" if given else (
            f"the {100 * COVER:g}th percentile of the {len(train_lengths[key]):,} training {key} "
            f"is {p} tokens" +
            (f", rounded up to {need}" if need == value
             else f"; the backbone's {value} is longer and kept") +
            f" (set {flag} to choose)")
        print0(f"{task.name} {key[:-1]} length {value}: {why}")
        if key == "inputs":
            cfg.model.max_text_len = value
        else:
            cfg.max_gen_len = value
    return chosen


def default_out(task, ckpt, frac):
    return os.path.join("runs", "finetune", f"{task}-{'pretrained' if ckpt else 'scratch'}" +
                        (f"-{100 * frac:g}pct" if frac < 1 else ""))


def summarise(names):
    """Parameter names -> their top-level groups, e.g.
    ['backbone.mlm_head', 'backbone.visual_prompts']."""
    groups = []
    for n in names:
        parts = n.split(".")
        g = ".".join(parts[:2]) if parts[0] == "backbone" else parts[0]
        if g not in groups:
            groups.append(g)
    return ", ".join(groups)


def fmt(v):
    return "undefined" if v is None or v == float("-inf") else f"{100 * v:.2f}"


def report(m):
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items()
                     if isinstance(v, float) and k != "seconds")


if __name__ == "__main__":
    runs.run_script(main)
