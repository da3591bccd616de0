"""Pre-train PTUnifier with MLM, ITM and ITC (paper section 3.3).

    python train.py                                   # CPU preset on the synthetic world (made on demand), ~10 min
    python train.py --preset tiny --steps 20          # smoke test
    torchrun --nproc_per_node=8 train.py --preset paper --data-root /data/prepared --out runs/paper

Read top to bottom: config -> data -> model -> optimizer -> loop -> checkpoint -> zero-shot retrieval.
"""

import contextlib
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ptunifier_min import config as config_lib
from ptunifier_min import data, engine, metrics, retrieval
from ptunifier_min.model import PTUnifier, backbone_parameter_names, flops_per_pair
from ptunifier_min.objectives import freeze_unused, pretraining_loss
from ptunifier_min.world import ensure_prepared


def main(argv=None):
    cfg = config_lib.parse_args(config_lib.TrainConfig, config_lib.PRESETS, argv, description=__doc__.split("\n")[0])
    objectives = cfg.objective_set()
    d = engine.setup_distributed(cfg.seed)
    say = print if d.main else (lambda *a, **k: None)
    precision = engine.resolve_precision(cfg.precision, d.device)

    # ---- data: prepared manifests and the tokenizer (made from the synthetic world if no --data-root) ----------------
    names = [n for n in cfg.data.split(",") if n]
    root, tok_path = ensure_prepared(cfg, names + (["roco_retrieval"] if cfg.eval_pairs else []), d, say)
    tok = data.load_tokenizer(tok_path)
    special = data.special_ids(tok)
    cfg.model.vocab_size, cfg.model.cls_id, cfg.model.sep_id = tok.get_vocab_size(), special["cls"], special["sep"]
    records = data.load_pretrain_records(root, names, "train")
    dataset = data.PretrainDataset(records, data.ImageTransform(cfg.model.image_size, train=True,
                                                                random_resized_crop=cfg.random_resized_crop), cfg.seed)
    collate = data.pretrain_collate(tok, cfg.model.max_text_len)
    order = engine.BatchOrder(len(dataset), cfg.batch_size, d.world, d.rank, cfg.seed)
    vocab = tok.get_vocab()
    continuation = torch.zeros(len(vocab), dtype=torch.bool)  # [V] True for '##' pieces (whole-word masking)
    continuation[[i for t, i in vocab.items() if t.startswith("##")]] = True
    special_info = {"ids": [special["cls"], special["sep"], special["pad"]], "mask": special["mask"]}

    # ---- model and optimizer ----------------------------------------------------------------------------------------
    model = PTUnifier(cfg.model).to(d.device)
    frozen = freeze_unused(model, objectives)
    opt, groups = engine.build_optimizer(model, backbone_parameter_names(model), cfg.lr_backbone, cfg.lr_head,
                                         cfg.weight_decay, (cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.warmup_linear(cfg.steps, cfg.warmup_frac))
    start_step = 0
    if cfg.resume:
        engine.load_weights(cfg.resume, model)
        state = engine.load_trainer_state(cfg.resume)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        engine.set_rng_state(state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0])
        start_step = state["step"]
        say(f"resumed from {engine.resolve_checkpoint(cfg.resume)} at step {start_step}")
    train_model = torch.compile(model) if cfg.compile else model
    if d.world > 1:
        train_model = DDP(train_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    n_params = sum(p.numel() for p in model.parameters())
    pool = sum(p.numel() for n, p in model.named_parameters() if "prompts" in n)
    say(f"config: {config_lib.to_dict(cfg)}")
    say(f"data: {len(records):,} training images from {', '.join(names)} ({root}); tokenizer {tok_path}, "
        f"{cfg.model.vocab_size:,} tokens")
    say(f"model: {n_params:,} parameters ({pool:,} in prompt pools); frozen for these objectives: {frozen or 'none'}")
    say(f"optimizer groups: " + ", ".join(f"{k} {v:,}" for k, v in groups.items()))
    say(f"global batch {global_batch} = {cfg.batch_size} per device x {cfg.grad_accum} accumulation x {d.world} "
        f"ranks; ITC negatives per pair {cfg.batch_size * d.world - 1}; precision {precision}; device {d.device}")
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
        config_lib.save_json(cfg, os.path.join(cfg.out, "config.json"))
    log = engine.Log(os.path.join(cfg.out, "log.jsonl"), d.main)

    # ---- training loop ----------------------------------------------------------------------------------------------
    batches = engine.micro_batches(dataset, order, collate, cfg.num_workers, start_step * cfg.grad_accum)
    peak = engine.peak_flops(d.device)
    step_flops = flops_per_pair(cfg.model, objectives, cfg.model.max_text_len) * global_batch
    hist = {k: torch.zeros(cfg.model.pool_size, dtype=torch.long) for k in ("selected_visual", "selected_textual")}
    skips, window, t0 = 0, [], time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not d.main, desc="pre-train")
    model.train()
    for step in bar:
        stats_sum = {}
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(d.device, non_blocking=True) for k, v in next(batches).items()}
            gen = engine.step_generator(cfg.seed, step, micro)
            # gradients are all-reduced only on the last micro-step; the sync state must be set before the forward
            sync = micro == cfg.grad_accum - 1 or d.world == 1
            with (train_model.no_sync() if not sync else contextlib.nullcontext()):
                with engine.autocast(precision, d.device):
                    loss, stats = pretraining_loss(train_model, batch, cfg, gen, special_info, continuation, model)
                (loss / cfg.grad_accum).backward()
            for k, v in stats.items():
                if k.startswith("selected_"):
                    if v is not None:
                        hist[k] += torch.bincount(v.flatten().cpu(), minlength=cfg.model.pool_size)
                else:
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / cfg.grad_accum
        if not engine.all_finite(loss, model, d):  # skip on every rank alike, keep the last good weights
            opt.zero_grad(set_to_none=True)
            skips += 1
            log.write({"step": step + 1, "skipped": "non-finite loss or gradient", "consecutive": skips})
            if skips >= cfg.max_skips:
                raise RuntimeError(f"{skips} consecutive non-finite steps at step {step + 1}; the last good checkpoint "
                                   f"is in {cfg.out}. Lower the learning rate or check the data.")
            continue
        skips = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(stats_sum)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                   "grad_norm": float(grad_norm), "lr_backbone": sched.get_last_lr()[0],
                   "pairs_per_s": len(window) * global_batch / dt}
            rec["loss"] = sum(rec[k] for k in ("mlm_loss", "itm_loss", "itc_loss") if k in rec)
            for k in hist:
                if hist[k].sum():
                    rec[f"{k}_rows"], rec[f"{k}_entropy"] = engine.pool_usage(hist[k])
                    hist[k].zero_()
            if peak:
                rec["mfu"] = step_flops * len(window) / dt / peak
            log.write(rec)
            bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("mlm_loss", "itm_loss", "itc_loss", "itc_acc") if k in rec})
            window, t0 = [], time.perf_counter()
        if d.main and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step + 1,
                     "rng": gather_rng(d)}
            engine.save_checkpoint(cfg.out, step + 1, model, cfg, state, files=[tok_path])
        elif (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            gather_rng(d)
    bar.close()
    say(f"checkpoint: {engine.resolve_checkpoint(cfg.out)}")

    # ---- zero-shot retrieval on ROCO test pairs ---------------------------------------------------------------------
    if cfg.eval_pairs and d.main:
        test = data.read_split(os.path.join(root, "roco_retrieval"), "test")[:cfg.eval_pairs]
        sim, txt_image = retrieval.similarity(model, test, tok, cfg.model.image_size, cfg.model.max_text_len,
                                              d.device, precision)
        r = metrics.retrieval_recall(sim.numpy(), txt_image.numpy())
        say(f"zero-shot retrieval on {len(test)} synthetic ROCO test pairs (chance in brackets):")
        for direction in ("i2t", "t2i"):
            say(f"  {direction}: " + "  ".join(f"R@{k} {100 * r[f'{direction}_r{k}']:.1f} "
                                                  f"[{100 * min(1, k / len(test)):.1f}]" for k in (1, 5, 10)))
        log.write({"step": cfg.steps, "zero_shot_retrieval": r, "pairs": len(test)})
    engine.barrier(d)
    if d.world > 1:
        torch.distributed.destroy_process_group()


def gather_rng(d):
    """Every rank's RNG state, gathered on all ranks (rank 0 saves them), so a resumed rank r restores its own."""
    state = engine.rng_state()
    if d.world == 1:
        return [state]
    out = [None] * d.world
    torch.distributed.all_gather_object(out, state)
    return out


if __name__ == "__main__":
    sys.exit(main())
