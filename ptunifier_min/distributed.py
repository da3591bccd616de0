"""torchrun set-up and what every rank must do alike: device, seeding, the step generators,
barriers, precision.

    d = setup_distributed(seed, timeout_min=30)  # Dist(rank, world, local_rank, device)
    lo, hi = shard(n, d, unit=64)  # this rank's whole evaluation batches of n items
    parts = gather_objects(obj, d)  # every rank's obj, in rank order
    with autocast(resolve_precision("auto", proc.device), proc.device): ...

Distributed behaviour, stated once: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo
on CPU; rank r seeds its own randomness with seed + r; only rank 0 writes files; every rank runs the
same collectives in the same order. Evaluation is shared: each rank computes whole batches of its
contiguous share, the very batches one process computes, and the results are gathered in rank
order, so every metric is the one-process metric to the bit. Random draws that must agree across
ranks (MLM masks, ITM negatives) come from `step_generator`, never from the global RNG, so that 8
ranks draw what 1 process draws and a resumed run what the uninterrupted one drew.
"""

import contextlib
import ctypes
import dataclasses
import datetime
import gc
import os
import random

import numpy as np
import torch
import torch.distributed as dist


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # a gloo group for what ranks exchange on the host (ITM's plan: objectives.itm_plan); None = the
    # default group, which is gloo already when training on CPUs
    host_group: object = None

    @property
    def main(self):
        return self.rank == 0


# torchrun's variables: all five are needed by a process of a group (WORLD_SIZE > 1)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long the start waits for every rank to arrive (rank 0 for the others to connect, the
# others for rank 0's store) before it stops with an error. torch waits as long as the
# collectives' timeout, 30 minutes, so a process whose peers never start (torchrun variables left
# in a shell, a node that failed to launch) sat silent for half an hour. Under torchrun all local
# ranks start together and its agent has already gathered the nodes, so the wait is seconds;
# where ranks are started by hand on nodes that come up slowly, set this environment variable to
# wait longer. It bounds the start only, not the collectives (the NCCL watchdog): that is the
# `timeout` of setup_distributed.
RENDEZVOUS_TIMEOUT_VAR, RENDEZVOUS_TIMEOUT_S = "PTUNIFIER_RENDEZVOUS_TIMEOUT_S", 60.0


def torchrun_env(env=os.environ):
    """(rank, world, local_rank) from torchrun's variables, checked before anything waits on them:
    with WORLD_SIZE > 1 all of TORCHRUN_VARIABLES must be set and agree; without WORLD_SIZE (or 1)
    this is one process. A problem is an error that shows the variables and how to fix them."""
    def fail(problem):
        shown = " ".join(f"{k}={env[k]}" for k in TORCHRUN_VARIABLES if k in env)
        raise SystemExit(f"torchrun's environment {problem} ({shown}): launch with torchrun "
                         f"--nproc_per_node=N, which sets {', '.join(TORCHRUN_VARIABLES)}, or "
                         "unset them to run one process")

    num = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        if k in env:
            try:
                num[k] = int(env[k])
            except ValueError:
                fail(f"is not understood: {k}={env[k]!r} is not an integer")
    if "RANK" in env and "WORLD_SIZE" not in env:
        fail("is incomplete: RANK is set but WORLD_SIZE is not")
    rank, world, local = num.get("RANK", 0), num.get("WORLD_SIZE", 1), num.get("LOCAL_RANK", 0)
    if world > 1:
        missing = [k for k in TORCHRUN_VARIABLES if not env.get(k)]
        if missing:
            fail(f"is incomplete: WORLD_SIZE={world} but {', '.join(missing)} "
                 + ("is" if len(missing) == 1 else "are") + " not set")
        if not 0 < num["MASTER_PORT"] < 2**16:
            fail("is inconsistent: MASTER_PORT must be a port number, 1..65535")
    if world < 1 or not 0 <= rank < world:
        fail("is inconsistent: RANK must be in 0..WORLD_SIZE-1")
    # torchrun numbers the ranks of a node from RANK - LOCAL_RANK, so LOCAL_RANK <= RANK
    if not 0 <= local <= rank:
        fail("is inconsistent: LOCAL_RANK must be in 0..RANK")
    return rank, world, local


def rendezvous_timeout():
    """Seconds the start waits for every rank: RENDEZVOUS_TIMEOUT_S, or the environment's
    PTUNIFIER_RENDEZVOUS_TIMEOUT_S."""
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_VAR, "")
    try:
        seconds = float(raw) if raw else RENDEZVOUS_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SystemExit(f"{RENDEZVOUS_TIMEOUT_VAR}={raw!r}: must be a number of seconds > 0")
    return seconds


def setup_distributed(seed, timeout_min=30.0):
    """Initialise torch.distributed when launched by torchrun, pick the device, seed this rank.

    The environment is checked first (torchrun_env) and the start waits at most
    rendezvous_timeout() for the other ranks: a rank without peers stops with an error that names
    the variables, before the caller takes a lock or reads data. timeout_min: how long a rank waits
    in a collective for the others (--dist-timeout-min) before the job fails; NCCL's own default,
    10 minutes, is shorter than some evaluations."""
    proc = Dist()
    proc.rank, proc.world, proc.local_rank = torchrun_env()
    if torch.cuda.is_available():
        if proc.local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK={proc.local_rank} but this node has "
                             f"{torch.cuda.device_count()} GPUs: --nproc_per_node must be at most "
                             "that many")
        proc.device = torch.device("cuda", proc.local_rank)
        torch.cuda.set_device(proc.device)
    timeout = datetime.timedelta(minutes=timeout_min)
    if proc.world > 1 and not dist.is_initialized():
        store = _rendezvous(proc)
        # from here on the store waits as long as the collectives do: a rank may reach its first
        # collective long after another (rank 0 prepares the data while the others wait)
        store.set_timeout(timeout)
        # what init_process_group does with the store it makes itself (the prefix keeps our keys
        # apart from the torchrun agent's, which shares the store)
        dist.init_process_group("nccl" if proc.device.type == "cuda" else "gloo",
                                store=dist.PrefixStore("default_pg", store),
                                rank=proc.rank, world_size=proc.world, timeout=timeout)
    if proc.world > 1 and proc.device.type == "cuda":
        proc.host_group = dist.new_group(backend="gloo", timeout=timeout)
    if proc.device.type == "cpu":
        keep_freed_memory()
    seed_everything(seed + proc.rank)
    return proc


def _rendezvous(proc):
    """The store every rank meets at (MASTER_ADDR:MASTER_PORT, or the torchrun agent's), waiting
    at most rendezvous_timeout() seconds for the other ranks."""
    seconds = rendezvous_timeout()
    try:
        store, _, _ = next(dist.rendezvous("env://", proc.rank, proc.world,
                                           timeout=datetime.timedelta(seconds=seconds)))
    except RuntimeError as e:  # torch.distributed.DistError: a timeout, a port in use
        env = os.environ
        raise SystemExit(
            f"rank {proc.rank} of WORLD_SIZE={proc.world} did not meet the other ranks at "
            f"MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env['MASTER_PORT']} within "
            f"{seconds:g} s ({str(e).strip()}): start every rank (torchrun --nproc_per_node=N "
            "starts them all; on several nodes, the same command on each), or unset "
            f"{', '.join(TORCHRUN_VARIABLES)} to run one process; {RENDEZVOUS_TIMEOUT_VAR}=S "
            "waits longer") from None
    return store


def keep_freed_memory():
    """Make glibc's malloc keep the memory this process frees, for the next step, instead of giving
    it back to the OS. Returns whether it could (False where the C library is not glibc).

    A CPU run's tensors come from malloc, and by default glibc returns large freed blocks to the OS
    (munmap, heap trimming): every step's activations then come back as fresh pages, which the
    kernel must fault in and zero: tens of thousands of page faults per step of the cpu preset,
    a few hundred with this (tests/test_precision.py counts them). The same as
    MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set before start.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: other C libraries have their own knobs
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # blocks up to 32 MB (glibc's largest mmap threshold) come from the heap, and the heap is never
    # trimmed below 2 GB
    return (bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier(proc):
    if proc.world > 1:
        dist.barrier()


def leave(proc):
    """The end of a job: wait for every rank, then end the process group. The caller drops its DDP
    wrapper first: DDP's reducer holds the group, and when a reducer is the group's last holder
    its destructor joins gloo's worker threads with the GIL held, while a worker that releases a
    finished collective's tensors waits for the GIL: both hang. Collected here, while the group is
    still registered, the reducer is never the last holder."""
    barrier(proc)
    if proc.world > 1:
        gc.collect()
        dist.destroy_process_group()


def shard(n, proc, unit=1):
    """This rank's contiguous share (lo, hi) of n items, cut at multiples of `unit` (an evaluation
    batch): the batches are the very ones one process makes (a text batch pads to its longest
    text, so a batch cut elsewhere could compute other numbers), and rank r takes batches
    [r B / world, (r + 1) B / world) of the B. With fewer batches than ranks some shares are empty;
    those ranks still take part in `gather_objects`."""
    batches = -(-n // unit)
    lo = proc.rank * batches // proc.world * unit
    return lo, min(n, (proc.rank + 1) * batches // proc.world * unit)


def gather_objects(obj, proc):
    """[rank 0's obj, rank 1's obj, ...] on every rank: one all_gather_object over the host group,
    so objects travel pickled through the host: pass CPU tensors (a CUDA tensor would arrive on the
    sender's device). Every rank must call it, with or without results of its own."""
    if proc.world == 1:
        return [obj]
    out = [None] * proc.world
    dist.all_gather_object(out, obj, group=proc.host_group)
    return out


# ---- the collectives of a training step: rank and world are the caller's (open_clip's loss) ----
class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order; the backward pass sends each rank the gradient of its own
    rows, summed over every rank's loss (an all-reduce of the whole gradient, then this rank's
    slice: the features are a few hundred kB, and all-reduce runs on every backend, where
    reduce-scatter does not run on gloo)."""

    @staticmethod
    def forward(ctx, x, rank, world):
        ctx.rank, ctx.B = rank, len(x)
        out = x.new_empty((world * len(x), *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.B:(ctx.rank + 1) * ctx.B], None, None


def gather_with_grad(x, rank, world):
    """All ranks' rows of x [B, ...] -> [world * B, ...], gradients flowing back to their owners."""
    return x if world == 1 else _GatherWithGrad.apply(x, rank, world)


def gather_rows(x, world, group=None):
    """All ranks' rows of x, without gradients (ids, texts, images), in x's dtype. group: the
    process group (None = the default one, which must serve x's device)."""
    if world == 1:
        return x
    out = x.new_empty((world * len(x), *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def exchange_rows(x, send, split, world):
    """cat(x, the rows other ranks send this one): each rank sends x[send], split[0][r] rows to rank
    r, and receives split[1][r] from rank r, by one all_to_all. Every rank takes part, also one
    that sends and receives nothing; the counts are the host's, so the host waits for nothing."""
    if world == 1:
        return x
    send_counts, recv_counts = split
    received = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(received, x[send].contiguous(), recv_counts, send_counts)
    return torch.cat([x, received])


def all_reduce_sum(t, world):
    """t summed over the ranks, in place."""
    if world > 1:
        dist.all_reduce(t)
    return t


def cpu_bf16_flags(cpuinfo="/proc/cpuinfo"):
    """The native bf16 matrix instructions this CPU announces: {'avx512_bf16', 'amx_bf16'} & its
    /proc/cpuinfo flags. Empty where there is no /proc/cpuinfo (not Linux): no claim of native bf16
    is made there. Also empty when the environment sets PTUNIFIER_NO_CPU_BF16=1: the test suite
    does, so that no test depends on the machine's CPU."""
    if os.environ.get("PTUNIFIER_NO_CPU_BF16") == "1":
        return set()
    try:
        with open(cpuinfo) as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return set()
    return {"avx512_bf16", "amx_bf16"} & set(flags)


def resolve_precision(precision, device):
    """'auto' = bf16 on CUDA, and on a CPU with native bf16 (AVX512-BF16 or AMX); fp32 on other CPUs
    and devices.

    On an AVX512-BF16 CPU a bf16 training step of the cpu preset runs about twice as fast as fp32;
    on an AVX2-only CPU, which emulates bf16, many times slower (docs/benchmarks.md). So the CPU's
    flags decide, not a guess."""
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


def use_compile(setting, device):
    """--compile's decision for a torch.device: 'auto' compiles on CUDA only."""
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def compile_model(model, setting="true", device=None, backend="inductor"):
    """The model the scripts train: torch.compile'd when --compile (`setting`) says so on `device`,
    with shapes dynamic from the first call.
    Texts are padded to each batch's longest, so their length changes; compiled for exact shapes
    first, pre-training needs 10 graphs of PTUnifier.forward, over dynamo's limit of 8, past which
    passes run eagerly; dynamic from the start, 7 (tests/test_compile.py). backend "eager": the
    same graphs without generated code (the test's)."""
    if not use_compile(setting, device or torch.device("cpu")):
        return model
    return torch.compile(model, dynamic=True, backend=backend)


def step_generator(seed, step, micro=None):
    """The CPU generator of one optimizer step (micro=None: draws made for the whole step, the MLM
    masks) or of one of its micro-steps (ITM's negatives), alike on every rank: masks and negatives
    are a pure function of the position in training, so a resumed run draws exactly what the
    uninterrupted run drew, and 8 ranks what 1 process draws. The draws are made on the host, before
    the batches move (objectives.mask_step, objectives.itm_plan)."""
    # a stream of its own for the step and for each micro-step (< 1023)
    stream = 0 if micro is None else 1 + micro
    # One distinct 64-bit seed per (seed, step, stream): 1,024 streams per step, and 1_000_003 (a
    # prime above any realistic step count) keeps consecutive base seeds' steps apart; config caps
    # seed < 2**31 and grad_accum < 1024.
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024 + stream)


def assert_in_sync(model, proc):
    """Raise unless every rank holds the same parameters (compares per-tensor float64 sums and sums
    of squares)."""
    if proc.world == 1:
        return
    sig = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()])
                       for p in model.parameters()])
    sig = sig.to(proc.device)
    out = [torch.empty_like(sig) for _ in range(proc.world)]
    dist.all_gather(out, sig)
    bad = [r for r in range(1, proc.world) if not torch.equal(out[0], out[r])]
    if bad:
        raise RuntimeError(f"parameters of ranks {bad} differ from rank 0's: "
                           "DDP lost synchronisation")


def unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile
