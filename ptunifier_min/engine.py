"""Training machinery shared by train.py and finetune.py: torchrun set-up, data order, optimizer, schedule, precision,
the optimisation step with its non-finite guard, checkpoints and logging. Nothing here knows about a particular loss.

Distributed behaviour, stated once: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU; rank r
seeds its own randomness with seed + r; only rank 0 writes files; every rank runs the same collectives in the same order.
"""

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from . import config as config_lib
from . import data


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


def cpu_bf16_flags(cpuinfo="/proc/cpuinfo"):
    """The native bf16 matrix instructions this CPU announces: {'avx512_bf16', 'amx_bf16'} & its /proc/cpuinfo flags.
    Empty where there is no /proc/cpuinfo (not Linux): no claim of native bf16 is made there. Also empty when the
    environment sets PTUNIFIER_NO_CPU_BF16=1: the test suite does, so that no test depends on the machine's CPU."""
    if os.environ.get("PTUNIFIER_NO_CPU_BF16") == "1":
        return set()
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return set()
    return {"avx512_bf16", "amx_bf16"} & set(flags)


def resolve_precision(precision, device):
    """'auto' = bf16 on CUDA, and on a CPU with native bf16 (AVX512-BF16 or AMX); fp32 on other CPUs and devices.

    Measured (issue 11, README Benchmarks): on an AVX512-BF16 CPU a bf16 training step of the cpu preset ran ~2x
    faster than fp32; on an AVX2-only CPU, which emulates bf16, 20x slower. So the CPU's flags decide, not a guess."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and bool(cpu_bf16_flags()))
        return "bf16" if native else "fp32"
    return precision


def autocast(precision, device):
    """bf16 autocast around forward and loss only; master weights and optimizer state stay fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_generator(seed, step, micro=None):
    """The generator of one optimizer step (micro=None: draws made for the whole step, the MLM masks) or of one of its
    micro-steps (ITM's negatives), alike on every rank: masks and negatives are a pure function of the position in
    training, so a resumed run draws exactly what the uninterrupted run drew, and 8 ranks what 1 process draws."""
    stream = 0 if micro is None else 1 + micro  # a stream of its own for the step and for each micro-step (< 1023)
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024 + stream)


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
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG, and a resumed run,
        # which makes a loader where the uninterrupted one did not, would then draw other dropout masks
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=list(order.batches(epoch, start)),
                                             collate_fn=collate, num_workers=num_workers, generator=torch.Generator(),
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


def next_micro_batches(batches, grad_accum, device):
    """The micro-batches of the next optimizer step, on the device. All of them are fetched before the first forward
    pass, so that what depends on the whole step (pre-training's MLM token count) can be computed first."""
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            for _ in range(grad_accum)]


def accumulate(train_model, micro_batches, loss_fn, d, precision):
    """One optimizer step's micro-steps: forward + backward each, gradients all-reduced on the last only.

    loss_fn(batch, micro) -> (loss, {name: scalar tensor}); each micro-step's loss is divided by their number, so the
    gradients add up to their mean. The DDP sync state is chosen before each forward (no_sync must wrap the forward
    too). Returns (last micro-step's loss, stats averaged over the micro-steps).
    """
    stats = {}
    grad_accum = len(micro_batches)
    for micro, batch in enumerate(micro_batches):
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
    for m in model.modules():  # CLIP's bound on the logit scale: kept here, after the step, not by a forward clamp
        if hasattr(m, "clamp_logit_scale"):
            m.clamp_logit_scale()
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


# ---- run folders -----------------------------------------------------------------------------------------------------
# What a run writes into its --out (tokenizer.json: a RoBERTa tokenizer made one file, pretrained.py)
RUN_FILES = ("config.json", "log.jsonl", "latest", "results.json", "train_state", "tokenizer.json")
_LOCKS = {}  # realpath(out) -> the descriptor of out/.lock, flock'ed for as long as this process lives
_WRITTEN = {}  # realpath(checkpoint folder) -> the step folders this run wrote there (or resumed from), oldest first
_STOP = {}  # what the SIGTERM / SIGINT handler needs: this process's pid, the run folder, its checkpoint folder


def claim_run_folder(out, resume="", overwrite=False, say=print, checkpoints=None):
    """Make `out` this run's own, or stop saying what to do. Rank 0 calls it first, before any data is read.

    - An exclusive lock on out/.lock, which holds the owner's pid, host and start time: a second run on the folder is
      refused with them (two writers would mix their logs and swap each other's `latest`). The kernel drops the lock
      with the process, so not even a SIGKILL leaves a stale one.
    - A folder holding an earlier run (RUN_FILES, step_*) is refused, unless this run continues it (--resume from
      inside `out`) or --overwrite moves those entries aside into out/.replaced-<time>/: said, never deleted.
    - SIGTERM / SIGINT then print where the last checkpoint (in `checkpoints`, default `out`) is and the flag that
      resumes it, and exit non-zero; every write below is atomic, so nothing is left half-written.
    """
    if not out:
        raise SystemExit("--out is empty: name the run's output folder")
    try:
        os.makedirs(out, exist_ok=True)
        _lock(out)
    except OSError as e:
        raise SystemExit(f"cannot write to --out {out}: {e.strerror or e}") from None
    for key in [k for k in _WRITTEN if _inside(k, out)]:
        del _WRITTEN[key]  # a new run (in a process that has run before: tests) owns none of the folders' contents
    earlier = sorted(n for n in os.listdir(out) if n in RUN_FILES or n.startswith(("step_", ".tmp_")))
    if earlier and not (resume and _inside(resume, out)):
        if not overwrite:
            raise SystemExit(f"--out {out} holds an earlier run ({', '.join(earlier)}): continue it with --resume "
                             f"{out}, start afresh with --overwrite (moves these into {out}/.replaced-<time>/), or "
                             "choose another --out. Nothing was changed.")
        aside = os.path.join(out, time.strftime(".replaced-%Y%m%d-%H%M%S"))
        aside += f"-{os.getpid()}" if os.path.exists(aside) else ""
        os.makedirs(aside)
        for name in earlier:
            os.replace(os.path.join(out, name), os.path.join(aside, name))
        say(f"--overwrite: moved the earlier run's {', '.join(earlier)} aside into {aside}")
    _STOP.update(pid=os.getpid(), out=out, checkpoints=checkpoints or out)
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set from there
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) is not _on_stop:
                _STOP.setdefault("previous", {})[signum] = signal.getsignal(signum)
                signal.signal(signum, _on_stop)


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def _lock(out):
    key = os.path.realpath(out)
    if key in _LOCKS:  # this process holds it already (a script's main() run again in one process, as tests do)
        return
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 1000).decode(errors="replace").strip() or "a process that is starting"
        os.close(fd)
        raise SystemExit(f"--out {out} is in use by another run ({holder}): two runs writing one folder would mix "
                         "their logs and checkpoints; wait for it to end, or choose another --out") from None
    except OSError as e:  # a file system without flock (some network mounts): run, but say that nothing guards it
        print(f"warning: cannot lock {out} ({e.strerror}): make sure no other run writes there", file=sys.stderr)
    # Written in place, not through a temporary and a rename: the lock belongs to this inode.
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    _LOCKS[key] = fd


def _on_stop(signum, frame):
    if os.getpid() != _STOP["pid"]:  # a data-loader worker forked from the run: behave as it would have without us
        previous = _STOP["previous"][signum]
        if callable(previous):
            return previous(signum, frame)
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)
        return
    # Data-loader workers get the signal too (Ctrl-C, or a kill of the process group) and die with the run: the loader's
    # SIGCHLD check would report each of them as a failure in the middle of the shutdown.
    signal.signal(signal.SIGCHLD, lambda *args: None)  # not SIG_DFL: a pending SIGCHLD would then raise its own error
    # Said at exit, after the unwinding has closed the progress bar, so that it is the last line on the terminal; once,
    # however many signals come.
    if not _STOP.get("stopping"):
        _STOP["stopping"] = True
        atexit.register(lambda: print(stop_message(signal.Signals(signum).name), file=sys.stderr, flush=True))
    # 128 + N is the shell's "ended by signal N"; SystemExit unwinds through the writers, which remove their temporaries
    raise SystemExit(128 + signum)


def stop_message(why):
    """One line: where the last checkpoint of the current run is, and the flag that continues from it."""
    try:
        ckpt = resolve_checkpoint(_STOP["checkpoints"])
    except CheckpointError:
        return (f"{why}: stopped before the first checkpoint in {_STOP['checkpoints']}; nothing to resume: run the "
                "same command with --overwrite to start again")
    return f"{why}: stopped; the last checkpoint is {ckpt}: run the same command with --resume {_STOP['out']}"


def write_error(e, path):
    """An OSError that says what could not be written and why, a full disk as such (ENOSPC alone names no file)."""
    why = "disk full (no space left on device)" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    where = f" ({e.filename})" if e.filename and e.errno != errno.ENOSPC else ""  # e.g. a source file that vanished
    return OSError(e.errno, f"could not write {path}: {why}{where}; the temporary copy was removed and the previous "
                            "version, if any, is intact")


# ---- checkpoints -----------------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    pass


def save_checkpoint(out, step, model, cfg, trainer_state=None, files=(), keep=1):
    """Write out/step_NNNNNNN/{model.safetensors, config.json, trainer.pt, the tokenizer file}, then point out/latest
    at it. `files` are copied in (the tokenizer: a checkpoint is useless without its vocabulary).

    Written into a temporary folder (named with the pid: no two processes share one) that is renamed when complete,
    and `latest` is replaced atomically, so a kill at any moment leaves the previous checkpoint intact and never a
    half-written one in its place; a failed write removes the temporary and says what failed, a full disk as such.
    To keep the last `keep`, only step folders this run wrote here (or resumed from) are removed, never an earlier
    run's, whatever their names sort to: `latest` always names a folder that exists.
    """
    name = f"step_{step:07d}"
    tmp, final = os.path.join(out, f".tmp_{name}.{os.getpid()}"), os.path.join(out, name)
    try:
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
        _discard(final)  # the same step written again (a finished run resumed): the new one replaces it
        os.replace(tmp, final)
        data.write_atomic(os.path.join(out, "latest"), name + "\n")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(e, final) from e
        raise
    mine = _WRITTEN.setdefault(os.path.realpath(out), [])
    mine[:] = [n for n in mine if n != name] + [name]
    for old in mine[:-keep]:
        _discard(os.path.join(out, old))
    del mine[:-keep]
    return final


def _discard(folder):
    """Remove a folder by renaming it to a temporary name first: a kill mid-way never leaves half a checkpoint."""
    if os.path.isdir(folder):
        trash = os.path.join(os.path.dirname(folder), f".tmp_{os.path.basename(folder)}.{os.getpid()}.old")
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


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


def resume_from(path, cfg, model, opt, sched, say=print):
    """Continue a run from its checkpoint (a run or step folder) honestly. Returns the checkpoint's trainer state.

    The config is compared with the checkpoint's (config.resume_differences): settings a resumed run must keep (the
    model, the data, the objectives, the batch, the seed...) are refused with the list of differences; those it may
    change (steps, cadences, learning rates, workers) are applied and printed. Weights, optimizer moments and the
    position in the schedule are restored; learning rates, weight decay and betas stay this run's (see
    load_optimizer_state). Every failure is a SystemExit naming the checkpoint, not a traceback.
    """
    try:
        ckpt = resolve_checkpoint(path)
        refused, changed = config_lib.resume_differences(read_checkpoint_config(ckpt)["config"], cfg)
        if refused:
            raise SystemExit(f"--resume {path}: these settings differ from the run being continued, and a resumed run "
                             "cannot change them:\n  " + "\n  ".join(refused) + "\nuse the checkpoint's values (in "
                             f"{os.path.join(ckpt, 'config.json')}) or start a new run in another --out")
        load_weights(ckpt, model)
        state = load_trainer_state(ckpt)
        load_optimizer_state(opt, sched, state)
    except CheckpointError as e:
        raise SystemExit(f"--resume {path}: {e}") from None
    except ValueError as e:  # torch: the saved parameter groups do not fit this optimizer's
        raise SystemExit(f"--resume {path}: {ckpt}/trainer.pt does not fit this model's optimizer: {e}") from None
    mine = _WRITTEN.setdefault(os.path.realpath(os.path.dirname(ckpt)), [])
    if os.path.basename(ckpt) not in mine:  # the run goes on: its next checkpoint supersedes this one
        mine.insert(0, os.path.basename(ckpt))
    say(f"resumed from {ckpt} at step {state['step']}" +
        (f"; changed for the rest of the run: {', '.join(changed)}" if changed else ""))
    return state


def load_optimizer_state(opt, sched, state):
    """Restore the optimizer's moments and the schedule's position from a trainer state, keeping this run's settings.

    load_state_dict would also bring back the checkpoint's hyperparameters (every group's lr, initial_lr,
    weight_decay, betas) and LambdaLR its base_lrs: new learning rates given to a resumed run would be silently
    ignored. So they are put back from the optimizer as built from this run's flags, and the current LR is
    recomputed at the resumed position with LambdaLR's own formula (base_lr * lambda(step)): with unchanged flags
    it is bit for bit the saved one, with a new --steps it follows the new schedule.
    """
    own = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer"])
    for group, settings in zip(opt.param_groups, own):
        group.update(settings)
    sched.load_state_dict(state["scheduler"])
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    for group, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def rng_state():
    # Masks, negatives, crops and sentence choices derive from (seed, step); only dropout draws from the global RNG.
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def gather_rng(d):
    """Every rank's RNG state, gathered on all ranks (rank 0 saves them), so a resumed rank r restores its own.
    A collective: every rank calls it at the same point."""
    state = rng_state()
    if d.world == 1:
        return [state]
    out = [None] * d.world
    dist.all_gather_object(out, state)
    return out


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and len(s["cuda"]):
        torch.cuda.set_rng_state_all(s["cuda"])


def write_json(path, obj):
    """Write JSON through a temporary file and a rename (data.write_atomic): readers never see half a file, a failed
    write leaves the previous file and no temporary, a full disk is said as such."""
    data.write_atomic(path, json.dumps(obj, indent=2))


# ---- logging ---------------------------------------------------------------------------------------------------------
class Log:
    """log.jsonl with one line per logged step (rank 0 only).

    A resumed run passes resume_step: the log is first cut back to the records of steps up to it (rewritten through
    a temporary file and a rename), because the steps the stopped run logged after its last checkpoint are trained
    again and must not appear twice. A line torn by a kill mid-write is dropped with them."""

    def __init__(self, path, enabled, resume_step=None):
        self.f = None
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(path):
            kept = []
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                        kept.append(line.rstrip("\n") + "\n")
            data.write_atomic(path, "".join(kept))
        self.f = open(path, "a")

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
