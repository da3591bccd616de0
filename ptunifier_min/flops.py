"""Training FLOPs of the tower's passes, and the accelerator peaks they are measured against (MFU).

    flops_per_pair(cfg.model, {"mlm", "itm", "itc"}, text_len)  # one pair of a pre-training step
    peak_flops(torch.device("cuda"))                             # nominal bf16 peak, or None

FLOPs are counted as computed: a pass whose last block computes only the positions it reads
(PTUnifier.forward's `read`) counts that saving, so no skipped work counts towards MFU.
"""

import torch


# Nominal dense bf16 peaks (no sparsity) of common training GPUs, for MFU; None = unknown
# (tools/bench.py measures a CPU's).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
             "4090": 165e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def flops_per_pass(cfg, T, last=None):
    """Training FLOPs (forward + backward) of one pass of the tower over a sequence of T positions:
    6*N*T for the weight matrices (N = 12*L*D^2 block weights, 2 FLOPs per multiply-add, x3 for
    forward + backward) plus 12*L*D*T^2 for attention scores and values (Kaplan et al. 2020;
    nanoGPT's estimate). last: the positions the last block computes (PTUnifier.forward's
    `read`; None = all T): the other T - last positions only get its keys and values."""
    L, D, last = cfg.depth, cfg.dim, T if last is None else last
    per_token = 4 * D * D + 2 * int(D * cfg.mlp_ratio) * D  # one block's weights
    kv = 2 * D * D  # its key and value projections, computed at every position
    return (6 * ((L - 1) * per_token * T + kv * T + (per_token - kv) * last)
            + 12 * D * T * ((L - 1) * T + last))


def pretraining_passes(cfg, objectives, text_len):
    """{pass: (positions, positions its last block computes)} of the passes a pre-training step runs
    per pair."""
    P = 1 + (cfg.image_size // cfg.patch_size) ** 2
    k_v, k_l = (0, 0) if cfg.prompt_mode == "none" else (cfg.k_v, cfg.k_l)
    passes = {}
    # image-only (patches + [CLS] k_l prompts [SEP]) and text-only passes, pooled states
    if "itc" in objectives:
        passes.update({"image-only": (P + k_l + 2, 2), "text-only": (1 + k_v + text_len, 2)})
    if "mlm" in objectives:  # the textual part's states
        passes["pair, MLM"] = (P + text_len, text_len)
    if "itm" in objectives:
        passes["pair, ITM"] = (P + text_len, 2)
    return passes


def flops_per_pair(cfg, objectives, text_len):
    """Training FLOPs of one image-text pair in a pre-training step: the passes each objective runs
    (flops_per_pass), and MLM's head at the ~15% masked positions."""
    D = cfg.dim
    total = sum(flops_per_pass(cfg, T, last)
                for T, last in pretraining_passes(cfg, objectives, text_len).values())
    if "mlm" in objectives:
        total += 6 * (D * D + D * cfg.vocab_size) * 0.15 * text_len
    return total

