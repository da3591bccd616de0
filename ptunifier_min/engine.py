"""Training machinery shared by train.py and finetune.py: torchrun set-up, data order, optimizer, schedule, precision,
the optimisation step with its non-finite guard, checkpoints and logging. Nothing here knows about a particular loss.

Distributed behaviour, stated once: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU; rank r
seeds its own randomness with seed + r; only rank 0 writes files; every rank runs the same collectives in the same order.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from . import config as config_lib


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(seed):
    """Initialise torch.distributed when launched by torchrun, pick the device, seed this rank."""
    d = Dist()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        d.rank, d.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        d.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        d.device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(d.device)
    if d.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo")
    seed_everything(seed + d.rank)
    return d


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier(d):
    if d.world > 1:
        dist.barrier()


def resolve_precision(precision, device):
    """'auto' = bf16 on CUDA; fp32 on CPU, where bf16 is only fast with AVX512-BF16/AMX (see README: measured slower
    here on an AVX2 CPU)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision, device):
    """bf16 autocast around forward and loss only; master weights and optimizer state stay fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_generator(seed, step, micro):
    """The generator of one micro-step, alike on every rank: masks and negatives are a pure function of the position in
    training, so a resumed run draws exactly what the uninterrupted run drew, and 8 ranks what 1 process draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024 + micro)


class BatchOrder:
    """Seeded epoch permutations cut into global batches; rank r takes rows [r*B, (r+1)*B) of each global batch.

    So 1 process with batch W*B and W processes with batch B see the same samples per step (DDP equivalence), and the
    order is a pure function of (seed, epoch): resuming at micro-batch k of an epoch just skips k global batches.
    """

    def __init__(self, n, batch_size, world, rank, seed, shuffle=True, drop_last=True):
        self.n, self.B, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.per_epoch = n // (batch_size * world) if drop_last else math.ceil(n / (batch_size * world))
        if self.per_epoch == 0:
            raise ValueError(f"global batch {batch_size} x {world} is larger than the {n} training samples: "
                             "lower --batch-size")

    def batches(self, epoch, start=0):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle \
            else torch.arange(self.n)
        G = self.B * self.world
        for b in range(start, self.per_epoch):
            rows = order[b * G:(b + 1) * G][self.rank * self.B:(self.rank + 1) * self.B]
            if len(rows):
                yield rows.tolist()


def micro_batches(dataset, order, collate, num_workers, start_micro=0):
    """Endless (epoch, micro-batch index, batch) from a BatchOrder, starting at a global micro-batch count."""
    epoch, start = divmod(start_micro, order.per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=list(order.batches(epoch, start)),
                                             collate_fn=collate, num_workers=num_workers,
                                             persistent_workers=False, pin_memory=torch.cuda.is_available())
        for batch in loader:
            yield batch
        epoch, start = epoch + 1, 0


# ---- optimisation ----------------------------------------------------------------------------------------------------
NO_DECAY = ("cls_token", "pos_embed", "word_embeddings", "position_embeddings", "token_type_embeddings",
            "visual_prompts", "textual_prompts", "logit_scale")


def build_optimizer(model, backbone, lr_backbone, lr_head, weight_decay, betas):
    """AdamW with four groups: backbone / rest x decay / no decay.

    No decay on norms and biases (any tensor with < 2 dims), embeddings, position and type embeddings, prompt pools and
    the logit scale (paper section 5.3: AdamW, wd 0.01). `backbone` = set of parameter names trained at lr_backbone.
    """
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not any(k in name for k in NO_DECAY)
        key = ("backbone" if name in backbone else "rest", decay)
        groups.setdefault(key, []).append((name, p))
    param_groups, summary = [], {}
    for (part, decay), items in sorted(groups.items()):
        lr = lr_backbone if part == "backbone" else lr_head
        param_groups.append(dict(params=[p for _, p in items], lr=lr, weight_decay=weight_decay if decay else 0.0,
                                 name=f"{part}/{'decay' if decay else 'no_decay'}"))
        summary[f"{part}/{'decay' if decay else 'no_decay'}"] = sum(p.numel() for _, p in items)
    fused = all(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, betas=betas, fused=fused or None), summary


def warmup_linear(total_steps, warmup_frac):
    """LR multiplier: linear warm-up over the first warmup_frac of the steps, then linear decay to 0 (paper 5.3)."""
    warmup = max(1, int(total_steps * warmup_frac))

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return f


def accumulate(train_model, batches, loss_fn, grad_accum, d, precision):
    """One optimizer step's worth of micro-steps: forward + backward each, gradients all-reduced on the last only.

    loss_fn(batch, micro) -> (loss, {name: scalar tensor}). The DDP sync state is chosen before each forward (no_sync
    must wrap the forward too). Returns (last micro-step's loss, stats averaged over the micro-steps).
    """
    stats = {}
    for micro in range(grad_accum):
        batch = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        sync = micro == grad_accum - 1 or d.world == 1
        with contextlib.nullcontext() if sync else train_model.no_sync():
            with autocast(precision, d.device):
                loss, s = loss_fn(batch, micro)
            (loss / grad_accum).backward()
        for k, v in s.items():
            stats[k] = stats.get(k, 0.0) + float(v) / grad_accum
    return loss, stats


def optimizer_step(model, opt, sched, loss, grad_clip, d):
    """Clip, step, advance the schedule; or, when the loss or any gradient is non-finite on any rank, skip the update
    on every rank alike. Returns the gradient norm, or None for a skipped step."""
    if not all_finite(loss, model, d):
        opt.zero_grad(set_to_none=True)
        return None
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


class NonFiniteGuard:
    """Counts consecutive skipped steps; after max_skips it stops training with a clear error (the last checkpoint,
    written before the trouble, stays intact)."""

    def __init__(self, max_skips, out, log):
        self.max_skips, self.out, self.log, self.run = max_skips, out, log, 0

    def __call__(self, grad_norm, step):
        if grad_norm is not None:
            self.run = 0
            return True
        self.run += 1
        self.log.write({"step": step, "skipped": "non-finite loss or gradient", "consecutive": self.run})
        if self.run >= self.max_skips:
            raise FloatingPointError(f"{self.run} consecutive non-finite steps up to step {step}; the last good "
                                     f"checkpoint is in {self.out}. Lower the learning rate or check the data.")
        return False


def all_finite(loss, model, d):
    """True on every rank alike when this rank's loss and all gradients are finite everywhere."""
    ok = torch.isfinite(loss.detach()).all()
    for p in model.parameters():
        if p.grad is not None:
            ok = ok & torch.isfinite(p.grad).all()
    flag = ok.float().to(d.device)
    if d.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


# Nominal dense bf16 peaks (no sparsity) of common training GPUs, for MFU; None = unknown (the bench measures a CPU's).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def assert_in_sync(model, d):
    """Raise unless every rank holds the same parameters (compares per-tensor float64 sums and sums of squares)."""
    if d.world == 1:
        return
    sig = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()]) for p in model.parameters()])
    sig = sig.to(d.device)
    out = [torch.empty_like(sig) for _ in range(d.world)]
    dist.all_gather(out, sig)
    bad = [r for r in range(1, d.world) if not torch.equal(out[0], out[r])]
    if bad:
        raise RuntimeError(f"parameters of ranks {bad} differ from rank 0's: DDP lost synchronisation")


def unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


# ---- checkpoints -----------------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    pass


def save_checkpoint(out, step, model, cfg, trainer_state=None, files=(), keep=1):
    """Write out/step_NNNNNNN/{model.safetensors, config.json, trainer.pt, the tokenizer file}, then point out/latest
    at it. `files` are copied in (the tokenizer: a checkpoint is useless without its vocabulary).

    Written into a temporary folder that is renamed when complete, and `latest` is replaced atomically, so a kill at
    any moment leaves the previous checkpoint intact and never a half-written one in its place.
    """
    name = f"step_{step:07d}"
    tmp, final = os.path.join(out, f".tmp_{name}"), os.path.join(out, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"step": str(step)})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"step": step, "config": config_lib.to_dict(cfg)}, f, indent=2)
    if trainer_state is not None:
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    for src in files:
        shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
    for fname in os.listdir(tmp):  # flush file contents before the rename makes them visible
        with open(os.path.join(tmp, fname), "rb+") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out, ".latest.tmp"), "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(out, ".latest.tmp"), os.path.join(out, "latest"))
    steps = sorted(n for n in os.listdir(out) if n.startswith("step_"))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    return final


def resolve_checkpoint(path):
    """A run folder (follows its `latest`) or a step folder -> the step folder, with a clear error otherwise."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise CheckpointError(f"no checkpoint at {path}: expected model.safetensors (or a run folder with `latest`)")
    return path


def checkpoint_tokenizer(path):
    path = resolve_checkpoint(path)
    for name in ("tokenizer.json", "vocab.txt"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise CheckpointError(f"{path} holds no tokenizer.json or vocab.txt")


def read_checkpoint_config(path):
    path = resolve_checkpoint(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable {os.path.join(path, 'config.json')}: {e}") from e


def config_differences(saved: dict, current: dict, prefix=""):
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<missing>"), current.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} vs requested {b!r}")
    return out


def load_weights(path, model, strict=True):
    """Load model.safetensors into model; a corrupt file or mismatched tensors give a CheckpointError.

    With strict=False, keys the model lacks or the file lacks are allowed (a new task head); shapes must still match.
    Returns (missing, unexpected) key lists.
    """
    path = resolve_checkpoint(path)
    file = os.path.join(path, "model.safetensors")
    try:
        state = load_file(file)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"corrupt or truncated checkpoint {file}: {e}") from e
    own = unwrap(model).state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{file} does not fit this model:\n  " + "\n  ".join(bad))
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{file} does not fit this model: missing {missing}, unexpected {unexpected}")
    return missing, unexpected


def load_trainer_state(path):
    path = resolve_checkpoint(path)
    file = os.path.join(path, "trainer.pt")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no trainer.pt: it holds weights only and cannot be resumed")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"corrupt or truncated trainer state {file}: {e}") from e


def rng_state():
    # Masks, negatives, crops and sentence choices derive from (seed, step); only dropout draws from the global RNG.
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and len(s["cuda"]):
        torch.cuda.set_rng_state_all(s["cuda"])


def write_json(path, obj):
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ---- logging ---------------------------------------------------------------------------------------------------------
class Log:
    """log.jsonl with one line per logged step (rank 0 only)."""

    def __init__(self, path, enabled):
        self.f = open(path, "a") if enabled else None

    def write(self, record):
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()


def pool_usage(hist):
    """Distinct pool rows used and the entropy (nats) of the selection histogram: a collapsed pool shows here."""
    total = hist.sum()
    if total == 0:
        return 0, 0.0
    p = hist[hist > 0].double() / total
    return int((hist > 0).sum()), float(-(p * p.log()).sum())


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self):
        t, self.t = self.t, time.perf_counter()
        return self.t - t
