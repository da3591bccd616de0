"""Pre-training throughput and MFU: a benchmark, not a test.

    python tools/bench.py                       # cpu + vilt384 on CPU; cpu + paper on a GPU
    python tools/bench.py --presets paper --batch-size 32 --precisions bf16

For each setup (a preset, or a shape of SHAPES: vilt384 is the comparison with HF's ViLT) and
precision it times (a) the backbone alone, one paired forward + backward of the pooled states (and,
eager, the same pass computing every position, ViLT's work, and the step's three other passes, with
the share of the step's time its passes take), and (b) the full PTUnifier step: ITC's image-only and
text-only passes, MLM's masked pass, ITM's pass, backward and the AdamW update; both eager and under
torch.compile (one compiled model per setup and precision, so each pass shape compiles once; the
compile time is the first call, printed apart and left out of the rates). Beside them, when
transformers is installed (a dev dependency), Hugging Face's ViltModel at the same shapes, randomly
initialised, forward + backward, same precision, eager. Inputs are random tensors of the setup's
shapes, so data loading is not measured. All of a setup's timings run in interleaved rounds and
report medians, so the ratios (backbone / ViLT; full step / backbone FLOP/s) compare like with like
even on a busy machine. FLOPs come from model.flops_per_pass (6*N*T + 12*L*D*T^2 per pass, less the
positions a last block does not compute) and flops_per_pair; the peak is a matrix-product
measurement on this machine (on a GPU, the card's nominal dense bf16 peak, and the measured one
beside it). MFU = achieved FLOPs / peak of the same precision. On a CPU, bf16 attention takes the
explicit softmax(QK^T)V path (model.attend), ViLT's own path.

Before them, the input pipeline (bench_loader): images/s of one loader worker on real-size synthetic
chest films, full-resolution JPEGs against prepare's cached copies (--loader-images 0 to skip it).

Then (c) decoding: beam search at the paper's lengths with and without the key/value cache, in
decoded tokens/s (bench_decoding; on a CPU at width 128 so that the uncached search stays within
seconds, --decode-dim to change it). Last, (d) retrieval ranking (bench_retrieval; --retrieval-only:
these rows alone).
"""

import argparse
import concurrent.futures
import itertools
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

# `python tools/bench.py` puts tools/ on the path, not the folder that holds the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ptunifier_min.images import ImageTransform, load_image
from ptunifier_min import data, distributed, optim, retrieval
from ptunifier_min.config import (FINETUNE_PRESETS, PRESETS, FinetuneConfig, ModelConfig,
                                  TrainConfig, build)
from ptunifier_min.datasets import prepare, synth
from ptunifier_min.generation import TextDecoder, beam_search
from ptunifier_min.flops import flops_per_pair, flops_per_pass, peak_flops, pretraining_passes
from ptunifier_min.model import PTUnifier
from ptunifier_min.objectives import draw_step, exchange_plan, itm_rows, pretraining_loss


def matmul_peak(device, dtype, n=2048, seconds=1.0):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 * _rate(lambda: a @ b, device, seconds)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(fn, device, seconds, warmup=2):
    """Calls per second of fn, timed for at least `seconds` after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds or n < 2:
        fn()
        n += 1
    _sync(device)
    return n / (time.perf_counter() - t)


def fake_batch(cfg, B, device):
    T = cfg.model.max_text_len
    ids = torch.randint(5, cfg.model.vocab_size, (B, T), device=device)
    ids[:, 0], ids[:, -1] = cfg.model.cls_id, cfg.model.sep_id
    # uint8 one-channel pixels, as the loader yields them: the model normalises them
    S = cfg.model.image_size
    return {"image": torch.randint(0, 256, (B, 1, S, S), dtype=torch.uint8, device=device),
            "input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.bool, device=device),
            "index": torch.arange(B, device=device), "image_id": torch.arange(B, device=device),
            "padded": False}  # as collate marks it on the host: the model need not ask the device


# Shapes timed besides the presets. vilt384: the comparison with Hugging Face's ViltModel
# (hidden 384, 6 layers, 6 heads, 224 px images in 16 px patches, 40 tokens, BERT's vocabulary,
# batch 16), a tower between cpu and paper.
SHAPES = {"vilt384": dict(dim=384, depth=6, heads=6, image_size=224, patch_size=16, max_text_len=40,
                          vocab_size=30522)}
BATCH = {"tiny": 64, "vilt384": 16}  # default pairs per step; 32 elsewhere


def _rates(fns, device, seconds, rounds):
    """Calls per second of each of fns {key: fn}: the median over `rounds` interleaved rounds, each
    fn timed in turn for about seconds / rounds per round, so that load from other processes falls
    on all of them alike and a ratio of two compares like with like. Two warm-up calls first;
    returns also the first call's seconds (with torch.compile: the compilation, which the rates
    therefore exclude)."""
    first, per_call, rates = {}, {}, {k: [] for k in fns}
    for k, fn in fns.items():
        for i in range(2):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            (first if i == 0 else per_call)[k] = time.perf_counter() - t
    for _ in range(rounds):
        for k, fn in fns.items():
            n = max(1, round(seconds / rounds / per_call[k]))
            t = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            rates[k].append(n / (time.perf_counter() - t))
    return {k: statistics.median(r) for k, r in rates.items()}, first


def vilt_reference(mc, batch_size, device):
    """Hugging Face's ViltModel at our tower's shapes (hidden, layers, heads, MLP, image, patch,
    text length, vocabulary), randomly initialised, and random inputs for it: the reference the
    backbone is timed against. None when transformers is not installed (a dev dependency only, never
    needed at run time)."""
    try:
        from transformers import ViltConfig, ViltModel
    except ImportError:
        return None
    vc = ViltConfig(hidden_size=mc.dim, num_hidden_layers=mc.depth, num_attention_heads=mc.heads,
                    intermediate_size=int(mc.dim * mc.mlp_ratio), image_size=mc.image_size,
                    patch_size=mc.patch_size, max_position_embeddings=mc.max_text_len,
                    vocab_size=mc.vocab_size)
    B, S, T = batch_size, mc.image_size, mc.max_text_len
    inputs = {"input_ids": torch.randint(5, mc.vocab_size, (B, T), device=device),
              "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
              "pixel_values": torch.randn(B, 3, S, S, device=device),
              "pixel_mask": torch.ones(B, S, S, dtype=torch.long, device=device)}
    return ViltModel(vc).to(device).train(), inputs


def bench(setup, precision, batch_size, device, seconds, rounds=3, modes=("eager", "compiled"),
          vilt=True):
    """Pairs/s of (a) the backbone, one paired forward + backward of the pooled states (ITM's pass:
    the last block computes [IMG_CLS] and [CLS] only), and (b) the full PTUnifier step, eager and/or
    under torch.compile; of the backbone computing every position in its last block, as ViLT does
    (eager); and of HF ViltModel's forward + backward at the same shapes and precision (eager), all
    timed in interleaved rounds (_rates) with a 2048^3 matrix product of the precision. Returns
    (cfg, {what: parameters}, {(what, mode): pairs/s}, {(what, mode): first-call seconds},
    {what: FLOPs per pair}, measured matmul FLOP/s); what = "backbone" | "backbone, every row" |
    "pass: image-only" | "pass: text-only" | "pass: pair, MLM" | "full step" | "ViLT". FLOPs are
    those each computes (model.flops_per_pass's rows)."""
    cfg = build(TrainConfig, {**(PRESETS[setup] if setup in PRESETS else SHAPES[setup]),
                              "batch_size": batch_size})
    model = PTUnifier(cfg.model).to(device)
    opt, _ = optim.build_optimizer(model, 1e-4, 1e-4, 0.01, (0.9, 0.98))
    # where train.py's batches are when their draws are made
    host = fake_batch(cfg, batch_size, torch.device("cpu"))
    batch = data.to_device(host, device)
    special = {"ids": [cfg.model.cls_id, cfg.model.sep_id, 0], "mask": 4}

    image, text = dict(image=batch["image"]), dict(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"],
                                                  padded=batch["padded"])

    def one_pass(m, read="pooled", **inputs):
        def fn():
            with distributed.autocast(precision, device):
                out = m(**inputs, read=read)
            (out.pooled if read == "pooled" else out.hidden).float().sum().backward()
        return fn

    def backbone(m, read="pooled"):
        return one_pass(m, read, **image, **text)

    def full_step(m):
        def fn():
            with distributed.autocast(precision, device):
                # as train.py: drawn on the host, then the batch and the draws move
                draws = data.to_device(draw_step([host], cfg, 0, special)[0], device)
                loss = pretraining_loss(m, data.to_device(host, device), draws, cfg)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    fns = {}
    for mode in modes:
        if mode == "compiled":
            # a fresh cache per setup and precision: stays under dynamo's recompile limit
            torch._dynamo.reset()
        # one compiled model: each pass shape compiles once
        m = distributed.compile_model(model) if mode == "compiled" else model
        fns["backbone", mode] = backbone(m)
        fns["full step", mode] = full_step(m)
    if "eager" in modes:  # rows compared with the eager backbone
        fns["backbone, every row", "eager"] = backbone(model, "all")  # the same work as ViLT's
        # the full step's other passes (its ITM pass is the backbone's): where a step's time goes
        fns["pass: image-only", "eager"] = one_pass(model, **image)
        fns["pass: text-only", "eager"] = one_pass(model, **text)
        fns["pass: pair, MLM", "eager"] = one_pass(model, "text", **image, **text)
    ref = vilt_reference(cfg.model, batch_size, device) if vilt else None
    if ref:
        vilt_model, inputs = ref

        def vilt_step():
            with distributed.autocast(precision, device):
                out = vilt_model(**inputs)
            out.pooler_output.float().sum().backward()
        fns["ViLT", "eager"] = vilt_step
    # the matmul peak too, in the same rounds: MFU then divides by a peak measured under the same
    # load
    a, b = (torch.randn(2048, 2048, device=device,
                        dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
            for _ in range(2))
    fns["peak", "matmul"] = lambda: a @ b
    rates, first = _rates(fns, device, seconds, rounds)
    peak = 2 * 2048 ** 3 * rates.pop(("peak", "matmul"))
    P = 1 + (cfg.model.image_size // cfg.model.patch_size) ** 2
    T = cfg.model.max_text_len
    flops = {"backbone": flops_per_pass(cfg.model, P + T, 2),
             "backbone, every row": flops_per_pass(cfg.model, P + T),
             "ViLT": flops_per_pass(cfg.model, P + T),
             "full step": flops_per_pair(cfg.model, {"mlm", "itm", "itc"}, T)}
    for name, (positions, rows) in pretraining_passes(cfg.model, {"mlm", "itm", "itc"}, T).items():
        flops[f"pass: {name}"] = flops_per_pass(cfg.model, positions, rows)
    params = {what: sum(p.numel() for p in model.parameters()) for what in flops if what != "ViLT"}
    if ref:
        params["ViLT"] = sum(p.numel() for p in vilt_model.parameters())
    return cfg, params, {k: batch_size * r for k, r in rates.items()}, first, flops, peak


def bench_decoding(precision, device, dim, batch_size=2, gen_len=128):
    """Decoded tokens/s of beam search with and without the key/value cache, at the paper preset's
    lengths.

    ITG: the memory is an image's whole encoder sequence (1 + (288/16)^2 image positions + [CLS],
    k_l = 32 textual prompts, [SEP]: 359 positions), beam size 3, 12 decoder layers, the 30,522-word
    vocabulary, and gen_len - 1 = 127 generated tokens (max_gen_len 128, as the paper preset used to
    fix it). Only the width is the caller's (`dim`; the paper's 768 makes the uncached search take
    minutes on a CPU). Random weights and memory: [SEP] is set to [PAD], which decoding never emits,
    so every run decodes the full length. Tokens/s counts generated tokens per example, not per
    beam. Also returned: whether both searches chose the same tokens.
    """
    cfg = build(FinetuneConfig,
                {**FINETUNE_PRESETS["paper"], "dim": dim, "heads": max(1, dim // 64)})
    m = cfg.model
    torch.manual_seed(0)
    decoder = TextDecoder(PTUnifier(m), max_len=gen_len).to(device)
    decoder.backbone.to(device)
    with torch.no_grad():
        # Freshly initialised, the next-token distribution is nearly uniform over 30,522 words, and
        # beams then tie within fp32 rounding (scores ~ -100 whose last bits depend on the order of
        # the sums): sharpen it, as training does, so that the comparison of the two searches below
        # is about the cache, not about ties.
        decoder.backbone.word_embeddings.weight.mul_(8.0)
    S = 1 + (m.image_size // m.patch_size) ** 2 + m.k_l + 2
    memory = torch.randn(batch_size, S, dim, device=device)
    rows = []
    for use_cache in (True, False):
        _sync(device)
        t = time.perf_counter()
        with distributed.autocast(precision, device):
            out = beam_search(decoder, memory, None, m.cls_id, 0, 0, cfg.beam_size, gen_len - 1,
                              use_cache=use_cache)
        _sync(device)
        rows.append((use_cache, batch_size * (gen_len - 1) / (time.perf_counter() - t), out))
    return cfg, S, rows, rows[0][2] == rows[1][2]


def image_bytes(world=8, batch_size=32, image_size=PRESETS["paper"]["image_size"], draws=20):
    """Image bytes per rank and micro-step (computed from the plans, not measured on a network),
    of float32 RGB [B, 3, S, S] (what a generic image pipeline moves) against the uint8 one-channel
    pixels [B, 1, S, S] moved here. host_to_device: this rank's B images. itm_received: what ITM
    brings from other ranks; float RGB, an all-gather of every image ((world - 1) x B); here the
    rows itm_plan's exchange sends (objectives.exchange_plan), the mean over `draws` random global
    batches of distinct images and texts, and, with hard negatives (chosen on the device), an
    all-gather of every uint8 image. Default: the paper preset on 8 GPUs."""
    before, after = 3 * image_size ** 2 * 4, image_size ** 2  # bytes per image
    G, g = world * batch_size, torch.Generator().manual_seed(0)
    valid = ~torch.eye(G, dtype=torch.bool)
    received = []
    for _ in range(draws):
        rows = itm_rows(valid, g)[1]
        received += [sum(exchange_plan(rows, batch_size, r, world)[1][1]) for r in range(world)]
    gathered = (world - 1) * batch_size
    return {"host_to_device": (batch_size * before, batch_size * after),
            "itm_received": (gathered * before, statistics.mean(received) * after),
            "itm_received_hard_negatives": (gathered * before, gathered * after)}


def bench_loader(images=3, image_size=PRESETS["paper"]["image_size"], seconds=3.0):
    """Images/s of one data-loader worker (one process, one thread), full-resolution files vs
    prepare's cached copies.

    What a worker does per sample: load_image + ImageTransform(image_size).pixels, here on
    `images` real-size synthetic chest films (synth.real_size_films, 2,352-3,024 px a side, JPEG)
    and on their copies at prepare's default short side (uncompressed PGM), written into a temporary
    folder. Returns ({"full": images/s, "cached": images/s, "short_side": of the copies}, the films'
    sizes)."""
    transform = ImageTransform(image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        with tempfile.TemporaryDirectory() as tmp:
            full = synth.real_size_films(tmp, images)
            cached = [os.path.join(tmp, f"cached{i}.pgm") for i in range(images)]
            for path, dest in zip(full, cached):
                prepare.write_cached(load_image(path), dest, prepare.CACHE_SHORT_SIDE)
            rates = {}
            for name, paths in (("full", full), ("cached", cached)):
                files = itertools.cycle(paths)
                rates[name] = _rate(lambda: transform.pixels(load_image(next(files))),
                                    torch.device("cpu"), seconds)
            sizes = sorted({load_image(p).size for p in full})
            rates["short_side"] = prepare.CACHE_SHORT_SIDE
    finally:
        torch.set_num_threads(threads)
    return rates, sizes


def _resident(field):  # bytes of this process's resident set ("VmRSS") or of its peak ("VmHWM")
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def retrieval_row(n, dim, device):
    """(seconds, peak extra bytes, i2t R@1) of retrieval.embedding_recall (both ways, after a
    warm-up) on n images x n texts, random unit embeddings of size dim (text i a noisy copy of
    image i). Extra = beyond the embeddings: torch's peak CUDA allocation, or the peak resident
    set (VmHWM, reset by /proc/self/clear_refs) less the resident set before: every allocation."""
    g = torch.Generator().manual_seed(0)
    zi = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    # a text's cosine with its image ~0.45, with the others ~N(0, 1 / dim)
    zt = F.normalize(zi + 2 * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=-1)
    zi, zt, txt_image = zi.to(device), zt.to(device), torch.arange(n)
    retrieval.embedding_recall(zi[:64], zt[:64], txt_image[:64])  # loads the kernels' code pages
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the kernel resets this process's peak resident set to the current one
    before = torch.cuda.memory_allocated(device) if cuda else _resident("VmRSS")
    t = time.perf_counter()
    r = retrieval.embedding_recall(zi, zt, txt_image)
    seconds = time.perf_counter() - t  # the recalls are host numbers: the device is done
    peak = torch.cuda.max_memory_allocated(device) if cuda else _resident("VmHWM")
    return seconds, peak - before, r["i2t_r1"]


def bench_retrieval(sizes, dims, device):
    """One row of retrieval_row per size and dim (comma-separated), each in a fresh process:
    memory an earlier row freed (and the allocator kept) would otherwise hide a later row's."""
    print(f"\nretrieval ranking: embedding_recall both ways on n images x n texts, blocks of "
          f"{retrieval.BLOCK_ENTRIES:,} similarities, a fresh process per row; extra memory: peak "
          "resident set growth (on a GPU: peak CUDA allocation)\n| candidates | dim | "
          "embeddings MB | seconds | peak extra MB | whole fp32 matrix MB | i2t R@1 |\n"
          "|---|---|---|---|---|---|---|")
    for n, dim in itertools.product(*([int(x) for x in a.split(",") if x] for a in (sizes, dims))):
        with concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds, extra, r1 = pool.submit(retrieval_row, n, dim, device).result()
        print(f"| {n:,} | {dim} | {2 * n * dim * 4 / 1e6:.0f} | {seconds:.2f} | "
              f"{extra / 1e6:.0f} | {n * n * 4 / 1e6:,.0f} | {r1:.3f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="", help="comma-separated presets or SHAPES (default: "
                   "cpu,vilt384 on CPU; cpu,paper on GPU)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated precisions to time")
    p.add_argument("--batch-size", type=int, default=0, help="pairs per step (default: 64 for "
                   "tiny, 16 for vilt384, else 32)")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="timing window per measurement (split over --rounds)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds; the median is reported")
    p.add_argument("--modes", default="eager,compiled",
                   help="eager and/or compiled (torch.compile of the model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--decode-dim", type=int, default=-1,
                   help="width of the beam-search benchmark (paper lengths, first of "
                   "--precisions); default 768 (the paper's) on a GPU, 128 on a CPU, where the "
                   "uncached search is slow; 0 = skip it")
    p.add_argument("--decode-len", type=int, default=128,
                   help="max_gen_len of the beam-search benchmark (the paper preset's 128; shorter "
                   "only to check that the section runs)")
    p.add_argument("--loader-images", type=int, default=3,
                   help="real-size films for the loader benchmark (0: skip)")
    p.add_argument("--retrieval-sizes", default="2000,20000,100000",
                   help="images (= texts) of each retrieval ranking row; empty = skip them")
    p.add_argument("--retrieval-dims", default=f"{ModelConfig().itc_dim},256",
                   help="embedding sizes of the retrieval rows (the cpu preset's and the paper's)")
    p.add_argument("--retrieval-only", action="store_true", help="the retrieval rows only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.retrieval_only:
        bench_retrieval(args.retrieval_sizes, args.retrieval_dims, device)
        return
    if device.type == "cpu":
        distributed.keep_freed_memory()  # as train.py's CPU runs do (distributed.setup_distributed)
    setups = args.presets or ("cpu,paper" if device.type == "cuda" else "cpu,vilt384")
    modes = args.modes.split(",")
    if args.loader_images:
        (rates, sizes) = bench_loader(args.loader_images, seconds=args.seconds)
        print(f"\nloader, one worker (load_image + ImageTransform("
              f"{PRESETS['paper']['image_size']}).pixels), {args.loader_images} synthetic chest "
              f"films of {', '.join(f'{w}x{h}' for w, h in sizes)} px:\n"
              "| images | images/s |\n|---|---|\n"
              f"| full resolution (JPEG) | {rates['full']:.1f} |\n"
              f"| cached ({rates['short_side']} px PGM, prepare) | {rates['cached']:.1f} |\n"
              f"cached / full resolution: {rates['cached'] / rates['full']:.1f}x\n")
    nominal = {}
    for prec in args.precisions.split(","):
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        measured = matmul_peak(device, dtype, seconds=min(args.seconds, 2.0))
        nominal[prec] = peak_flops(device) if prec == "bf16" else None
        print(f"peak {prec}: measured {measured / 1e12:.3f} TFLOP/s (2048^3 matmul)"
              + (f", nominal {nominal[prec] / 1e12:.0f} TFLOP/s (used for MFU)" if nominal[prec]
                 else "; MFU divides by the same product timed in each setup's rounds"))
    print("\n| setup | params | precision | what | mode | pairs/s | TFLOP/s | MFU | ratio |\n"
          "|---|---|---|---|---|---|---|---|---|")
    targets, order = [], [("backbone", "eager"), ("backbone, every row", "eager"),
                          ("ViLT", "eager"), ("pass: image-only", "eager"),
                          ("pass: text-only", "eager"), ("pass: pair, MLM", "eager"),
                          ("full step", "eager"), ("backbone", "compiled"),
                          ("full step", "compiled")]
    for setup in setups.split(","):
        B = args.batch_size or BATCH.get(setup, 32)
        for prec in args.precisions.split(","):
            cfg, params, rates, first, flops, peak = bench(setup, prec, B, device, args.seconds,
                                                           args.rounds, modes)
            # a GPU's nominal bf16 peak; else the matmul timed with these rows
            peak = nominal.get(prec) or peak
            for what, mode in [k for k in order if k in rates]:
                pairs = rates[what, mode]
                if what.startswith("backbone") and ("ViLT", "eager") in rates:
                    ratio = f"{pairs / rates['ViLT', 'eager']:.2f}x ViLT"
                # FLOP/s against the backbone's, same mode
                elif what == "full step" or what.startswith("pass"):
                    ratio = (
                        f"{pairs * flops[what] / (rates['backbone', mode] * flops['backbone']):.2f}"
                        "x backbone")
                else:
                    ratio = "reference" if what == "ViLT" else ""
                print(f"| {setup} (B={B}) | {params[what] / 1e6:.1f}M | {prec} | {what} | {mode} | "
                      f"{pairs:.1f} | {pairs * flops[what] / 1e12:.3f} | "
                      f"{100 * pairs * flops[what] / peak:.1f}% | {ratio} |",
                      flush=True)
                if ratio.endswith(("ViLT", "backbone")) and not what.startswith("pass"):
                    targets.append(f"{setup} {prec} {mode} {what}: {ratio}"
                                   + (f", {100 * pairs * flops[what] / peak:.0f}% of the matmul "
                                      "peak" if what == "backbone" else ""))
            # its four passes' share of the step's time (the ITM pass is the backbone's); the rest
            # is the losses, the host's draws and AdamW
            if ("full step", "eager") in rates:
                passes = ([r for (what, _), r in rates.items() if what.startswith("pass")]
                          + [rates["backbone", "eager"]])
                share = sum(1 / r for r in passes) * rates["full step", "eager"]
                print(f"| {setup} (B={B}) | | {prec} | share of the full step's time in its four "
                      f"passes: {100 * share:.0f}% | eager | | | | |", flush=True)
            if "compiled" in modes:
                print(f"| {setup} (B={B}) | | {prec} | compile time: first call, not in the rates "
                      "| compiled | "
                      + ", ".join(f"{what} {first[what, 'compiled']:.0f} s"
                                  for what in ("backbone", "full step"))
                      + " | | | |", flush=True)
    print("\nratios (same run, interleaved rounds; targets, reported, not asserted: backbone >= "
          "1.0x ViLT in fp32 and, on a CPU with native bf16, in bf16; backbone MFU >= 90% of the "
          "fp32 matmul peak and >= 80% of the bf16 one; full step >= 0.95x the backbone's "
          "FLOP/s):\n  "
          + "\n  ".join(targets))
    print("\nimages per rank and micro-step, paper preset on 8 GPUs (8 x 32 at 288 px), float32 "
          "RGB -> uint8 gray: "
          + "; ".join(f"{k} {a / 1e6:.1f} -> {b / 1e6:.1f} MB"
                      for k, (a, b) in image_bytes().items()))
    dim = args.decode_dim if args.decode_dim >= 0 else (768 if device.type == "cuda" else 128)
    if dim:
        # fp32 by default: there, the two searches' tokens can be compared
        prec = args.precisions.split(",")[0]
        cfg, S, rows, same = bench_decoding(prec, device, dim, gen_len=args.decode_len)
        print(f"\nbeam search (ITG at the paper's lengths: memory {S}, beam {cfg.beam_size}, "
              f"{args.decode_len - 1} tokens, {cfg.model.depth} layers, vocabulary "
              f"{cfg.model.vocab_size}; width {dim}, batch 2, {prec})\n"
              "| KV cache | tokens/s |\n|---|---|")
        for use_cache, rate, _ in rows:
            print(f"| {'yes' if use_cache else 'no'} | {rate:.1f} |")
        print(f"cached / uncached: {rows[0][1] / rows[1][1]:.1f}x; same tokens: "
              + ("yes" if same
                 else "no (in bf16, near-equal beams can swap: the test compares them in fp32)"))
    if args.retrieval_sizes:
        bench_retrieval(args.retrieval_sizes, args.retrieval_dims, device)


if __name__ == "__main__":
    main()
