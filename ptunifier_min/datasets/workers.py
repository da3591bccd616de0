"""Forked worker processes for the data plumbing's long loops (synth.py renders the world,
prepare.py decodes and caches every image).

    results = ordered_map(fn, jobs, workers=2, chunksize=8, min_jobs=64, bar=dict(desc="..."))
    with deferred_stop():          # in fn: a file written here is never left half written by a stop
        img.save(path)

ordered_map is `[fn(j) for j in jobs]` on several processes. Why not multiprocessing.Pool: its
workers share one lock on the task queue, and Pool.terminate (which `with Pool()` calls on exit)
holds that lock while it sends the workers SIGTERM. A worker forked from a run inherits the run's
Python-level SIGTERM handler (runs.claim_run_folder); when the signal lands between the
interpreter's check for signals and the wait on that lock, the handler never runs and the worker
sleeps on, with the run waiting for it forever. Here:
- each worker has a pipe of its own and one chunk in flight, so no lock is shared, neither side ever
  waits to send while the other does, and a worker that dies is an error naming it (not a wait for
  a result that never comes);
- workers run with the default actions for the stop signals, blocked from the fork until they are
  set: a stop signal ends a worker wherever it is (deferred_stop keeps a write whole), and a
  SIGUSR1, the cluster's early warning for the run, is ignored by them;
- at the end the pipes close and each worker exits by itself; one that has not exited EXIT_GRACE_S
  after its work ended is named and killed. On an error or a stop the workers get SIGTERM first.
Forked, as torch's DataLoader on Linux: "spawn" would re-import the caller's script.
"""

import contextlib
import multiprocessing
import signal
import sys
import time
import traceback
from multiprocessing.connection import wait

from tqdm import tqdm

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
EXIT_GRACE_S = 5.0  # a worker whose pipe has closed exits in milliseconds; 5 s is a stuck one


@contextlib.contextmanager
def deferred_stop():
    """Hold SIGTERM and SIGINT until the block ends (they are delivered then): what the block writes
    is whole when a stop lands. SIGKILL cannot be held; writers that must survive it go through a
    temporary file and a rename as well."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ordered_map(fn, jobs, workers, chunksize=8, min_jobs=64, bar=None):
    """[fn(j) for j in jobs], on `workers` forked processes when there are at least `min_jobs`
    (below that, starting processes costs more than it saves). `bar`: tqdm's keyword arguments.
    An exception in fn is raised here, with the worker's traceback as a note."""
    jobs = list(jobs)
    bar = dict(bar or {}, total=len(jobs))
    if workers < 2 or len(jobs) < min_jobs or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(j) for j in tqdm(jobs, **bar)]
    chunks = [jobs[i:i + chunksize] for i in range(0, len(jobs), chunksize)]
    results = [None] * len(chunks)
    procs = _start(fn, min(workers, len(chunks)))
    try:
        with tqdm(**bar) as progress:
            todo = iter(range(len(chunks)))
            busy = {}  # pipe -> (process, index of the chunk it works on)

            def feed(proc, conn):
                i = next(todo, None)
                if i is not None:
                    conn.send(chunks[i])
                    busy[conn] = proc, i

            for proc, conn in procs:
                feed(proc, conn)
            while busy:
                for conn in wait(list(busy)):  # the host waits for a worker here
                    proc, i = busy.pop(conn)
                    try:
                        ok, value = conn.recv()
                    except EOFError:
                        proc.join(1.0)
                        raise RuntimeError(
                            f"worker process {proc.pid} ended (exit code {proc.exitcode}) while "
                            f"working on jobs {i * chunksize}-{i * chunksize + len(chunks[i]) - 1} "
                            f"of {len(jobs)}; a negative code is the signal that ended it (-9: "
                            "killed, often for lack of memory)") from None
                    if not ok:
                        raise value
                    results[i] = value
                    progress.update(len(value))
                    feed(proc, conn)
    except BaseException:
        for proc, _ in procs:
            if proc.exitcode is None:
                proc.terminate()
        _join(procs, "the stop")
        raise
    _join(procs, "the end of its work")
    return [r for chunk in results for r in chunk]


def _start(fn, n):
    ctx, procs = multiprocessing.get_context("fork"), []
    # blocked from the fork until the worker has the default actions: a stop signal must not reach
    # it while it still runs the parent's Python handlers
    with deferred_stop():
        for _ in range(n):
            conn, child_conn = ctx.Pipe()
            parent_ends = [c for _, c in procs] + [conn]
            proc = ctx.Process(target=_work, args=(fn, child_conn, parent_ends), daemon=True)
            proc.start()
            child_conn.close()
            procs.append((proc, conn))
    return procs


def _work(fn, conn, parent_ends):
    # A forked copy of a parent end (this worker's or another's) would keep that pipe open after
    # the parent closes it, and its worker would never see the end of its work.
    for c in parent_ends:
        c.close()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the parent closed the pipe: no more work
            return
        try:
            conn.send((True, [fn(job) for job in chunk]))
        except Exception as e:
            where = (f"in worker process {multiprocessing.current_process().pid}:\n"
                     + traceback.format_exc())
            e.add_note(where)
            try:
                conn.send((False, e))
            except Exception:  # an exception that cannot cross the pipe: its text can
                conn.send((False, RuntimeError(where)))


def _join(procs, when):
    deadline = time.monotonic() + EXIT_GRACE_S
    for proc, conn in procs:
        conn.close()
    for proc, _ in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            print(f"warning: worker process {proc.pid} has not exited {EXIT_GRACE_S:g} s after "
                  f"{when}: killing it", file=sys.stderr, flush=True)
            proc.kill()
            proc.join()
