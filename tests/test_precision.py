"""--precision auto by the device's capability, the attention kernel by device and precision,
and the CPU runs' malloc setting. No test here depends on the machine's own CPU: the
flags are monkeypatched or read from files written here."""

import os
import subprocess
import sys

import pytest
import torch

from ptunifier_min import distributed
from ptunifier_min.model import attend

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
FLAGS = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2 avx avx2 "
         "avx512f avx512bw")


@pytest.mark.parametrize("flags, cpu", [(set(), "fp32"), ({"avx512_bf16"}, "bf16"),
                                        ({"amx_bf16"}, "bf16"),
                                        ({"avx512_bf16", "amx_bf16"}, "bf16")])
def test_auto_precision_follows_the_cpu_flags(monkeypatch, flags, cpu):
    monkeypatch.setattr(distributed, "cpu_bf16_flags", lambda: flags)
    assert distributed.resolve_precision("auto", CPU) == cpu
    # every CUDA card we train on has bf16 tensor cores
    assert distributed.resolve_precision("auto", CUDA) == "bf16"
    assert distributed.resolve_precision("auto", MPS) == "fp32"
    for forced in ("fp32", "bf16"):  # an explicit choice is never overridden
        assert distributed.resolve_precision(forced, CPU) == forced
    with pytest.raises(ValueError, match="--precision must be auto, bf16 or fp32, got 'fp16'"):
        distributed.resolve_precision("fp16", CPU)


def test_cpu_bf16_flags_reads_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.delenv("PTUNIFIER_NO_CPU_BF16", raising=False)

    def cpuinfo(flags):
        p = tmp_path / "cpuinfo"
        p.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\nbugs\t\t: "
                     f"avx512_bf16_bug\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        return str(p)
    # AVX2 / AVX512 without bf16: emulated, slow
    assert distributed.cpu_bf16_flags(cpuinfo(FLAGS)) == set()
    assert (distributed.cpu_bf16_flags(cpuinfo(FLAGS + " avx512_bf16 avx512_vnni"))
            == {"avx512_bf16"})
    assert (distributed.cpu_bf16_flags(cpuinfo(FLAGS + " amx_bf16 amx_tile avx512_bf16"))
            == {"amx_bf16", "avx512_bf16"})
    assert distributed.cpu_bf16_flags(cpuinfo("avx512_bf16x")) == set()  # whole flags only
    # no /proc/cpuinfo (not Linux): fp32
    assert distributed.cpu_bf16_flags(str(tmp_path / "absent")) == set()
    # the suite's switch (conftest.py) empties it whatever the CPU says
    monkeypatch.setenv("PTUNIFIER_NO_CPU_BF16", "1")
    assert distributed.cpu_bf16_flags(cpuinfo(FLAGS + " avx512_bf16")) == set()


def test_attention_kernel_by_device_and_precision(monkeypatch):
    """CPU fp32: the fused SDPA kernel. CPU bf16: the textbook formula, which ran faster there
    (model.attend). Both agree with an fp64 reference to their precision; the SDPA-vs-manual
    equivalence tests live in test_model.py."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    ref = attend(q.double(), k.double(), v.double(), mask, manual=True)

    out = attend(q, k, v, mask)
    assert len(calls) == 1  # fp32 on a CPU: SDPA
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = attend(qb, kb, vb, mask)
    # bf16 on a CPU: not SDPA, the textbook formula
    assert len(calls) == 1 and out.dtype == torch.bfloat16
    assert torch.equal(out, attend(qb, kb, vb, mask, manual=True))
    torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.05)
    # as in training: autocast hands attend bf16 q, k, v
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear = torch.nn.Linear(16, 16)
        attend(linear(q), linear(k), linear(v), mask)
    assert len(calls) == 1


FAULTS = """
import resource, sys, torch
import train  # a run's imports: with a bare heap, a small allocation can split the freed region
from ptunifier_min import distributed
kept = distributed.keep_freed_memory() if sys.argv[1] == "keep" else None

def step():  # eight 20 MB activations made, then all freed, as in a training step
    return sum(float(x[0]) for x in [torch.ones(5_000_000) for _ in range(8)])

step()  # warm-up: the heap grows to what a step needs
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_cpu_runs_keep_freed_memory_instead_of_faulting_it_in_again():
    """By default glibc gives a step's freed activations back to the OS, so the next step's are
    fresh pages (~4,900 faults per 20 MB); after keep_freed_memory (what setup_distributed does for
    CPU runs) the heap serves them again."""
    root = os.path.dirname(os.path.dirname(__file__))
    runs = {mode: subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                                 text=True, check=True,
                                 cwd=root).stdout.split() for mode in ("keep", "default")}
    if runs["keep"][0] != "True":
        pytest.skip("the C library is not glibc")
    default, kept = int(runs["default"][1]), int(runs["keep"][1])
    # measured here: default 43,868 or 195,105 faults (how much of the freed memory went back to
    # the OS varies from run to run), kept 0 or 4,883 (one tensor faulted in once in five steps)
    assert default >= 5 * 8 * 10 and kept < default / 5, (default, kept)
