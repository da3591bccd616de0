"""Pre-train PTUnifier with MLM, ITM and ITC (paper section 3.3).

    python train.py                                   # CPU preset on the synthetic world (made on demand), ~10 min
    python train.py --preset tiny --steps 20          # smoke test
    torchrun --nproc_per_node=8 train.py --preset paper --data-root /data/prepared --out runs/paper

Read top to bottom: config -> data -> model -> optimizer -> loop -> checkpoint -> zero-shot retrieval.
"""

import functools
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ptunifier_min import config as config_lib
from ptunifier_min import data, engine, metrics, pretrained, retrieval
from ptunifier_min.model import PTUnifier, backbone_parameter_names, flops_per_pair
from ptunifier_min.objectives import freeze_unused, mask_step, pretraining_loss
from ptunifier_min.world import ensure_prepared

# The tokenizers library's own thread pool cannot survive the fork into data-loader workers; batching across samples
# gives us the parallelism instead.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None):
    cfg = config_lib.parse_args(config_lib.TrainConfig, config_lib.PRESETS, argv, description=__doc__.split("\n")[0])
    objectives = cfg.objective_set()
    d = engine.setup_distributed(cfg.seed)
    say = print if d.main else (lambda *a, **k: None)
    precision = engine.resolve_precision(cfg.precision, d.device)
    if d.main:  # before any data is read: --out becomes this run's own (locked, no earlier run mixed in)
        engine.claim_run_folder(cfg.out, cfg.resume, cfg.overwrite, say)

    # ---- data: prepared manifests and the tokenizer (made from the synthetic world if no --data-root) ----------------
    names = [n for n in cfg.data.split(",") if n]
    root, tok_path = ensure_prepared(cfg, names + (["roco_retrieval"] if cfg.eval_pairs else []), d, say)
    tok = data.load_tokenizer(tok_path)
    tok_path = pretrained.single_file_tokenizer(tok, tok_path, cfg.out, d.main)
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
    imported = pretrained.prepare(cfg.init_vision, cfg.init_text, tok, cfg.model, say)  # sets ln_pre, QuickGELU, ..
    model = PTUnifier(cfg.model).to(d.device)
    pretrained.load_into(model, imported, say)
    frozen = freeze_unused(model, objectives)
    opt, groups = engine.build_optimizer(model, backbone_parameter_names(model), cfg.lr_backbone, cfg.lr_head,
                                         cfg.weight_decay, (cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.warmup_linear(cfg.steps, cfg.warmup_frac))
    start_step = 0
    if cfg.resume:  # refuses the settings a resumed run cannot change; applies and prints those it may (new LRs too)
        state = engine.resume_from(cfg.resume, cfg, model, opt, sched, say)
        engine.set_rng_state(state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0])
        start_step = state["step"]
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
    say("optimizer groups: " + ", ".join(f"{k} {v:,}" for k, v in groups.items()))
    say(f"global batch {global_batch} = {cfg.batch_size} per device x {cfg.grad_accum} accumulation x {d.world} "
        f"ranks; ITC negatives per pair {cfg.batch_size * d.world - 1}; precision {precision}; device {d.device}")
    if d.main:
        engine.write_json(os.path.join(cfg.out, "config.json"), config_lib.to_dict(cfg))
    log = engine.Log(os.path.join(cfg.out, "log.jsonl"), d.main, resume_step=start_step if cfg.resume else None)

    # ---- training loop ----------------------------------------------------------------------------------------------
    batches = engine.micro_batches(dataset, order, collate, cfg.num_workers, start_step * cfg.grad_accum)
    peak = engine.peak_flops(d.device)
    step_flops = flops_per_pair(cfg.model, objectives, cfg.model.max_text_len) * global_batch
    hist = {k: torch.zeros(cfg.model.pool_size, dtype=torch.long, device=d.device)
            for k in ("selected_visual", "selected_textual")}
    guard = engine.NonFiniteGuard(cfg.max_skips, cfg.out, log)
    window, t0 = [], time.perf_counter()

    def loss_fn(step, batch, micro):
        gen = engine.step_generator(cfg.seed, step, micro)  # ITM's draws: the same on every rank and after a resume
        loss, stats = pretraining_loss(train_model, batch, cfg, gen, model)
        for k in hist:  # pool usage: which rows the single-modality passes selected (counted on the device)
            rows = stats.pop(k, None)
            if rows is not None:
                hist[k] += torch.bincount(rows.flatten(), minlength=cfg.model.pool_size)
        return loss, stats

    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not d.main, desc="pre-train")
    model.train()
    for step in bar:
        micro_batches = engine.next_micro_batches(batches, cfg.grad_accum, d.device)
        if "mlm" in objectives:  # the whole step's masks first: every micro-step divides by the step's masked tokens
            mask_step(micro_batches, cfg, engine.step_generator(cfg.seed, step), special_info, continuation)
        loss, stats = engine.accumulate(train_model, micro_batches, functools.partial(loss_fn, step), d, precision)
        grad_norm = engine.optimizer_step(model, opt, sched, loss, cfg.grad_clip, d)
        if not guard(grad_norm, step + 1):
            continue
        window.append(stats)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                   "grad_norm": grad_norm, "lr_backbone": sched.get_last_lr()[0],
                   "pairs_per_s": len(window) * global_batch / dt}
            for k, h in hist.items():  # every rank's selections; a collective, and every rank logs on the same steps
                if d.world > 1:
                    torch.distributed.all_reduce(h)
                if h.sum():
                    rec[f"{k}_rows"], rec[f"{k}_entropy"] = engine.pool_usage(h.cpu())
                h.zero_()
            if peak:
                rec["mfu"] = step_flops * len(window) / dt / peak
            log.write(rec)
            bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("mlm_loss", "itm_loss", "itc_loss", "itc_acc") if k in rec})
            window, t0 = [], time.perf_counter()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            rng = gather_rng(d)  # a collective: every rank takes part, rank 0 writes
            if d.main:
                state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step + 1, "rng": rng}
                engine.save_checkpoint(cfg.out, step + 1, model, cfg, state, files=[tok_path])
    bar.close()
    engine.assert_in_sync(model, d)
    say(f"checkpoint: {engine.resolve_checkpoint(cfg.out)}" + (f"; all {d.world} ranks hold identical parameters"
                                                              if d.world > 1 else ""))

    # ---- zero-shot retrieval on ROCO test pairs ---------------------------------------------------------------------
    if cfg.eval_pairs and d.main:
        test = data.read_split(os.path.join(root, "roco_retrieval"), "test")[:cfg.eval_pairs]
        sim, txt_image = retrieval.similarity(model, test, tok, cfg.model.image_size, cfg.model.max_text_len,
                                              d.device, precision)
        r = metrics.retrieval_recall(sim.numpy(), txt_image.numpy())
        say(f"zero-shot retrieval on {len(test)} {'' if cfg.data_root else 'synthetic '}ROCO test pairs "
            "(chance in brackets):")
        for direction in ("i2t", "t2i"):
            say(f"  {direction}: " + "  ".join(f"R@{k} {100 * r[f'{direction}_r{k}']:.1f} "
                                                  f"[{100 * min(1, k / len(test)):.2f}]" for k in (1, 5, 10)))
        log.write({"step": cfg.steps, "zero_shot_retrieval": r, "pairs": len(test)})
    engine.barrier(d)
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return model


def gather_rng(d):
    """Every rank's RNG state, gathered on all ranks (rank 0 saves them), so a resumed rank r restores its own."""
    state = engine.rng_state()
    if d.world == 1:
        return [state]
    out = [None] * d.world
    torch.distributed.all_gather_object(out, state)
    return out


if __name__ == "__main__":
    main()
