"""Fine-tune PTUnifier on one downstream task of the paper's Table 2 and report its test metrics (paper section 5.3).

    python finetune.py --task chexpert                     # CPU preset, synthetic world, from runs/pretrain if present
    python finetune.py --task chexpert --data-frac 0.01    # label efficiency: a seeded 1% of the training split
    python finetune.py --task vqa_rad --init scratch       # the no-pre-training baseline
    torchrun --nproc_per_node=8 finetune.py --preset paper --task slake --init runs/paper --data-root /data/prepared

Tasks: chexpert, rsna (image classification), radnli (text classification), mimic_sum (summarisation), roco_retrieval,
mimic_gen (report generation), vqa_rad, slake, medvqa2019 (VQA). The model is selected on val every --eval-every steps
and only the selected weights see test. Writes <out>/results.json and the selected checkpoint.

Read top to bottom: config -> initial checkpoint -> data -> model -> optimizer -> loop with selection -> test.
"""

import dataclasses
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ptunifier_min import config as config_lib
from ptunifier_min import data, engine, tasks
from ptunifier_min.config import FinetuneConfig, ModelConfig
from ptunifier_min.model import PTUnifier, backbone_parameter_names
from ptunifier_min.world import ensure_prepared

DEFAULT_INIT = "runs/pretrain"  # where `python train.py` writes
# Model fields a run may change against its checkpoint: they resize or regularise, they hold no weights of their own.
CHANGEABLE = ("image_size", "dropout")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = config_lib.parse_args(FinetuneConfig, config_lib.FINETUNE_PRESETS, argv,
                                description=__doc__.split("\n")[0])
    task = tasks.get_task(cfg.task)
    d = engine.setup_distributed(cfg.seed)
    say = print if d.main else (lambda *a, **k: None)
    precision = engine.resolve_precision(cfg.precision, d.device)

    # ---- initial weights: a pre-training checkpoint decides the architecture and the tokenizer ----------------------
    ckpt, ckpt_image_size = resolve_init(cfg, argv, say)
    cfg.out = cfg.out or default_out(task.name, ckpt, cfg.data_frac)

    # ---- data --------------------------------------------------------------------------------------------------------
    root, tok_path = ensure_prepared(cfg, [task.folder], d, say)
    tok = data.load_tokenizer(tok_path)
    special = data.special_ids(tok)
    if ckpt is None:
        cfg.model.vocab_size, cfg.model.cls_id, cfg.model.sep_id = tok.get_vocab_size(), special["cls"], special["sep"]
    elif tok.get_vocab_size() != cfg.model.vocab_size:
        raise SystemExit(f"{tok_path} has {tok.get_vocab_size()} tokens, the checkpoint's model {cfg.model.vocab_size}")
    folder = os.path.join(root, task.folder)
    meta = data.read_meta(folder)
    splits = {s: data.read_split(folder, s) for s in ("train", "val", "test")}
    splits["train"] = tasks.subset(splits["train"], cfg.data_frac, cfg.seed)
    n_val = len(splits["val"])
    splits["val"] = tasks.cap(splits["val"], cfg.val_max, cfg.seed)
    oov = [r for r in splits["train"] if r.get("label") == -1]  # VQA answers outside the vocabulary: no target
    splits["train"] = [r for r in splits["train"] if r.get("label") != -1]
    empty = [s for s, recs in splits.items() if not recs]
    if empty:
        raise SystemExit(f"{folder}: no {' / '.join(empty)} records to fine-tune and select on")
    batch_size = min(cfg.batch_size, len(splits["train"]) // d.world)  # a 1% subset can be smaller than a batch
    transform = data.ImageTransform(cfg.model.image_size, train=True, random_resized_crop=cfg.random_resized_crop)
    dataset = tasks.TaskDataset(splits["train"], task, transform, cfg.seed, train=True)
    collate = tasks.make_collate(task, tok, cfg.model.max_text_len, cfg.max_gen_len)
    order = engine.BatchOrder(len(dataset), batch_size, d.world, d.rank, cfg.seed)

    # ---- model: backbone (pre-trained or not), then the task head; the decoder copies the backbone's blocks ---------
    backbone = PTUnifier(dataclasses.replace(cfg.model, image_size=ckpt_image_size or cfg.model.image_size))
    if ckpt:
        engine.load_weights(ckpt, backbone, strict=True)
        if ckpt_image_size != cfg.model.image_size:
            say(f"image size {ckpt_image_size} -> {cfg.model.image_size}: position embeddings interpolated (bicubic)")
            tasks.set_image_size(backbone, cfg.model.image_size)
    model = tasks.TaskModel(backbone, task, tasks.num_outputs(task, meta), cfg.max_gen_len).to(d.device)
    probe = {k: v.to(d.device) for k, v in collate([dataset[i] for i in range(min(2, len(dataset)))]).items()}
    with engine.autocast(precision, d.device):
        probe_loss, _ = tasks.task_loss(model, task, model(probe), probe, special["pad"])
    frozen = tasks.freeze_unreached(model, probe_loss)
    backbone_names = {f"backbone.{n}" for n in backbone_parameter_names(model.backbone)}
    opt, groups = engine.build_optimizer(model, backbone_names, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay,
                                         (cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.warmup_linear(cfg.steps, cfg.warmup_frac))
    start_step, best = 0, {"score": None, "step": 0, "metrics": None, "state": None}
    if cfg.resume:  # a killed run goes on exactly: weights, optimizer, schedule, RNG, data position, best so far
        state_dir = os.path.join(cfg.resume, "train_state")
        engine.load_weights(state_dir, model)
        state = engine.load_trainer_state(state_dir)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        engine.set_rng_state(state["rng"])
        start_step, best = state["step"], state["best"]
        say(f"resumed from {engine.resolve_checkpoint(state_dir)} at step {start_step} (best so far: step "
            f"{best['step']})")
    train_model = torch.compile(model) if cfg.compile else model
    if d.world > 1:
        train_model = DDP(train_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"config: {config_lib.to_dict(cfg)}")
    say(f"task {task.name} ({task.kind}): {folder}; train {len(splits['train']):,} "
        f"({100 * cfg.data_frac:g}% of the split{f', {len(oov)} out-of-vocabulary answers left out' if oov else ''}), "
        f"val {len(splits['val']):,} of {n_val:,}, test {len(splits['test']):,}; selection on val by {task.main}")
    say(f"init: {ckpt or 'scratch (random backbone)'}; tokenizer {tok_path}")
    say(f"model: {n_params:,} parameters; not reached by this task's loss, frozen: {summarise(frozen) or 'none'}")
    say("optimizer groups: " + ", ".join(f"{k} {v:,}" for k, v in groups.items()) +
        f"; lr backbone {cfg.lr_backbone:g}, head {cfg.lr_head:g}")
    say(f"global batch {batch_size * cfg.grad_accum * d.world} = {batch_size} per device x {cfg.grad_accum} "
        f"accumulation x {d.world} ranks; {cfg.steps} steps; precision {precision}; device {d.device}")
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
        config_lib.save_json(cfg, os.path.join(cfg.out, "config.json"))
    log = engine.Log(os.path.join(cfg.out, "log.jsonl"), d.main)

    # ---- training loop: evaluate on val every eval_every steps, keep the best weights --------------------------------
    def loss_fn(batch, micro):
        return tasks.task_loss(model, task, train_model(batch), batch, special["pad"])

    batches = engine.micro_batches(dataset, order, collate, cfg.num_workers, start_step * cfg.grad_accum)
    guard = engine.NonFiniteGuard(cfg.max_skips, cfg.out, log)
    window, t_start, t0 = [], time.perf_counter(), time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not d.main,
               desc=f"fine-tune {task.name}")
    note = bar.write if d.main else say  # messages between bar updates, without breaking the bar
    model.train()
    for step in bar:
        loss, stats = engine.accumulate(train_model, batches, loss_fn, cfg.grad_accum, d, precision)
        grad_norm = engine.optimizer_step(model, opt, sched, loss, cfg.grad_clip, d)
        if guard(grad_norm, step + 1):
            window.append(stats)
        if window and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            rec = {"step": step + 1, **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                   "grad_norm": grad_norm, "lr_backbone": sched.get_last_lr()[0],
                   "samples_per_s": len(window) * batch_size * cfg.grad_accum * d.world / (time.perf_counter() - t0)}
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            window, t0 = [], time.perf_counter()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            if d.main:  # selection on val only; the other ranks wait at the barrier
                val = tasks.evaluate(model, task, splits["val"], meta, tok, cfg, d.device, precision, say=note)
                score = tasks.main_score(task, val)
                if best["state"] is None or score > best["score"]:
                    best = {"score": score, "step": step + 1, "metrics": val,
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                log.write({"step": step + 1, "val": val, "best_step": best["step"]})
                # the resumable state, written at every validation so that a killed run loses at most eval_every steps
                engine.save_checkpoint(os.path.join(cfg.out, "train_state"), step + 1, model, cfg,
                                       {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                        "step": step + 1, "rng": engine.rng_state(), "best": best})
                note(f"step {step + 1}: val {task.main} {fmt(val.get(task.main))} (best {fmt(best['score'])} "
                    f"at step {best['step']})")
            engine.barrier(d)
            t0 = time.perf_counter()
    bar.close()
    train_seconds = time.perf_counter() - t_start

    # ---- test, with the weights selected on val ----------------------------------------------------------------------
    if d.main:
        model.load_state_dict(best["state"])
        path = engine.save_checkpoint(cfg.out, best["step"], model, cfg, files=[tok_path])
        t1 = time.perf_counter()
        test = tasks.evaluate(model, task, splits["test"], meta, tok, cfg, d.device, precision, say=say)
        results = {"task": task.name, "metrics": test, "val_metrics": best["metrics"], "best_step": best["step"],
                   "config": config_lib.to_dict(cfg), "init": ckpt or "scratch", "split_hash": tasks.split_hash(splits),
                   "counts": {s: len(r) for s, r in splits.items()}, "checkpoint": path,
                   "seconds": {"train_and_val": round(train_seconds, 1),
                               "test": round(time.perf_counter() - t1, 1)}}
        engine.write_json(os.path.join(cfg.out, "results.json"), results)
        say(f"test {task.name} (weights of step {best['step']}): " + report(test))
        say(f"results: {os.path.join(cfg.out, 'results.json')}; checkpoint: {path}")
    engine.barrier(d)
    if d.world > 1:
        torch.distributed.destroy_process_group()


def resolve_init(cfg, argv, say):
    """The checkpoint to start from (None = scratch) and its image size. With a checkpoint, cfg.model becomes the
    checkpoint's architecture and cfg.tokenizer its tokenizer; model flags the user gave must agree with it."""
    if cfg.init == "scratch":
        return None, None
    path = cfg.init or DEFAULT_INIT
    try:
        ckpt = os.path.abspath(engine.resolve_checkpoint(path))
    except engine.CheckpointError as e:
        if cfg.init:
            raise SystemExit(str(e)) from None
        say(f"no pre-training checkpoint at {DEFAULT_INIT} (python train.py writes one): fine-tuning from scratch")
        return None, None
    saved = engine.read_checkpoint_config(ckpt)["config"]
    if "task" in saved:
        raise SystemExit(f"{ckpt} is a fine-tuned {saved['task']} checkpoint; --init takes a pre-training checkpoint "
                         "(evaluate this one with eval.py)")
    given = given_model_flags(argv)
    requested = {**saved["model"], **{k: getattr(cfg.model, k) for k in given}}
    diffs = [line for line in engine.config_differences(saved["model"], requested)
             if line.split(":")[0] not in CHANGEABLE]
    if diffs:
        raise SystemExit(f"--init {ckpt} was trained with another architecture than requested:\n  " +
                         "\n  ".join(diffs) + "\ndrop these flags (the checkpoint decides the architecture) or use "
                         "--init scratch")
    try:
        cfg.model = ModelConfig(**requested)
    except TypeError as e:
        raise SystemExit(f"{ckpt}: its model config does not fit this version: {e}") from None
    cfg.tokenizer = engine.checkpoint_tokenizer(ckpt)
    return ckpt, saved["model"]["image_size"]


def given_model_flags(argv):
    """The ModelConfig fields set on the command line (argparse's unique-prefix abbreviations resolved as it does)."""
    flags = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name != "model"]
    model = [f.name for f in dataclasses.fields(ModelConfig)]
    names = set()
    for a in argv:
        if not a.startswith("--"):
            continue
        name = a[2:].split("=")[0].replace("-", "_")
        matches = [name] if name in flags + model else [n for n in flags + model if n.startswith(name)]
        if len(matches) == 1 and matches[0] in model:
            names.add(matches[0])
    return sorted(names)


def default_out(task, ckpt, frac):
    return os.path.join("runs", "finetune", f"{task}-{'pretrained' if ckpt else 'scratch'}" +
                        (f"-{100 * frac:g}pct" if frac < 1 else ""))


def summarise(names):
    """Parameter names -> their top-level groups, e.g. ['backbone.mlm_head', 'backbone.visual_prompts']."""
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
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and k != "seconds")


if __name__ == "__main__":
    sys.exit(main())
