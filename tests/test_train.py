"""train.py end to end at the tiny preset: learning, checkpoints, exact resume after SIGKILL and
after a stop signal (one process, two ranks), torchrun, the NaN guard."""

import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import train
from conftest import signals_at
from ptunifier_min import checkpoint, distributed, optim
from ptunifier_min.datasets import source
from ptunifier_min.config import PRESETS, TrainConfig, build, from_dict
from ptunifier_min.model import PTUnifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    cfg = build(TrainConfig, {**PRESETS["tiny"], "synth_root": root})
    source.ensure_prepared(cfg, ["roco", "medicat", "mimic_cxr", "roco_retrieval"],
                           distributed.Dist(), print)
    return root


def flags(synth_root, out, *extra):
    return ["--preset", "tiny", "--synth-root", synth_root, "--out", str(out),
            "--eval-pairs", "8", *map(str, extra)]


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
    assert {"itm_acc", "itc_acc", "logit_scale", "lr_backbone", "pairs_per_s",
            "selected_visual_rows", "selected_textual_entropy"} <= set(last)
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
    # kill it somewhere after the step-8 checkpoint, mid-epoch, before the end
    while time.time() < deadline:
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


STOP_FLAGS = ["--steps", 6, "--save-every", 100, "--log-every", 1, "--precision", "fp32",
              "--eval-pairs", 0]


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory):
    """The weights of the run the stop-signal tests stop, run to its end without a stop."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return train.main(flags(synth_root, out, *STOP_FLAGS)).state_dict()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_to_the_whole_job_saves_the_step_in_flight_and_resumes_exactly(
        synth_root, tmp_path, sig, uninterrupted):
    """A cluster stopping the job (SIGTERM, or SLURM's SIGUSR1 warning) signals every process,
    data-loader workers included: the run finishes its step, saves it (there was no checkpoint
    before: --save-every 100), says where and exits with 128 + the signal; resumed (without
    workers: they change no batch), it ends with the uninterrupted run's weights."""
    out = tmp_path / "stopped"
    cmd = [sys.executable, os.path.join(REPO, "train.py"),
           *flags(synth_root, out, *STOP_FLAGS, "--num-workers", 2)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own process group, as a job's
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # signal it after its second step
        log = out / "log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-3000:]
    ckpt = checkpoint.resolve_checkpoint(str(out))
    stopped_at = int(ckpt[-7:])
    assert 2 <= stopped_at < 6 and max(read_log(out)) == stopped_at
    assert err.strip().splitlines()[-1] == (
        f"{signal.Signals(sig).name}: stopped; the last checkpoint is {ckpt}: run the same command "
        f"with --resume {out}")
    resumed = train.main(flags(synth_root, out, *STOP_FLAGS, "--resume", out))
    for k, v in uninterrupted.items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_a_second_stop_signal_during_the_save_leaves_that_checkpoint_whole(
        synth_root, tmp_path, monkeypatch, stop_lines):
    """SIGTERM during step 3, then SIGINT as the checkpoint of step 3 replaces `latest` (under
    torchrun a Ctrl-C reaches a rank twice): the save completes, and the run exits for the first
    signal."""
    step = optim.optimizer_step
    monkeypatch.setattr(optim, "optimizer_step", signals_at(3, step, signal.SIGTERM))
    real_write = checkpoint.write_atomic

    def write_and_interrupt(path, text):
        if os.path.basename(path) == "latest":
            os.kill(os.getpid(), signal.SIGINT)
        return real_write(path, text)

    monkeypatch.setattr(checkpoint, "write_atomic", write_and_interrupt)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(flags(synth_root, out, *STOP_FLAGS))
    assert e.value.code == 128 + signal.SIGTERM
    ckpt = checkpoint.resolve_checkpoint(str(out))
    assert ckpt.endswith("step_0000003") and not [n for n in os.listdir(out) if "tmp" in n]
    with open(os.path.join(ckpt, "config.json")) as f:
        model = PTUnifier(from_dict(TrainConfig, json.load(f)["config"]).model)
    checkpoint.load_weights(ckpt, model)
    assert checkpoint.load_trainer_state(ckpt)["step"] == 3
    assert stop_lines == [f"SIGTERM: stopped; the last checkpoint is {ckpt}: run the same command "
                          f"with --resume {out}"]


def _stop_on_one_rank(rank, world, synth_root, out, port, run):
    """One rank of a 2-process pre-training run, one run per process (a process group is set up
    once per process, as under torchrun): "stopped", where SIGUSR1 reaches rank 1 alone in step 3;
    "resumed" from it; "ref", the same run uninterrupted."""
    # a rank stuck in a collective says where, and exits: the test fails with that, not a wait
    faulthandler.dump_traceback_later(300, exit=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    common = [*STOP_FLAGS, "--steps", 5, "--batch-size", 4]
    if run == "stopped":
        if rank == 1:
            optim.optimizer_step = signals_at(3, optim.optimizer_step, signal.SIGUSR1)
        with pytest.raises(SystemExit) as e:
            train.main(flags(synth_root, f"{out}/stopped", *common))
        # every rank, not only the one signalled
        assert e.value.code == 128 + signal.SIGUSR1, (rank, e.value.code)
        if rank == 0:
            assert checkpoint.resolve_checkpoint(f"{out}/stopped").endswith("step_0000003")
    elif run == "resumed":
        train.main(flags(synth_root, f"{out}/stopped", *common, "--resume", f"{out}/stopped"))
    else:
        train.main(flags(synth_root, f"{out}/ref", *common))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stop_signal_on_one_rank_stops_every_rank_after_the_same_step(synth_root, tmp_path):
    for run in ("stopped", "resumed", "ref"):
        mp.spawn(_stop_on_one_rank, args=(2, synth_root, str(tmp_path), _free_port(), run),
                 nprocs=2, join=True)
    wa, wb = (load_file(os.path.join(checkpoint.resolve_checkpoint(str(tmp_path / p)),
                                     "model.safetensors")) for p in ("ref", "stopped"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_torchrun_two_processes_stay_identical(synth_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"),
           *flags(synth_root, tmp_path, "--steps", 6, "--batch-size", 4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "all 2 ranks hold identical parameters" in run.stdout
    assert "global batch 8 = 4 per device x 1 accumulation x 2 ranks" in run.stdout
    assert checkpoint.resolve_checkpoint(str(tmp_path)).endswith("step_0000006")
    assert "on 8 synthetic ROCO test pairs" in run.stdout  # no --data-root: the embedded world
    # pool usage counts every rank's selections: what 1 process selects for the same
    # global batch (before: rank 0's)
    train.main(flags(synth_root, tmp_path / "one", "--steps", 6, "--batch-size", 8))
    two, one = read_log(tmp_path), read_log(tmp_path / "one")
    assert sorted(two) == sorted(one) == [5, 6]
    for step in one:
        for k in ("selected_visual", "selected_textual"):
            assert two[step][f"{k}_rows"] == one[step][f"{k}_rows"], (step, k)
            assert (two[step][f"{k}_entropy"]
                    == pytest.approx(one[step][f"{k}_entropy"], rel=1e-9)), (step, k)


def test_logged_loss_is_the_weighted_total_and_real_data_is_not_called_synthetic(
        synth_root, tmp_path, capsys):
    # given as --data-root, as a user's prepared data is
    prepared = os.path.join(synth_root, "tiny", "prepared")
    train.main(["--preset", "tiny", "--data-root", prepared, "--out", str(tmp_path),
                "--eval-pairs", "8", "--steps", "3", "--log-every", "1",
                "--w-mlm", "0.5", "--w-itc", "2"])
    out = capsys.readouterr().out
    assert "zero-shot retrieval on 8 ROCO test pairs" in out
    log = read_log(tmp_path)
    assert sorted(log) == [1, 2, 3]
    for rec in log.values():  # the optimised total, not the unweighted sum
        assert rec["loss"] == pytest.approx(0.5 * rec["mlm_loss"] + rec["itm_loss"]
                                            + 2 * rec["itc_loss"], rel=1e-6)


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
    # the last good checkpoint is intact
    assert checkpoint.resolve_checkpoint(str(tmp_path)).endswith("step_0000005")
    model = PTUnifier(from_dict(TrainConfig, json.load(open(tmp_path / "config.json"))).model)
    checkpoint.load_weights(str(tmp_path), model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
