"""The benchmark's logic, not its timings: how it times (interleaved rounds, medians,
compile time kept apart), that its HF ViLT reference has our tower's shapes, and that one
short run prints every section."""

import os
import subprocess
import sys

import pytest
import torch

from ptunifier_min.config import ModelConfig
from ptunifier_min.model import PTUnifier
from tools import bench


def test_rates_interleave_rounds_and_keep_the_first_call_apart(monkeypatch):
    calls, clock = [], [0.0]
    # first call = "compile", then steps
    durations = {"a": [50.0, 1.0, 1.0, 3.0, 2.0], "b": [7.0, 2.0, 4.0, 1.0, 9.0]}

    def make(name):
        def fn():
            calls.append(name)
            clock[0] += durations[name][min(calls.count(name), len(durations[name])) - 1]
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    rates, first = bench._rates({"a": make("a"), "b": make("b")}, torch.device("cpu"),
                                seconds=3.0, rounds=3)
    # two warm-up calls each, then the rounds alternate a, b, a, b... (one call per
    # round: seconds / rounds = 1 s)
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    # the compile-sized first call is reported, not timed into the rate
    assert first == {"a": 50.0, "b": 7.0}
    assert rates["a"] == pytest.approx(1 / 2.0)  # rounds took 1, 3, 2 s: the median
    # rounds took 4, 1, 9 s: the median, not the mean (4.7 s)
    assert rates["b"] == pytest.approx(1 / 4.0)


def test_vilt_reference_has_our_towers_shapes():
    transformers = pytest.importorskip("transformers")
    mc = ModelConfig(dim=64, depth=2, heads=4, image_size=32, patch_size=8,
                     max_text_len=12, vocab_size=500)
    vilt, inputs = bench.vilt_reference(mc, 3, torch.device("cpu"))
    assert isinstance(vilt, transformers.ViltModel)
    ours = PTUnifier(mc)
    # same blocks: QKV, output projection, MLP and two norms per layer, parameter for parameter
    assert (sum(p.numel() for p in vilt.encoder.parameters())
            == sum(p.numel() for p in ours.blocks.parameters()))
    assert (vilt.embeddings.text_embeddings.word_embeddings.weight.shape
            == ours.word_embeddings.weight.shape)
    assert (vilt.embeddings.patch_embeddings.projection.weight.shape
            == ours.patch_embed.proj.weight.shape)
    out = vilt(**inputs)
    # the same sequence: [CLS] + patches + text
    assert out.last_hidden_state.shape == (3, 1 + 16 + 12, 64)


def test_help():
    r = subprocess.run([sys.executable, bench.__file__, "--help"], capture_output=True, text=True,
                       cwd=os.path.dirname(bench.__file__))
    assert r.returncode == 0 and "--modes" in r.stdout and "--rounds" in r.stdout


def test_short_run_prints_every_section(capsys):
    bench.main(["--presets", "tiny", "--precisions", "fp32", "--modes", "eager",
                "--seconds", "0.05", "--rounds", "1", "--loader-images", "1", "--decode-dim", "8",
                "--decode-len", "6", "--retrieval-sizes", "300", "--retrieval-dims", "8"])
    out = capsys.readouterr().out
    for section in ("peak fp32", "| tiny (B=64) | 0.2M | fp32 | backbone | eager |",
                    "| backbone, every row | eager |", "| pass: image-only | eager |",
                    "| pass: text-only | eager |", "| pass: pair, MLM | eager |",
                    "share of the full step's time in its four passes:", "| full step | eager |",
                    "x backbone |", "ratios (same run", "loader", "images per rank and micro-step",
                    "beam search", "cached / uncached", "retrieval ranking", "| 300 | 8 | 0 |"):
        assert section in out, section
    if bench.vilt_reference(ModelConfig(), 1, torch.device("cpu")) is not None:
        assert "| ViLT | eager |" in out and "x ViLT |" in out
