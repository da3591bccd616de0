"""DDP equivalence: 2 gloo processes with half the batch each end where 1
process with the whole batch ends.

Covers every objective set (find_unused_parameters=False: a dead parameter would make DDP raise),
the ITC all-gather with gradients, global ITM negatives (duplicate texts and files across ranks)
and the MLM token count; and exact gradient accumulation for MLM: batch B x --grad-accum 2 equals
batch 2B, on 1 process and on 2. And the set-up: torchrun variables that are incomplete or
inconsistent are named before anything waits, and a rank whose peers never come stops within a
bound, before any lock or data.
"""


import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ptunifier_min import distributed, optim
from ptunifier_min.config import PRESETS, TrainConfig, build
from ptunifier_min.model import PTUnifier
from ptunifier_min.objectives import IGNORE, draw_step, pretraining_loss
from test_objectives import OBJECTIVE_SETS, SPECIAL, text_batch

STEPS, GLOBAL_B = 3, 8


def global_batch(step):
    ids, mask = text_batch(B=GLOBAL_B, T=24, V=100, seed=step)
    # one text on both ranks (rows 0-3 and 4-7): never a negative of each other
    ids[6], mask[6] = ids[1], mask[1]
    g = torch.Generator().manual_seed(100 + step)
    # one file twice on a rank, one on both ranks: never negatives
    image_id = torch.tensor([0, 1, 2, 2, 3, 4, 5, 1])
    return {"image": torch.randn(GLOBAL_B, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": mask, "index": torch.arange(GLOBAL_B), "image_id": image_id}


def micro_batches(step, rank, world, accum):
    """This rank's micro-batches of a step, laid out as BatchOrder hands them out:
    micro-batch m holds rows [m * B * world, (m + 1) * B * world) of the step's global
    batch, rank r the r-th B of them."""
    full, B = global_batch(step), GLOBAL_B // (world * accum)
    out = []
    for m in range(accum):
        lo = (m * world + rank) * B
        local = {k: v[lo:lo + B] for k, v in full.items()}
        # each rank pads to its own longest text, as the collate does
        T = int(local["attention_mask"].sum(1).max())
        local["input_ids"], local["attention_mask"] = (local["input_ids"][:, :T],
                                                       local["attention_mask"][:, :T])
        out.append(local)
    return out


def make(objectives, hard=False, rank=0, world=1):
    cfg = build(TrainConfig, {**PRESETS["tiny"], "objectives": objectives, "vocab_size": 100,
                              "itm_hard_negatives": hard})
    torch.manual_seed(0)
    model = PTUnifier(cfg.model)
    # what train.py does: freeze what a probe step of these objectives does not
    # reach (a collective, on every rank)
    probe = micro_batches(0, rank, world, 1)
    draws = draw_step(probe, cfg, 0, SPECIAL, proc=distributed.Dist(rank=rank, world=world))
    optim.freeze_unreached(model, pretraining_loss(model, probe[0], draws[0], cfg)[0])
    return cfg, model


def step_loss(net, cfg, batches, step, rank=0, world=1):
    """What train.py does for one optimizer step before the update: masks for the step, then the
    micro-steps, the gradients all-reduced on the last. Returns (the last micro-step's loss, its
    scalars averaged over micro-steps, the step's draws)."""
    draws = draw_step(batches, cfg, step, SPECIAL, proc=distributed.Dist(rank=rank, world=world))
    stats = {}
    for micro, (batch, draw) in enumerate(zip(batches, draws)):
        last = micro == len(batches) - 1
        with net.no_sync() if isinstance(net, DDP) and not last else contextlib.nullcontext():
            loss, scalars, _ = pretraining_loss(net, batch, draw, cfg)
            (loss / len(batches)).backward()
        for k, v in scalars.items():
            stats[k] = stats.get(k, 0.0) + float(v) / len(batches)
    return loss, stats, draws


def train(objectives, rank=0, world=1, hard=False, accum=1):
    cfg, model = make(objectives, hard, rank, world)
    # SGD, not AdamW: some gradients are zero in exact arithmetic (the key bias cannot
    # change a softmax) and Adam divides their float noise by its own size, turning 1e-9
    # differences into full-size steps.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    net = DDP(model) if world > 1 else model  # find_unused_parameters=False (the default)
    for step in range(STEPS):
        step_loss(net, cfg, micro_batches(step, rank, world, accum), step, rank, world)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(rank, world, store, out, cases):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {f"{o}|{h}|{a}": train(o, rank, world, h, a) for o, h, a in cases}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


# (objectives, hard negatives, grad accumulation): accumulation is exact for MLM only;
# ITC and ITM see one micro-batch
CASES = [(o, False, 1) for o in OBJECTIVE_SETS] + [("mlm,itm,itc", True, 1), ("mlm", False, 2)]


def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "params")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), out, CASES), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for objectives, hard, accum in CASES:
        key = f"{objectives}|{hard}|{accum}"
        single = train(objectives, hard=hard)  # 1 process, the whole global batch in one micro-step
        for name, ref in single.items():
            torch.testing.assert_close(ranks[0][key][name], ranks[1][key][name], atol=0, rtol=0,
                                       msg=f"{key}: ranks differ in {name}")
            torch.testing.assert_close(ranks[0][key][name], ref, atol=1e-5, rtol=1e-4,
                                       msg=f"{key}: 2 processes differ from 1 in {name}")


def test_mlm_grad_accumulation_is_exact():
    """1 process at batch 2B equals batch B with --grad-accum 2, in masks,
    loss and gradients (1e-5): every micro-step divides by the masked tokens of the
    whole step, not by its own."""
    results = {}
    for accum in (1, 2, 4):
        cfg, model = make("mlm")
        batches = micro_batches(0, 0, 1, accum)
        _, stats, draws = step_loss(model, cfg, batches, 0)
        labels = torch.cat([F.pad(d["mlm_labels"], (0, 24 - d["mlm_labels"].shape[1]),
                                  value=IGNORE) for d in draws])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[accum] = stats["mlm_loss"], labels, grads
        # the halves mask different numbers of tokens, so a mean of two means would be off
        if accum == 2:
            assert len({int((d["mlm_labels"] != IGNORE).sum()) for d in draws}) == 2
    loss, labels, grads = results[1]
    for accum in (2, 4):
        assert torch.equal(results[accum][1], labels), f"--grad-accum {accum} masks other tokens"
        assert abs(results[accum][0] - loss) < 1e-5, (accum, results[accum][0], loss)
        for name, g in grads.items():
            torch.testing.assert_close(results[accum][2][name], g, atol=1e-5, rtol=1e-5,
                                       msg=f"--grad-accum {accum}: gradient of {name}")


# ---- set-up: nothing waits silently -----------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")


@pytest.mark.parametrize("env, message", [
    (dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_PORT="29500"),
     "incomplete: WORLD_SIZE=2 but MASTER_ADDR is not set"),
    (dict(WORLD_SIZE="2", RANK="1"),
     "WORLD_SIZE=2 but LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set"),
    (dict(RANK="1"), "RANK is set but WORLD_SIZE is not"),
    (dict(WORLD_SIZE="2", RANK="2", LOCAL_RANK="0", **LOCAL), "RANK must be in 0..WORLD_SIZE-1"),
    (dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="1", **LOCAL), "LOCAL_RANK must be in 0..RANK"),
    (dict(WORLD_SIZE="two", RANK="0"), "WORLD_SIZE='two' is not an integer"),
    (dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="h", MASTER_PORT="70000"),
     "MASTER_PORT must be a port number"),
])
def test_torchrun_variables_incomplete_or_inconsistent_are_named_before_anything_waits(
        monkeypatch, env, message):
    for k in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def waits(*a, **k):
        raise AssertionError("reached the rendezvous with an environment that cannot work")

    monkeypatch.setattr(dist, "rendezvous", waits)
    monkeypatch.setattr(dist, "init_process_group", waits)
    with pytest.raises(SystemExit, match="torchrun's environment is .*" + message) as e:
        distributed.setup_distributed(0)
    assert all(f"{k}={v}" in str(e.value) for k, v in env.items())  # what is set, shown
    assert "unset them to run one process" in str(e.value)


def test_a_local_rank_beyond_the_gpus_of_the_node_is_named(monkeypatch):
    for k in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match="LOCAL_RANK=2 but this node has 2 GPUs"):
        distributed.setup_distributed(0)


def test_a_rank_whose_peers_never_come_stops_within_the_bound_before_any_lock_or_data(tmp_path):
    """train.py as rank 0 of 2 with no rank 1, and as rank 1 of 2 with no rank 0 (torchrun's
    variables left in a shell): each stops after the rendezvous bound (2 s here, through
    PTUNIFIER_RENDEZVOUS_TIMEOUT_S) naming the variables, and has made neither its run folder
    nor its data."""
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    runs, start = [], time.monotonic()
    for rank, port in zip(("0", "1"), ports):
        env = dict(os.environ, WORLD_SIZE="2", RANK=rank, LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PTUNIFIER_RENDEZVOUS_TIMEOUT_S="2")
        out, synth = tmp_path / f"out{rank}", tmp_path / f"world{rank}"
        cmd = [sys.executable, "train.py", "--preset", "tiny", "--out", str(out),
               "--synth-root", str(synth)]
        runs.append((rank, port, out, synth, subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    try:
        for rank, port, out, synth, p in runs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 1, err
            last = err.strip().splitlines()[-1]
            assert (f"rank {rank} of WORLD_SIZE=2 did not meet the other ranks at "
                    f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port} within 2 s") in last, err
            assert "PTUNIFIER_RENDEZVOUS_TIMEOUT_S=S waits longer" in last
            assert "Traceback" not in err
            assert not out.exists() and not synth.exists()
    finally:
        for *_, p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert time.monotonic() - start < 40  # the bound, not torch's 30 minutes


@pytest.mark.parametrize("script", ["train", "finetune"])
def test_train_and_finetune_check_the_environment_before_any_lock_or_data(
        monkeypatch, tmp_path, script):
    import finetune
    import train
    for k in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    main = {"train": train.main, "finetune": finetune.main}[script]
    flags = ["--task", "chexpert", "--init", "scratch"] if script == "finetune" else []
    with pytest.raises(SystemExit, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set"):
        main(["--preset", "tiny", "--out", str(tmp_path / "out"),
              "--synth-root", str(tmp_path / "world"), *flags])
    assert os.listdir(tmp_path) == []

def gather_worker(rank, world, store, out):
    import warnings
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x = (torch.arange(6.0).view(3, 2) + 10 * rank).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = distributed.gather_with_grad(x, rank, world)  # [world * 3, 2]
        # each rank's loss weighs every gathered row differently
        (y * (torch.arange(12.0).view(6, 2) + 1) ** (rank + 1)).sum().backward()
    torch.save({"y": y.detach(), "grad": x.grad, "warnings": [str(w.message) for w in caught]},
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_the_itc_gather_sends_each_rank_the_summed_gradient_of_its_rows_without_warnings(tmp_path):
    out = str(tmp_path / "gather")
    mp.spawn(gather_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    rows = torch.cat([torch.arange(6.0).view(3, 2) + 10 * r for r in range(2)])
    weight = torch.arange(12.0).view(6, 2) + 1
    summed = weight + weight ** 2  # d/dy of both ranks' losses
    for r, got in enumerate(ranks):
        assert torch.equal(got["y"], rows)
        assert torch.equal(got["grad"], summed[3 * r:3 * r + 3])
        assert got["warnings"] == [], got["warnings"]
