"""Run folders are owned, and resuming is honest: a lock per --out, no re-run into an
earlier run unless --resume or --overwrite (which moves it aside), keep-last that deletes only this
run's checkpoints, atomic writes that say "disk full", resume that refuses what cannot change and
applies what may (learning rates included), a log cut back to the resumed step, and SIGTERM / SIGINT
that say where the last checkpoint is and how to resume. What a killed run leaves is removed when it
starts again; --resume of the other script's run is refused naming the right script; clear errors
reach the user without a traceback."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import finetune
import train
from ptunifier_min.tokenizer import load_tokenizer
from ptunifier_min.files import write_json
from ptunifier_min import checkpoint, distributed, files, optim, runs, tasks
from ptunifier_min.config import FINETUNE_PRESETS, PRESETS, FinetuneConfig, TrainConfig, build, \
    from_dict
from ptunifier_min.model import PTUnifier
from ptunifier_min.datasets.source import ensure_prepared, train_tokenizer
from test_finetune import killed_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny synthetic world at the place test_finetune.py uses, so that
    one session prepares it once."""
    root = str(tmp_path_factory.getbasetemp() / "ptu_world")
    cfg = build(FinetuneConfig, {**FINETUNE_PRESETS["tiny"], "synth_root": root})
    ensure_prepared(cfg, ["roco", "medicat", "mimic_cxr", tasks.TASKS["chexpert"].folder],
                    distributed.Dist(), lambda *a: None)
    return root


def pretrain(world, out, *extra):
    return train.main(["--preset", "tiny", "--synth-root", world, "--out", str(out),
                       "--eval-pairs", "0", "--precision", "fp32", *map(str, extra)])


def log_steps(out):
    """The steps of the training records in out/log.jsonl, in file order
    (validation records left out)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if any(k.endswith("loss") for k in r)]


def loads(ckpt):
    """The checkpoint exists, its config rebuilds its model and its weights load into it."""
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)["config"]
    model = PTUnifier((from_dict(FinetuneConfig, cfg)
                       if "task" in cfg else from_dict(TrainConfig, cfg)).model)
    # a fine-tuned checkpoint also holds its task head: check the backbone's tensors
    if "task" in cfg:
        state = load_file(os.path.join(ckpt, "model.safetensors"))
        own = model.state_dict()
        return all(state[f"backbone.{k}"].shape == v.shape for k, v in own.items())
    checkpoint.load_weights(ckpt, model)
    return True


def tiny_model():
    cfg = build(TrainConfig, PRESETS["tiny"])
    return cfg, PTUnifier(cfg.model)


# ---- keep-last, atomic writes, the log -----------------------------------------------------------
def test_keep_last_removes_only_the_checkpoints_this_run_wrote(tmp_path):
    """The issue's `--steps 20` then `--steps 10 --save-every 10`: the old rule kept the last
    of sorted(step_*), so an earlier run's step_0000020 outlived the new step_0000010 and
    `latest` named a deleted folder."""
    cfg, model = tiny_model()
    checkpoint.save_checkpoint(str(tmp_path / "earlier"), 20, model, cfg, {"step": 20})
    # written by another process
    os.replace(tmp_path / "earlier" / "step_0000020", tmp_path / "step_0000020")
    checkpoint.save_checkpoint(str(tmp_path), 10, model, cfg, {"step": 10})
    assert (checkpoint.resolve_checkpoint(str(tmp_path)).endswith("step_0000010")
            and loads(tmp_path / "step_0000010"))
    assert (tmp_path / "step_0000020").is_dir()  # not ours to delete
    checkpoint.save_checkpoint(str(tmp_path), 15, model, cfg, {"step": 15})
    assert not (tmp_path / "step_0000010").exists() and (tmp_path / "step_0000020").is_dir()
    assert checkpoint.resolve_checkpoint(str(tmp_path)).endswith("step_0000015")


def test_full_disk_during_a_checkpoint_says_so_and_leaves_the_previous_one(tmp_path, monkeypatch):
    cfg, model = tiny_model()
    checkpoint.save_checkpoint(str(tmp_path), 5, model, cfg, {"step": 5})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OSError, match="disk full") as e:
        checkpoint.save_checkpoint(str(tmp_path), 10, model, cfg, {"step": 10})
    assert str(tmp_path / "step_0000010") in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0000005"]  # no .tmp_ folder left behind
    assert (checkpoint.resolve_checkpoint(str(tmp_path)).endswith("step_0000005")
            and loads(tmp_path / "step_0000005"))


class _FullDisk:
    """A file whose writes stop half-way with ENOSPC, as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, s):
        self.f.write(s[:len(s) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_during_a_json_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(str(path), {"before": 1})

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode else f

    for module in (checkpoint, files):  # wherever the writer lives, its open() meets a full disk
        monkeypatch.setattr(module, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(OSError, match="disk full") as e:
        write_json(str(path), {"after": 2})
    assert str(path) in str(e.value)
    monkeypatch.undo()
    assert (os.listdir(tmp_path) == ["results.json"]
            and json.loads(path.read_text()) == {"before": 1})


@pytest.mark.parametrize("name", ["model.safetensors", "trainer.pt"])
def test_full_disk_while_writing_the_weights_or_trainer_state_says_so(tmp_path, monkeypatch, name):
    """On a full disk the file writers of safetensors and torch say "SafetensorError: ... I/O error"
    and "unexpected pos 576 vs 534"; the files are written through Python's, whose ENOSPC is
    reported as a full disk."""
    cfg, model = tiny_model()
    checkpoint.save_checkpoint(str(tmp_path), 5, model, cfg, {"step": 5})

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        return _FullDisk(f) if os.path.basename(file) == name and "w" in mode else f

    monkeypatch.setattr(checkpoint, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(OSError, match="disk full") as e:
        checkpoint.save_checkpoint(str(tmp_path), 10, model, cfg, {"step": 10})
    assert e.value.errno == errno.ENOSPC and str(tmp_path / "step_0000010") in str(e.value)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0000005"]  # no .tmp_ folder left behind
    assert checkpoint.resolve_checkpoint(str(tmp_path)).endswith("step_0000005")
    assert loads(tmp_path / "step_0000005")


def test_full_disk_and_damaged_checkpoints_end_the_scripts_with_the_message_alone(tmp_path):
    """The scripts' top level: an error whose message says everything is not wrapped in a
    traceback."""
    def full_disk():
        raise checkpoint.write_error(OSError(errno.ENOSPC, "No space left on device"),
                                     str(tmp_path / "step_0000010"))

    with pytest.raises(SystemExit, match="^error: could not write .*step_0000010: disk full"):
        runs.run_script(full_disk)
    cfg, model = tiny_model()
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"model": {"vocab": {f"w{i}": i for i in range(200)}}}))
    checkpoint.save_checkpoint(str(tmp_path / "run"), 5, model, cfg, {"step": 5},
                               files=[str(tokenizer)])
    damaged = tmp_path / "run" / "step_0000005" / "tokenizer.json"
    damaged.write_text(damaged.read_text().replace("w1", "w7"))
    for ckpt, message in ((tmp_path / "nothing", "no checkpoint at"),
                          (tmp_path / "run", f"truncated tokenizer {damaged}")):
        run = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--ckpt", str(ckpt)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert run.stderr.startswith("error: ") and message in run.stderr, run.stderr


def test_log_is_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7))
                    + '{"step": 7, "lo')
    log = runs.Log(str(path), True, resume_step=4)
    log.write({"step": 5, "loss": 0.5})
    log.f.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert os.listdir(tmp_path) == ["log.jsonl"]


def test_a_killed_runs_temporaries_are_removed_when_it_is_resumed_or_overwritten(tmp_path, capsys):
    """What SIGKILL leaves in the middle of a save (a half-written step folder) or of a removal (a
    renamed old one), in the run folder and in fine-tuning's train_state: removed, and said, at
    the next start of the same run."""
    cfg, model = tiny_model()
    for how in ("resume", "overwrite"):
        out = tmp_path / how
        checkpoint.save_checkpoint(str(out / "train_state"), 5, model, cfg, {"step": 5})
        left = [out / ".tmp_step_0000010.4242", out / "train_state" / ".tmp_step_0000010.4242",
                out / ".tmp_step_0000005.4242.old"]
        for folder in left:
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half of it")
        runs.claim_run_folder(str(out), resume=str(out) if how == "resume" else "",
                                    overwrite=how == "overwrite",
                                    checkpoints=str(out / "train_state"))
        assert not [p for p in left if p.exists()]
        assert not [p for p in out.rglob(".tmp_*")], how  # nor moved aside by --overwrite
        printed = capsys.readouterr().out
        assert (f"removed what a killed run left unfinished: {left[2]}, {left[0]}, {left[1]}"
                in printed), printed
    resumed = tmp_path / "resume" / "train_state"
    assert checkpoint.resolve_checkpoint(str(resumed)).endswith("step_0000005")


# ---- the lock ------------------------------------------------------------------------------------
def test_second_run_on_one_out_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import sys, time; sys.path.insert(0, {REPO!r}); "
                               "from ptunifier_min import runs; "
                               f"runs.claim_run_folder({str(out)!r}); "
                               "print('claimed', flush=True); "
                               "time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(SystemExit,
                           match=f"in use by another run \\(pid {holder.pid} on .*, started "):
            runs.claim_run_folder(str(out))
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    runs.claim_run_folder(str(out))  # the kernel dropped the lock with the process


def test_unwritable_out_is_refused_before_any_data_is_read(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out"):
        runs.claim_run_folder(str(tmp_path / "a_file" / "run"))
    with pytest.raises(SystemExit, match="cannot write to --out"):
        train.main(["--preset", "tiny", "--synth-root", str(tmp_path / "world"),
                    "--out", str(tmp_path / "a_file")])
    assert not (tmp_path / "world").exists()  # stopped before the synthetic world was made


# ---- train.py end to end -------------------------------------------------------------------------
def test_rerun_into_an_earlier_run_is_refused_and_overwrite_moves_it_aside(world, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(world, out, "--steps", 4, "--save-every", 2)
    with pytest.raises(SystemExit, match="holds an earlier run .*--resume.*--overwrite"):
        pretrain(world, out, "--steps", 2, "--save-every", 2)
    assert (checkpoint.resolve_checkpoint(str(out)).endswith("step_0000004")
            and loads(out / "step_0000004"))

    pretrain(world, out, "--steps", 2, "--save-every", 2, "--overwrite")
    # data.json: what the run read
    moved = "config.json, data.json, latest, log.jsonl, step_0000004"
    assert f"--overwrite: moved the earlier run's {moved} aside" in capsys.readouterr().out
    assert (checkpoint.resolve_checkpoint(str(out)).endswith("step_0000002")
            and loads(out / "step_0000002"))
    aside = [n for n in os.listdir(out) if n.startswith(".replaced-")]
    assert len(aside) == 1 and loads(checkpoint.resolve_checkpoint(str(out / aside[0])))
    assert max(log_steps(out)) == 2  # a fresh log, not the earlier run's with this one appended


def test_resume_refuses_what_cannot_change(world, tmp_path):
    out = tmp_path / "run"
    pretrain(world, out, "--steps", 2, "--save-every", 2)
    with pytest.raises(SystemExit) as e:
        pretrain(world, out, "--steps", 4, "--resume", out, "--batch-size", 4,
                 "--query-pooling", "max", "--itc-temperature", 0.1,
                 "--objectives", "mlm,itc", "--seed", 1)
    message = str(e.value)
    for name in ("--batch-size 8 -> 4", "--query-pooling 'mean' -> 'max'",
                 "--itc-temperature 0.07 -> 0.1",
                 "--objectives 'mlm,itm,itc' -> 'mlm,itc'", "--seed 0 -> 1"):
        assert name in message, message
    assert "--steps" not in message  # a resumed run may run longer


def test_resume_from_nothing_is_an_error_naming_the_flag(world, tmp_path):
    with pytest.raises(SystemExit, match="--resume .*: no checkpoint at"):
        pretrain(world, tmp_path / "run", "--resume", tmp_path / "nothing")


def test_resume_applies_new_learning_rates_and_logs_every_step_once(world, tmp_path,
                                                                    monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--steps", 8, "--save-every", 4, "--log-every", 1]
    real = train.pretraining_loss
    # killed in step 7; call 1 is the probe that finds the parameters to freeze
    monkeypatch.setattr(train, "pretraining_loss", killed_at(1 + 7, real))
    with pytest.raises(KeyboardInterrupt):
        pretrain(world, out, *common)
    monkeypatch.setattr(train, "pretraining_loss", real)
    assert (log_steps(out) == [1, 2, 3, 4, 5, 6]
            and checkpoint.resolve_checkpoint(str(out)).endswith("step_0000004"))

    capsys.readouterr()
    pretrain(world, out, *common, "--resume", out, "--lr-backbone", 5e-4, "--lr-head", 5e-4)
    schedule = optim.warmup_linear(8, TrainConfig().warmup_frac)
    rows = {r["step"]: r for r in map(json.loads, open(out / "log.jsonl")) if "lr_backbone" in r}
    # the new peak, at the resumed position of the schedule (the old code kept 1e-3)
    for step in (5, 6, 7):
        assert rows[step]["lr_backbone"] == pytest.approx(5e-4 * schedule(step)), step
    assert log_steps(out) == list(range(1, 9))  # steps 5 and 6 once, from the resumed run
    assert ("changed for the rest of the run: --lr-backbone 0.001 -> 0.0005, "
            "--lr-head 0.001 -> 0.0005" in capsys.readouterr().out)
    assert json.loads((out / "config.json").read_text())["lr_head"] == 5e-4


def test_resuming_the_other_scripts_run_names_the_script_that_continues_it(world, tmp_path):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    pretrain(world, pre, "--steps", 2, "--save-every", 2)
    fine_tune(world, "--steps", 2, "--out", fine)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(SystemExit, match=f"--resume {fine} is a fine-tuning run: continue it with "
                                         f"python finetune.py --resume {fine}"):
        pretrain(world, fine, "--steps", 4, "--resume", fine)
    with pytest.raises(SystemExit, match=f"--resume {pre} is a pre-training run: continue it with "
                                         f"python train.py --resume {pre} and its flags; "
                                         f"fine-tune from it with --init {pre}"):
        fine_tune(world, "--steps", 4, "--out", pre, "--resume", pre)
    # refused before anything was touched
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_says_where_the_checkpoint_is_and_how_to_resume(world, tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--preset", "tiny",
           "--synth-root", world, "--out", str(out), "--eval-pairs", "0", "--steps", "100000",
           "--save-every", "2", "--log-every", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    last = err.strip().splitlines()[-1]
    ckpt = checkpoint.resolve_checkpoint(str(out))
    assert last.startswith(f"{signal.Signals(sig).name}: stopped; the last "
                           f"checkpoint is {ckpt}") and \
        last.endswith(f"--resume {out}"), last
    assert loads(ckpt) and not [n for n in os.listdir(out) if n.startswith(".tmp")]
    runs.claim_run_folder(str(out), resume=str(out))  # the lock went with the process


# ---- finetune.py ---------------------------------------------------------------------------------
def fine_tune(world, *extra):
    finetune.main(["--preset", "tiny", "--synth-root", world,
                   "--task", "chexpert", "--init", "scratch", "--eval-every", "2",
                   "--precision", "fp32", *map(str, extra)])


def test_finetune_rerun_into_its_default_folder(world, tmp_path, monkeypatch):
    """The issue's case: a re-run into the default folder exited 0 with results.json
    naming a deleted checkpoint."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "finetune" / "chexpert-scratch"
    fine_tune(world, "--steps", 4)
    with pytest.raises(SystemExit, match="holds an earlier run"):
        fine_tune(world, "--steps", 2)
    fine_tune(world, "--steps", 2, "--overwrite")
    results = json.loads((out / "results.json").read_text())
    assert results["best_step"] == 2 and loads(results["checkpoint"])
    assert os.path.samefile(checkpoint.resolve_checkpoint(str(out)), results["checkpoint"])


def test_finetune_resume_refuses_what_cannot_change_and_cuts_the_log(world, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "ft"
    real = optim.optimizer_step
    killed_at_step_4 = killed_at(4, real)

    monkeypatch.setattr(optim, "optimizer_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(world, "--steps", 6, "--log-every", 1, "--out", out)
    monkeypatch.setattr(optim, "optimizer_step", real)
    assert log_steps(out) == [1, 2, 3]
    with pytest.raises(SystemExit) as e:
        fine_tune(world, "--steps", 6, "--log-every", 1, "--out", out, "--resume", out,
                  "--data-frac", 0.5, "--val-max", 4)
    assert "--data-frac 1.0 -> 0.5" in str(e.value) and "--val-max 128 -> 4" in str(e.value)
    fine_tune(world, "--steps", 6, "--log-every", 1, "--out", out,
              "--resume", out, "--lr-head", 5e-4)
    assert "--lr-head 0.001 -> 0.0005" in capsys.readouterr().out
    assert log_steps(out) == [1, 2, 3, 4, 5, 6]



# ---- a resumed run reads what it was trained on, wherever it now is ---------------------------
def _copy_of_the_world(world, dest):
    shutil.copytree(os.path.join(world, "tiny", "prepared"), dest)
    return str(dest)


def _retrain_tokenizer(root):
    """What the old error message advised after a corpus was prepared into the root: delete the
    tokenizer; a later run then trains another, of the same size, on other texts."""
    old = load_tokenizer(os.path.join(root, "tokenizer.json"))
    os.remove(os.path.join(root, "tokenizer.json"))
    texts = [f"{w} finding {i} seen" for i, w in enumerate(sorted(old.get_vocab()) * 2)]
    new = train_tokenizer(texts, old.get_vocab_size(), root)
    assert new.get_vocab_size() == old.get_vocab_size() and new.get_vocab() != old.get_vocab()


def test_resume_keeps_the_tokenizer_it_was_trained_with(world, tmp_path, capsys):
    """Before: the resumed run silently took the retrained root tokenizer (same size, other
    tokens), or trained one into the root when it was missing."""
    root, out = _copy_of_the_world(world, tmp_path / "prepared"), tmp_path / "run"
    root_tok = os.path.join(root, "tokenizer.json")
    pretrain(world, out, "--data-root", root, "--steps", 2, "--save-every", 2)
    trained = (out / "step_0000002" / "tokenizer.json").read_bytes()
    _retrain_tokenizer(root)
    retrained = open(root_tok, "rb").read()
    capsys.readouterr()
    pretrain(world, out, "--data-root", root, "--steps", 4, "--save-every", 2, "--resume", out)
    assert "is not the one this run was trained with: resuming with the checkpoint's own" in \
        capsys.readouterr().out
    assert (out / "step_0000004" / "tokenizer.json").read_bytes() == trained
    assert open(root_tok, "rb").read() == retrained  # the root's is left as it is
    os.remove(root_tok)
    pretrain(world, out, "--data-root", root, "--steps", 6, "--save-every", 2, "--resume", out)
    assert (out / "step_0000006" / "tokenizer.json").read_bytes() == trained
    assert not os.path.exists(root_tok)  # none trained into the root


def test_resume_refuses_another_explicit_tokenizer_naming_both(world, tmp_path):
    root, out = _copy_of_the_world(world, tmp_path / "prepared"), tmp_path / "run"
    tok = os.path.join(root, "tokenizer.json")
    pretrain(world, out, "--data-root", root, "--tokenizer", tok, "--steps", 2, "--save-every", 2)
    _retrain_tokenizer(root)
    with pytest.raises(SystemExit, match=rf"the tokenizer {tok} \(sha256 \w{{16}}\) is not the one "
                                         rf"the run being resumed was trained with, "
                                         rf"{out}/step_0000002/tokenizer\.json"):
        pretrain(world, out, "--data-root", root, "--tokenizer", tok, "--steps", 4, "--resume", out)


def test_resume_finds_moved_data_by_content(world, tmp_path):
    """A prepared root moved to another place is resumed from with --data-root NEW (before: refused
    as a changed setting, and its cache paths pointed into the old place); changed content is
    refused, naming the file."""
    old, out = _copy_of_the_world(world, tmp_path / "prepared"), tmp_path / "run"
    pretrain(world, out, "--data-root", old, "--steps", 2, "--save-every", 2)
    new = str(tmp_path / "moved" / "prepared")
    os.renames(old, new)
    pretrain(world, out, "--data-root", new, "--steps", 4, "--save-every", 2, "--resume", out)
    assert json.loads((out / "config.json").read_text())["data_root"] == new
    with open(os.path.join(new, "medicat", "train.jsonl")) as f:
        lines = f.readlines()
    with open(os.path.join(new, "medicat", "train.jsonl"), "w") as f:
        f.writelines(lines[1:] + lines[:1])  # the same records in another order: not the same data
    with pytest.raises(SystemExit, match=r"the data differs from what the run was trained on "
                                         r".*data\.json\):\n  medicat/train\.jsonl: sha256 "
                                         r"\w{16} -> \w{16}\n"):
        pretrain(world, out, "--data-root", new, "--steps", 6, "--resume", out)
