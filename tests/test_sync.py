"""train.py's step makes the host wait for the device once per optimizer step (the
non-finite decision in optim.all_finite), never inside a micro-step.

A CPU has no device to wait for, so the test looks for what would make a GPU's host wait: every read
of a tensor's value on the host (item, bool, float, int, tolist, numpy, cpu), the operations that
read one internally to size their result or check their input (nonzero and boolean-mask indexing,
masked_select, multinomial, bincount, unique, repeat_interleave, equal) and tensors made from host
data (torch.tensor: a blocking copy to the device). It runs train.py itself and watches each step
from the first micro-step's pretraining_loss to the end of optimizer_step, the stretch that must run
ahead of the device; MLM's masks are drawn on the host before it (objectives.mask_step).
"""

import collections
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from ptunifier_min import data, distributed, optim
from ptunifier_min.config import PRESETS, TrainConfig, build
from ptunifier_min.datasets import source

aten = torch.ops.aten
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

READS = {
    aten._local_scalar_dense.default: "reads a value on the host (item / bool / float / int)",
    aten.is_nonzero.default: "reads a value on the host",
    aten.equal.default: "torch.equal reads its answer on the host",
    aten.nonzero.default: "nonzero: the host needs the count to size the result",
    aten.masked_select.default: "masked_select: the host needs the count to size the result",
    aten.multinomial.default: "multinomial reads its weights on the host to check them",
    aten.bincount.default: "bincount reads the largest value on the host",
    aten._unique2.default: "unique: the host needs the count",
    aten.unique_consecutive.default: "unique_consecutive: the host needs the count",
    aten.unique_dim.default: "unique: the host needs the count",
    aten.repeat_interleave.Tensor: "repeat_interleave reads the repeats' sum",
    aten.lift_fresh.default: "a tensor made from host data: on a GPU, a "
                             "blocking copy to the device",
    aten.lift_fresh_copy.default: "a tensor made from host data: on a GPU, a "
                                  "blocking copy to the device",
}
INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
            aten._index_put_impl_.default)


def call_site():
    """The innermost frame of this repository's code (not torch's, not this test's)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(REPO) and not frame.filename.endswith("test_sync.py"):
            return f"{os.path.relpath(frame.filename, REPO)}:{frame.lineno} {frame.line}"
    return "?"


class SyncWatch(TorchDispatchMode):
    """Records every host read made while `watching`; `allowed` reads are the
    budgeted ones (all_finite's)."""

    def __init__(self):
        super().__init__()
        self.armed = self.watching = False
        self.found = collections.Counter()  # (why, where) -> times
        self.allowed = self.allowed_reads = self.steps = 0

    def record(self, why):
        if not self.watching:
            return
        if self.allowed and why.startswith("reads a value"):
            self.allowed -= 1
            self.allowed_reads += 1
            return
        self.found[why, call_site()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watching:
            if func in READS:
                self.record(READS[func])
            elif func in INDEXING and any(torch.is_tensor(i)
                                          and i.dtype == torch.bool for i in args[1]):
                self.record("boolean-mask indexing: the host needs the count to size the result")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    cfg = build(TrainConfig, {**PRESETS["tiny"], "synth_root": root})
    source.ensure_prepared(cfg, ["roco", "medicat", "mimic_cxr"], distributed.Dist(), print)
    return root


def watch_train(monkeypatch, argv):
    """Run train.main(argv), watching each step from its first pretraining_loss
    to the end of optimizer_step."""
    watch = SyncWatch()
    real_loss, real_step, real_finite, real_build = (train.pretraining_loss, optim.optimizer_step,
                                                     optim.all_finite, optim.build_optimizer)

    # the probe step before it may read: it runs once, before training
    def build_optimizer(*a, **k):
        watch.armed = True
        return real_build(*a, **k)

    def pretraining_loss(*a, **k):
        watch.watching = watch.armed
        return real_loss(*a, **k)

    def optimizer_step(*a, **k):
        out = real_step(*a, **k)
        watch.watching, watch.steps = False, watch.steps + 1
        return out

    def all_finite(*a, **k):
        watch.allowed = 1  # the one decision of a step: skip it or not
        try:
            return real_finite(*a, **k)
        finally:
            watch.allowed = 0

    # CPU AdamW keeps its step counters on the host and reads them there; on CUDA
    def host_step(opt_step):
        # build_optimizer picks the fused kernel, whose counters live on the device
        def step(self, *a, **k):
            watching, watch.watching = watch.watching, False
            try:
                return opt_step(self, *a, **k)
            finally:
                watch.watching = watching
        return step

    def python_read(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            watch.record(f"Tensor.{name} reads values on the host")
            return real(self, *a, **k)
        return read

    monkeypatch.setattr(optim, "build_optimizer", build_optimizer)
    monkeypatch.setattr(train, "pretraining_loss", pretraining_loss)
    monkeypatch.setattr(optim, "optimizer_step", optimizer_step)
    monkeypatch.setattr(optim, "all_finite", all_finite)
    monkeypatch.setattr(torch.optim.AdamW, "step", host_step(torch.optim.AdamW.step))
    # on a CPU these never reach the dispatcher
    for name in ("tolist", "numpy", "cpu", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, python_read(name))
    with watch:
        train.main(argv)
    return watch


def test_a_training_step_waits_for_the_device_once(synth_root, tmp_path, monkeypatch):
    """3 steps, 2 micro-steps each, a logging step among them; every objective, hard negatives and
    whole-word masking (both add draws), prompt pools (pool-usage counts). Fails on each of the
    waits a step can hide: bool(mask.all()) in every pass, chosen.any() in masking, boolean indexing
    of the MLM positions, ITM's lonely-row check and multinomial, the [CLS] [SEP] ids made in
    forward, bincount of the pool selections."""
    steps = 3
    watch = watch_train(monkeypatch, [str(a) for a in [
        "--preset", "tiny", "--synth-root", synth_root, "--out", tmp_path, "--precision", "fp32",
        "--steps", steps, "--log-every", 2, "--grad-accum", 2, "--batch-size", 4, "--eval-pairs", 0,
        "--itm-hard-negatives", "true", "--whole-word", "true"]])
    assert watch.steps == steps  # every step was watched
    found = "\n".join(f"  {n}x {why}: {where}" for (why, where), n in sorted(watch.found.items()))
    assert not watch.found, f"the host waits for the device inside a training step:\n{found}"
    assert watch.allowed_reads == steps, "optim.all_finite should read one flag per step"


def test_batches_bound_for_a_gpu_are_copied_from_pinned_memory(monkeypatch):
    """A copy to CUDA from pageable memory may wait for the device: to_device pins what the loader
    did not (the draws the host adds to a batch) and copies without blocking; nothing is pinned for
    a CPU run. Tensor methods are stubbed, so that a CPU-only build can run this."""
    pinned, copies = [], []
    # the loader pinned this one
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: self.shape == (3,))
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self, *a: pinned.append(tuple(self.shape)) or self)
    monkeypatch.setattr(torch.Tensor, "to",
                        lambda self, *a, **k: copies.append(k.get("non_blocking")) or self)
    # and draws
    batch = {"image": torch.zeros(3), "mlm_positions": torch.zeros(2, 2), "itm_split": ([1], [1])}
    out = data.to_device(batch, torch.device("cuda", 0))
    assert pinned == [(2, 2)] and copies == [True, True] and out["itm_split"] == ([1], [1])
    pinned.clear()
    data.to_device(batch, torch.device("cpu"))
    assert pinned == []
