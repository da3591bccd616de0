"""train.py end to end at the tiny preset: learning, checkpoints, exact resume after SIGKILL, torchrun, the NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from ptunifier_min import checkpoint, distributed
from ptunifier_min.datasets import source
from ptunifier_min.config import PRESETS, TrainConfig, build, from_dict
from ptunifier_min.model import PTUnifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    cfg = build(TrainConfig, {**PRESETS["tiny"], "synth_root": root})
    source.ensure_prepared(cfg, ["roco", "medicat", "mimic_cxr", "roco_retrieval"], distributed.Dist(), print)
    return root


def flags(synth_root, out, *extra):
    return ["--preset", "tiny", "--synth-root", synth_root, "--out", str(out), "--eval-pairs", "8", *map(str, extra)]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    last = {}
    for r in rows:  # a resumed run logs its steps again: the last line of a step counts
        if "mlm_loss" in r:
            last[r["step"]] = r
    return last


def test_tiny_run_learns_and_its_checkpoint_loads_back(synth_root, tmp_path):
    model = train.main(flags(synth_root, tmp_path, "--steps", 40, "--log-every", 5))
    log = read_log(tmp_path)
    first, last = log[min(log)], log[max(log)]
    assert last["mlm_loss"] < first["mlm_loss"] - 0.3, (first, last)
    assert last["itc_loss"] < first["itc_loss"]
    assert {"itm_acc", "itc_acc", "logit_scale", "lr_backbone", "pairs_per_s", "selected_visual_rows",
            "selected_textual_entropy"} <= set(last)
    ckpt = checkpoint.resolve_checkpoint(str(tmp_path))
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = from_dict(TrainConfig, json.load(f)["config"])
    loaded = PTUnifier(cfg.model)
    checkpoint.load_weights(ckpt, loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert os.path.isfile(os.path.join(ckpt, "tokenizer.json"))
    assert set(load_file(os.path.join(ckpt, "model.safetensors"))) == set(model.state_dict())


def test_sigkill_then_resume_equals_uninterrupted_run(synth_root, tmp_path):
    common = ["--steps", 12, "--save-every", 4, "--log-every", 1, "--precision", "fp32"]
    reference = train.main(flags(synth_root, tmp_path / "ref", *common))
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *flags(synth_root, out, *common)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it somewhere after the step-8 checkpoint, mid-epoch, before the end
        latest = out / "latest"
        if latest.exists() and latest.read_text().strip() >= "step_0000008":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "latest").read_text().strip() in ("step_0000008", "step_0000012")
    resumed = train.main(flags(synth_root, out, *common, "--resume", out))
    ref_log, res_log = read_log(tmp_path / "ref"), read_log(out)
    assert sorted(res_log) == list(range(1, 13))
    for step in range(1, 13):
        for k in ("mlm_loss", "itm_loss", "itc_loss"):
            assert res_log[step][k] == ref_log[step][k], (step, k)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_torchrun_two_processes_stay_identical(synth_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), *flags(synth_root, tmp_path, "--steps", 6, "--batch-size", 4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "all 2 ranks hold identical parameters" in run.stdout
    assert "global batch 8 = 4 per device x 1 accumulation x 2 ranks" in run.stdout
    assert checkpoint.resolve_checkpoint(str(tmp_path)).endswith("step_0000006")
    assert "on 8 synthetic ROCO test pairs" in run.stdout  # no --data-root: the embedded world
    # pool usage counts every rank's selections: what 1 process selects for the same global batch (before: rank 0's)
    train.main(flags(synth_root, tmp_path / "one", "--steps", 6, "--batch-size", 8))
    two, one = read_log(tmp_path), read_log(tmp_path / "one")
    assert sorted(two) == sorted(one) == [5, 6]
    for step in one:
        for k in ("selected_visual", "selected_textual"):
            assert two[step][f"{k}_rows"] == one[step][f"{k}_rows"], (step, k)
            assert two[step][f"{k}_entropy"] == pytest.approx(one[step][f"{k}_entropy"], rel=1e-9), (step, k)


def test_logged_loss_is_the_weighted_total_and_real_data_is_not_called_synthetic(synth_root, tmp_path, capsys):
    prepared = os.path.join(synth_root, "tiny", "prepared")  # given as --data-root, as a user's prepared data is
    train.main(["--preset", "tiny", "--data-root", prepared, "--out", str(tmp_path), "--eval-pairs", "8",
                "--steps", "3", "--log-every", "1", "--w-mlm", "0.5", "--w-itc", "2"])
    out = capsys.readouterr().out
    assert "zero-shot retrieval on 8 ROCO test pairs" in out
    log = read_log(tmp_path)
    assert sorted(log) == [1, 2, 3]
    for rec in log.values():  # the optimised total, not the unweighted sum
        assert rec["loss"] == pytest.approx(0.5 * rec["mlm_loss"] + rec["itm_loss"] + 2 * rec["itc_loss"], rel=1e-6)


def test_non_finite_steps_are_skipped_then_stop_training(synth_root, tmp_path, monkeypatch):
    real = train.pretraining_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, stats, selections = real(*args, **kwargs)
        calls["n"] += 1
        step = calls["n"] - 1  # call 1 is the probe that finds the parameters to freeze
        if step == 3 or step >= 7:  # one isolated bad step, then a run of them
            loss = loss * float("nan")
        return loss, stats, selections

    monkeypatch.setattr(train, "pretraining_loss", poisoned)
    with pytest.raises(FloatingPointError, match="consecutive non-finite"):
        train.main(flags(synth_root, tmp_path, "--steps", 20, "--save-every", 5, "--log-every", 1,
                         "--max-skips", 3))
    with open(tmp_path / "log.jsonl") as f:
        skipped = [json.loads(line)["step"] for line in f if "skipped" in line]
    assert skipped == [3, 7, 8, 9]
    assert checkpoint.resolve_checkpoint(str(tmp_path)).endswith("step_0000005")  # the last good checkpoint is intact
    model = PTUnifier(from_dict(TrainConfig, json.load(open(tmp_path / "config.json"))).model)
    checkpoint.load_weights(str(tmp_path), model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
