"""Pre-training throughput and MFU: a benchmark, not a test.

    python -m ptunifier_min.bench                       # cpu + tiny presets on CPU; cpu + paper on a GPU
    python -m ptunifier_min.bench --presets paper --batch-size 32 --precisions bf16

For each preset and precision it times (a) the backbone alone, one paired forward + backward, and (b) the full PTUnifier
step: ITC's image-only and text-only passes, MLM's masked pass, ITM's pass, backward and the AdamW update. Inputs are
random tensors of the preset's shapes, so data loading is not measured. FLOPs come from model.flops_per_pair (6*N*T +
12*L*D*T^2 per pass); the peak is a matrix-product measurement on this machine (on a GPU, the card's nominal dense bf16
peak, and the measured one beside it). MFU = achieved FLOPs / peak of the same precision.

Then (c) decoding: beam search at the paper's lengths with and without the key/value cache, in decoded tokens/s
(bench_decoding; on a CPU at width 128 so that the uncached search stays within seconds, --decode-dim to change it).
"""

import argparse
import time

import torch

from . import distributed, optim
from .config import FINETUNE_PRESETS, PRESETS, FinetuneConfig, TrainConfig, build
from .generation import TextDecoder, beam_search
from .model import PTUnifier, flops_per_pair, flops_per_pass
from .objectives import mask_step, pretraining_loss


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
    return {"image": torch.randn(B, 3, cfg.model.image_size, cfg.model.image_size, device=device),
            "input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.bool, device=device),
            "index": torch.arange(B, device=device), "image_id": torch.arange(B, device=device)}


def bench(preset, precision, batch_size, device, seconds):
    cfg = build(TrainConfig, {**PRESETS[preset], "batch_size": batch_size})
    model = PTUnifier(cfg.model).to(device)
    opt, _ = optim.build_optimizer(model, 1e-4, 1e-4, 0.01, (0.9, 0.98))
    batch = fake_batch(cfg, batch_size, device)
    special = {"ids": [cfg.model.cls_id, cfg.model.sep_id, 0], "mask": 4}

    def backbone():
        with distributed.autocast(precision, device):
            out = model(image=batch["image"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.pooled.float().sum().backward()

    def full_step():
        with distributed.autocast(precision, device):
            mask_step([batch], cfg, torch.Generator().manual_seed(0), special)
            loss = pretraining_loss(model, batch, cfg, torch.Generator().manual_seed(1))[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    P = 1 + (cfg.model.image_size // cfg.model.patch_size) ** 2
    T = cfg.model.max_text_len
    rows = []
    for name, fn, flops in [("backbone fwd+bwd", backbone, flops_per_pass(cfg.model, P + T)),
                            ("full PTUnifier step", full_step, flops_per_pair(cfg.model, {"mlm", "itm", "itc"}, T))]:
        rate = _rate(fn, device, seconds)
        rows.append((name, batch_size * rate, flops * batch_size * rate))
    params = sum(p.numel() for p in model.parameters())
    return params, rows


def bench_decoding(precision, device, dim, batch_size=2, gen_len=128):
    """Decoded tokens/s of beam search with and without the key/value cache, at the paper preset's lengths.

    ITG: the memory is an image's whole encoder sequence (1 + (288/16)^2 image positions + [CLS], k_l = 32 textual
    prompts, [SEP]: 359 positions), beam size 3, 12 decoder layers, the 30,522-word vocabulary, and gen_len - 1 = 127
    generated tokens (max_gen_len 128, as the paper preset used to fix it). Only the width is the caller's (`dim`;
    the paper's 768 makes the uncached search take minutes on a CPU). Random weights and memory: [SEP] is set to
    [PAD], which decoding never emits, so every run decodes the full length. Tokens/s counts generated tokens per
    example, not per beam. Also returned: whether both searches chose the same tokens.
    """
    cfg = build(FinetuneConfig, {**FINETUNE_PRESETS["paper"], "dim": dim, "heads": max(1, dim // 64)})
    m = cfg.model
    torch.manual_seed(0)
    decoder = TextDecoder(PTUnifier(m), max_len=gen_len).to(device)
    decoder.backbone.to(device)
    with torch.no_grad():
        # Freshly initialised, the next-token distribution is nearly uniform over 30,522 words, and beams then tie
        # within fp32 rounding (scores ~ -100 whose last bits depend on the order of the sums): sharpen it, as training
        # does, so that the comparison of the two searches below is about the cache, not about ties.
        decoder.backbone.word_embeddings.weight.mul_(8.0)
    S = 1 + (m.image_size // m.patch_size) ** 2 + m.k_l + 2
    memory = torch.randn(batch_size, S, dim, device=device)
    rows = []
    for use_cache in (True, False):
        _sync(device)
        t = time.perf_counter()
        with distributed.autocast(precision, device):
            out = beam_search(decoder, memory, None, m.cls_id, 0, 0, cfg.beam_size, gen_len - 1, use_cache=use_cache)
        _sync(device)
        rows.append((use_cache, batch_size * (gen_len - 1) / (time.perf_counter() - t), out))
    return cfg, S, rows, rows[0][2] == rows[1][2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="", help="comma-separated presets (default: cpu,tiny on CPU; cpu,paper on GPU)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated precisions to time")
    p.add_argument("--batch-size", type=int, default=0, help="pairs per step (default: 32 for cpu/paper, 64 for tiny)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--decode-dim", type=int, default=-1, help="width of the beam-search benchmark (paper lengths, "
                   "first of --precisions); default 768 (the paper's) on a GPU, 128 on a CPU, where the uncached "
                   "search is slow; 0 = skip it")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    presets = args.presets or ("cpu,paper" if device.type == "cuda" else "cpu,tiny")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peaks = {}
    for prec in args.precisions.split(","):
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        peaks[prec] = matmul_peak(device, dtype, seconds=min(args.seconds, 2.0))
        nominal = distributed.peak_flops(device) if prec == "bf16" else None
        print(f"peak {prec}: measured {peaks[prec] / 1e12:.3f} TFLOP/s (2048^3 matmul)"
              + (f", nominal {nominal / 1e12:.0f} TFLOP/s (used for MFU)" if nominal else ""))
        if nominal:
            peaks[prec] = nominal
    print("\n| preset | params | precision | what | pairs/s | TFLOP/s | MFU |\n|---|---|---|---|---|---|---|")
    for preset in presets.split(","):
        B = args.batch_size or (64 if preset == "tiny" else 32)
        for prec in args.precisions.split(","):
            params, rows = bench(preset, prec, B, device, args.seconds)
            for name, pairs, flops in rows:
                print(f"| {preset} (B={B}) | {params / 1e6:.1f}M | {prec} | {name} | {pairs:.1f} | "
                      f"{flops / 1e12:.3f} | {100 * flops / peaks[prec]:.1f}% |", flush=True)
    dim = args.decode_dim if args.decode_dim >= 0 else (768 if device.type == "cuda" else 128)
    if dim:
        prec = args.precisions.split(",")[0]  # fp32 by default: there, the two searches' tokens can be compared
        cfg, S, rows, same = bench_decoding(prec, device, dim)
        print(f"\nbeam search (ITG at the paper's lengths: memory {S}, beam {cfg.beam_size}, 127 tokens, "
              f"{cfg.model.depth} layers, vocabulary {cfg.model.vocab_size}; width {dim}, batch 2, {prec})\n"
              "| KV cache | tokens/s |\n|---|---|")
        for use_cache, rate, _ in rows:
            print(f"| {'yes' if use_cache else 'no'} | {rate:.1f} |")
        print(f"cached / uncached: {rows[0][1] / rows[1][1]:.1f}x; same tokens: "
              + ("yes" if same else "no (in bf16, near-equal beams can swap: the test compares them in fp32)"))


if __name__ == "__main__":
    main()
