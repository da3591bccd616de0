"""The data plumbing's worker processes (datasets/workers.py): they never hang the run, die with a
stop signal, leave no orphan or temporary file, and a stuck or dead worker is named."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ptunifier_min.datasets import source, workers
from ptunifier_min import distributed
from ptunifier_min.config import PRESETS, TrainConfig, build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(folder, n, size):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(os.path.join(folder, f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(paths[-1])
    return paths


def _run_script(body, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {REPO!r})\n" + textwrap.dedent(body))
    # a session of its own: a hung run and its workers can be killed together
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _output(proc, timeout):
    """The run's output, or None (and the run killed, workers included) past timeout."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None


def test_many_short_pools_under_the_runs_stop_handlers_never_hang(tmp_path):
    # The way train.py met it: the run's SIGTERM handler installed, a progress bar's thread alive,
    # and the image check's pools over a cache that is already there (each pool a few hundredths of
    # a second). With multiprocessing.Pool's terminate, this hung within ~120 pools (often ~20).
    proc = _run_script(f"""
        import os, threading, time
        from tqdm import tqdm
        from ptunifier_min import runs
        from ptunifier_min.datasets import prepare
        runs.claim_run_folder({str(tmp_path / "run")!r})
        bar = tqdm(total=10 ** 9, file=open(os.devnull, "w"), mininterval=0.01)
        def tick():
            while True:
                bar.update(1)
                time.sleep(0.001)
        threading.Thread(target=tick, daemon=True).start()
        jobs = []
        for i in range(1500):
            path = os.path.join({str(tmp_path)!r}, f"{{i}}.png")
            open(path, "w").close()
            jobs.append((path, path, 384))  # its cached copy "exists": a stat per job
        for r in range(250):
            assert prepare._decode_all(jobs, 2) == [(None, 0)] * 1500
        print("ok")
    """, tmp_path)
    out = _output(proc, timeout=120)
    assert out is not None, "the pools hung"
    assert proc.returncode == 0 and out.strip().endswith("ok"), out[-2000:]


def _signals(_):
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    return (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGUSR1), frozenset(workers.STOP_SIGNALS & blocked))


def test_workers_start_with_the_default_stop_actions_and_end_without_a_kill(monkeypatch):
    ended = []
    monkeypatch.setattr("multiprocessing.Process.terminate", lambda p: ended.append(p.pid))
    monkeypatch.setattr("multiprocessing.Process.kill", lambda p: ended.append(p.pid))
    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # the run's Python-level handler
    try:
        seen = workers.ordered_map(_signals, range(40), workers=2, chunksize=4, min_jobs=1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert set(seen) == {(signal.SIG_DFL, signal.SIG_DFL, signal.SIG_IGN, frozenset())}
    assert ended == []  # the success path closes the pipes; every worker exits by itself


def _square_or_fail(x):
    if x == 13:
        raise ValueError("thirteen")
    return x * x


def test_results_come_in_order_and_a_workers_exception_is_raised_with_its_traceback():
    assert workers.ordered_map(_square_or_fail, range(13), 2, chunksize=3, min_jobs=1) == [
        x * x for x in range(13)]
    with pytest.raises(ValueError, match="thirteen") as e:
        workers.ordered_map(_square_or_fail, range(40), 2, chunksize=3, min_jobs=1)
    assert any("in worker process" in note and "_square_or_fail" in note
               for note in e.value.__notes__)


def _die_at_seven(x):
    if x == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_a_worker_that_dies_is_an_error_naming_it_not_a_wait():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker process \d+ ended \(exit code -9\) while "
                                           r"working on jobs 6-8 of 20"):
        workers.ordered_map(_die_at_seven, range(20), 2, chunksize=3, min_jobs=1)
    assert time.monotonic() - t0 < 10


def test_a_worker_that_does_not_exit_after_its_work_is_named_and_killed(monkeypatch, capfd):
    work = workers._work

    def stuck(*args):  # does its work, then never exits
        work(*args)
        time.sleep(60)

    monkeypatch.setattr(workers, "_work", stuck)
    monkeypatch.setattr(workers, "EXIT_GRACE_S", 0.5)
    t0 = time.monotonic()
    assert workers.ordered_map(abs, range(-5, 5), 2, chunksize=2, min_jobs=1) == [
        abs(x) for x in range(-5, 5)]
    assert time.monotonic() - t0 < 10
    err = capfd.readouterr().err
    assert err.count("has not exited 0.5 s after the end of its work: killing it") == 2, err


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


@pytest.mark.parametrize("whom", ["the run", "its process group"])
def test_a_stop_signal_ends_the_run_and_its_workers_leaving_no_orphan_or_temporary(tmp_path,
                                                                                    whom):
    # a SIGTERM to the run (kill PID), or to every process of the job (SLURM, kill -TERM -PGID)
    paths = _images(str(tmp_path / "raw"), 400, (700, 600))
    cache = tmp_path / "cache"
    proc = _run_script(f"""
        from ptunifier_min import runs
        from ptunifier_min.datasets import prepare
        runs.claim_run_folder({str(tmp_path / "run")!r})
        paths = {paths!r}
        jobs = [(p, prepare.cache_file({str(cache)!r}, p, 384), 384) for p in paths]
        import os
        os.makedirs({str(cache)!r})
        prepare._decode_all(jobs, 2)
        print("finished")
    """, tmp_path)
    deadline = time.monotonic() + 60
    while not (cache.is_dir() and len(os.listdir(cache)) >= 20):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    kids = _children(proc.pid)
    assert len(kids) == 2
    if whom == "the run":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    out = _output(proc, timeout=30)
    assert out is not None and time.monotonic() - t0 < 5, out
    assert proc.returncode == 128 + signal.SIGTERM and "finished" not in out, out
    for kid in kids:  # no orphan: reaped by the run, gone
        assert not os.path.exists(f"/proc/{kid}") or "Z" in open(f"/proc/{kid}/stat").read()
    left = os.listdir(cache)
    assert left and not [n for n in left if ".tmp" in n], left
    assert len(left) < len(paths)  # it was stopped, not finished


def test_an_interrupted_synthetic_world_is_replaced_not_an_error(tmp_path):
    raw = tmp_path / "tiny" / "raw" / "roco"
    raw.mkdir(parents=True)
    (raw / "half-written.jpg").write_bytes(b"\xff\xd8")  # a run stopped while it generated
    cfg = build(TrainConfig, {**PRESETS["tiny"], "synth_root": str(tmp_path), "eval_pairs": 0})
    said = []
    root, _ = source.ensure_prepared(cfg, ["roco"], distributed.Dist(), said.append)
    assert "an interrupted synthetic world" in said[0] and "replacing it" in said[0]
    assert not (raw / "half-written.jpg").exists()
    assert os.path.isfile(os.path.join(root, "roco", "meta.json"))
