"""Pre-train PTUnifier with MLM, ITM and ITC (paper section 3.3).

    python train.py                             # CPU preset on the synthetic world (made on demand)
    python train.py --preset tiny --steps 20    # smoke test
    torchrun --nproc_per_node=8 train.py --preset paper --data-root /data/prepared --out runs/paper

Read top to bottom: config, data, model, optimizer, loop, checkpoint, zero-shot retrieval.
"""

import contextlib
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ptunifier_min import (checkpoint, data, distributed, manifests, optim, poolwatch, pretrained,
                           retrieval, runs, stopping)
from ptunifier_min import config as config_lib
from ptunifier_min.datasets.source import ensure_prepared
from ptunifier_min.files import write_json
from ptunifier_min.flops import flops_per_pair, peak_flops
from ptunifier_min.images import ImageTransform
from ptunifier_min.model import PTUnifier
from ptunifier_min.objectives import draw_step, pretraining_loss
from ptunifier_min.tokenizer import continuation_table, load_tokenizer, special_ids

# The tokenizers library's own thread pool cannot survive the fork into data-loader workers;
# batching across samples gives us the parallelism instead.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None):
    cfg = config_lib.parse_args(config_lib.TrainConfig, config_lib.PRESETS, argv,
                                description=__doc__.split("\n")[0])
    objectives = cfg.objective_set()
    runs.require_tracker(cfg.report_to)  # --report-to's package, before anything waits
    proc = distributed.setup_distributed(cfg.seed, cfg.dist_timeout_min)
    print0 = print if proc.main else (lambda *a, **k: None)
    precision = distributed.resolve_precision(cfg.precision, proc.device)
    if cfg.resume:
        runs.refuse_the_other_scripts_run(cfg.resume, "train.py")
    # before any data is read: --out becomes this run's own (locked, no earlier run mixed in)
    if proc.main:
        runs.claim_run_folder(cfg.out, cfg.resume, cfg.overwrite, print0)

    # ---- data: prepared manifests and the tokenizer ----------------------------------------------
    # (made from the synthetic world if no --data-root)
    names = cfg.data_sets()
    # a resumed run keeps the tokenizer its checkpoint carries, and never trains one into the root
    trained_with = checkpoint.resumed_tokenizer(cfg.resume) if cfg.resume else None
    root, tok_path = ensure_prepared(cfg, names + (["roco_retrieval"] if cfg.eval_pairs else []),
                                     proc, print0, trained_with)
    tok = load_tokenizer(tok_path)
    special = special_ids(tok)
    cfg.model.vocab_size, cfg.model.cls_id, cfg.model.sep_id = (
        tok.get_vocab_size(), special["cls"], special["sep"])
    records = data.load_pretrain_records(root, names, "train")
    # what this run reads, by content: compared on resume, and by eval.py (zero-shot retrieval)
    read = {n: {"train": [r for r in records if r["dataset"] == n]} for n in names}
    if cfg.eval_pairs:  # read now, so that a broken file stops the run before training
        read["roco_retrieval"] = {"test": data.read_split(os.path.join(root, "roco_retrieval"),
                                                          "test", required=data.PRETRAIN_FIELDS)}
    record = manifests.data_record(root, read, tok_path)
    tok_path = pretrained.single_file_tokenizer(tok, tok_path, cfg.out, proc.main)
    # uint8 one-channel pixels (ImageTransform.pixels): the model normalises them on the device
    transform = ImageTransform(cfg.model.image_size, train=True,
                                    random_resized_crop=cfg.random_resized_crop)
    dataset = data.PretrainDataset(records, transform.pixels, cfg.seed)
    collate = data.pretrain_collate(tok, cfg.model.max_text_len)
    order = data.BatchOrder(len(dataset), cfg.batch_size, proc.world, proc.rank, cfg.seed)
    # [V] True for the pieces that continue a word ('##ing' in WordPiece, 'ing' in byte-level BPE)
    continuation = continuation_table(tok) if cfg.whole_word else None
    special_info = {"ids": [special["cls"], special["sep"], special["pad"]],
                    "mask": special["mask"]}

    # ---- model and optimizer ---------------------------------------------------------------------
    # sets ln_pre, QuickGELU, ..
    imported = pretrained.prepare(cfg.init_vision, cfg.init_text, tok, cfg.model, print0,
                                  cfg.given)
    model = PTUnifier(cfg.model).to(proc.device)
    pretrained.load_into(model, imported, print0)
    # Freeze what the chosen objectives never reach (e.g. the prompt pools without ITC), measured by
    # one backward pass of a probe batch: DDP then needs no unused-parameter search.
    probe = collate([dataset[i] for i in range(cfg.batch_size)])
    probe_draws = data.to_device(draw_step([probe], cfg, 0, special_info, continuation, proc)[0],
                                 proc.device)  # step 0's
    probe = data.to_device(probe, proc.device)
    with distributed.autocast(precision, proc.device):
        probe_loss = pretraining_loss(model, probe, probe_draws, cfg)[0]
    frozen = optim.freeze_unreached(model, probe_loss)
    opt, groups = optim.build_optimizer(model, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay,
                                        (cfg.beta1, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optim.warmup_linear(cfg.steps, cfg.warmup_frac))
    start_step = 0
    # refuses the settings a resumed run cannot change;
    # applies and prints those it may (new LRs too)
    if cfg.resume:
        state = checkpoint.resume_from(cfg.resume, cfg, model, opt, sched, print0, record=record)
        checkpoint.set_rng_state(state["rng"][proc.rank] if proc.rank < len(state["rng"])
                                 else state["rng"][0])
        start_step = state["step"]
    train_model = distributed.compile_model(model, cfg.compile, proc.device)
    if proc.world > 1:
        # the model's buffers are constants (the pixel table, the [CLS] [SEP] ids): no broadcast
        # before every forward
        train_model = DDP(train_model,
                          device_ids=[proc.local_rank] if proc.device.type == "cuda" else None,
                          forward_sync_buffers=False)

    global_batch = cfg.batch_size * cfg.grad_accum * proc.world
    n_params = sum(p.numel() for p in model.parameters())
    pool = sum(p.numel() for n, p in model.named_parameters() if "prompts" in n)
    print0(f"config: {config_lib.to_dict(cfg)}")
    print0(f"data: {len(records):,} training images from {', '.join(names)} ({root}); "
        f"tokenizer {tok_path}, {cfg.model.vocab_size:,} tokens")
    print0(f"model: {n_params:,} parameters ({pool:,} in prompt pools); "
        f"frozen for these objectives: {frozen or 'none'}")
    print0("optimizer groups: " + ", ".join(f"{k} {v:,}" for k, v in groups.items()))
    print0(f"global batch {global_batch} = {cfg.batch_size} per device x {cfg.grad_accum} "
        f"accumulation x {proc.world} ranks; ITC negatives per pair "
        f"{cfg.batch_size * proc.world - 1}; precision {precision}; device {proc.device}")
    if proc.main:
        write_json(os.path.join(cfg.out, "config.json"), config_lib.to_dict(cfg))
        write_json(os.path.join(cfg.out, "data.json"), record)
    log = runs.Log(os.path.join(cfg.out, "log.jsonl"), proc.main,
                   resume_step=start_step if cfg.resume else None, report_to=cfg.report_to,
                   config=config_lib.to_dict(cfg))

    # ---- training loop ---------------------------------------------------------------------------
    batches = data.micro_batches(dataset, order, collate, cfg.num_workers,
                                 start_step * cfg.grad_accum)
    peak = peak_flops(proc.device)
    step_flops = flops_per_pair(cfg.model, objectives, cfg.model.max_text_len) * global_batch
    # pool usage, gradient, top-k changes
    watch = poolwatch.PoolWatch(model, probe, precision, proc.device)
    guard = optim.NonFiniteGuard(cfg.max_skips, cfg.out, log)
    window, t0 = [], time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not proc.main, desc="pre-train")
    model.train()
    # from here a stop signal (SIGTERM, SIGINT, SIGUSR1) lets the step in flight finish and be saved
    stopping.finish_step_on_stop(True)
    for step in bar:
        # All micro-batches of the step first: MLM's masks are drawn for the whole step, and every
        # micro-step divides by the step's masked-token count, so --grad-accum 2 at batch B is batch
        # 2B (objectives.mask_step). They and ITM's negatives are drawn on the host, before the
        # batches move: there the host knows the masked positions and which images to exchange
        # without asking the device. From here to the non-finite check the host never waits for the
        # device (tests/test_sync.py).
        micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
        draws = draw_step(micro_batches, cfg, step, special_info, continuation, proc)
        micro_batches = [data.to_device(batch, proc.device) for batch in micro_batches]
        draws = [data.to_device(d, proc.device) for d in draws]
        step_stats = []
        for micro, (batch, draw) in enumerate(zip(micro_batches, draws)):
            # DDP all-reduces the gradients on the last micro-step only; no_sync must wrap the
            # forward pass too
            last = micro == cfg.grad_accum - 1
            with train_model.no_sync() if proc.world > 1 and not last else contextlib.nullcontext():
                with distributed.autocast(precision, proc.device):
                    loss, scalars, selected = pretraining_loss(train_model, batch, draw, cfg)
                # the gradients add up to the mean over the micro-steps
                (loss / cfg.grad_accum).backward()
            # tensors: read on logging steps only, so the host does not wait here
            step_stats.append(scalars)
            # which pool rows the single-modality passes chose, counted on the device
            watch.count(selected)
        # non-finite check (the host waits for the device here, once per step), clip, AdamW,
        # logit-scale clamp, schedule
        grad_norm = optim.optimizer_step(model, opt, sched, loss, cfg.grad_clip, proc)
        if guard(grad_norm, step + 1):  # a skipped step is logged by the guard, saved as any
            window.append(step_stats)
        # a stop signal on any rank: every rank saves this step and stops (agreed on the host)
        stop = stopping.requested(proc)
        if window and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or stop):
            # the host has waited for the device's work up to the last check
            dt = time.perf_counter() - t0
            steps = [{k: sum(float(s[k]) for s in micros) / len(micros) for k in micros[0]}
                     for micros in window]
            rec = {"step": step + 1, **{k: sum(s[k] for s in steps) / len(steps) for k in steps[0]},
                   "grad_norm": None if grad_norm is None else float(grad_norm),
                   "lr_backbone": sched.get_last_lr()[0],
                   "pairs_per_s": len(window) * global_batch / dt}
            # a collective: every rank logs on the same steps
            rec.update(watch.read(model, proc.world))
            if peak:
                rec["mfu"] = step_flops * len(window) / dt / peak
            log.write(rec)
            bar.set_postfix({k: f"{rec[k]:.3f}"
                             for k in ("mlm_loss", "itm_loss", "itc_loss", "itc_acc") if k in rec})
            window, t0 = [], time.perf_counter()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or stop:
            rng = checkpoint.gather_rng(proc)  # a collective: every rank takes part, rank 0 writes
            if proc.main:
                state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "step": step + 1, "rng": rng}
                checkpoint.save_checkpoint(cfg.out, step + 1, model, cfg, state,
                                           files=[tok_path, os.path.join(cfg.out, "data.json")])
        if stop:
            distributed.barrier(proc)  # no rank leaves before rank 0 has written the checkpoint
            stopping.stop_run(stop)
    bar.close()
    stopping.finish_step_on_stop(False)  # the evaluation below stops at once, as preparing did
    distributed.assert_in_sync(model, proc)
    print0(f"checkpoint: {checkpoint.resolve_checkpoint(cfg.out)}"
           + (f"; all {proc.world} ranks hold identical parameters" if proc.world > 1 else ""))

    # ---- zero-shot retrieval on ROCO test pairs: every rank embeds its share ---------------------
    if cfg.eval_pairs:
        test = read["roco_retrieval"]["test"][:cfg.eval_pairs]
        # finetune.py's and eval.py's retrieval evaluation: Recall@1/5/10 both ways, r_mean, the
        # seconds it took
        r = retrieval.retrieval_metrics(model, test, tok, cfg.model.image_size,
                                        cfg.model.max_text_len, proc.device, precision,
                                        proc=proc)
        print0(f"zero-shot retrieval on {len(test)} {'' if cfg.data_root else 'synthetic '}"
            "ROCO test pairs (chance in brackets):")
        for direction in ("i2t", "t2i"):
            print0(f"  {direction}: " + "  ".join(f"R@{k} {100 * r[f'{direction}_r{k}']:.1f} "
                                                  f"[{100 * min(1, k / len(test)):.2f}]"
                                                  for k in (1, 5, 10)))
        log.write({"step": cfg.steps, "zero_shot_retrieval": r})  # r["pairs"]: how many
    del train_model  # before the process group ends (distributed.leave)
    distributed.leave(proc)
    return model


if __name__ == "__main__":
    runs.run_script(main)
