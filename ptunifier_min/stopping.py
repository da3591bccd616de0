"""What a stop signal does to a run: SIGTERM and SIGINT (a user, `kill`, a cluster's preemption or
time limit) and SIGUSR1 (the early warning SLURM sends with --signal=USR1@<seconds>).

    stopping.catch(message)             # rank 0, as it claims its run folder (checkpoint.py)
    stopping.finish_step_on_stop(True)  # every rank, before the training loop
    signum = stopping.requested(proc)   # every rank, after each step: save, then stop_run(signum)
    with stopping.deferred(): ...       # a checkpoint being written is completed first

Before the training loop (preparing data, building the model) and after it (the final evaluation)
a stop signal ends the run at once: there is nothing new to save, and every write is atomic. In the
loop the step in flight finishes, the ranks agree to stop after the same step (the largest signal
number any of them received, all-reduced on the host), that step is saved, and the run exits with
128 + the signal number, rank 0 saying where the checkpoint is. Data-loader workers leave the
signals to the run (leave_to_the_run): a signal sent to the whole job must not end them while the
run still needs the batches of the step it finishes.
"""

import atexit
import contextlib
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# this process's pid, the handlers it replaced, the last line to say, whether the step in flight
# finishes first, whether a checkpoint is being written, the signal that asked for a stop (0: none)
_STOP = {}


def catch(message=None):
    """From here a stop signal ends this process's run (at once, or after the step in flight: see
    finish_step_on_stop); `message(signal name)` is its last line. Python sets handlers from the
    main thread only: elsewhere (a test's thread) the signals keep their actions."""
    _STOP.update(pid=os.getpid(), finish_step=False, saving=False, requested=0)
    if message:
        _STOP["message"] = message
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        if signal.getsignal(signum) is not _on_stop:
            _STOP.setdefault("previous", {})[signum] = signal.getsignal(signum)
            signal.signal(signum, _on_stop)


def finish_step_on_stop(on):
    """on=True, on every rank before the training loop: from here a stop signal lets the step in
    flight finish; the loop asks `requested` after each step, saves that step and calls stop_run.
    on=False, after the loop: a stop signal ends the run at once again (one that came during the
    last step's save does so now)."""
    if _STOP.get("pid") != os.getpid():
        catch()  # a rank other than 0: nothing caught its signals before
    _STOP.update(finish_step=on, **({"requested": 0} if on else {}))
    if not on and _STOP["requested"]:
        stop_run(_STOP["requested"])


def requested(proc):
    """The stop signal a rank received (0: none), the same on every rank, so that all of them save
    the same step and stop. A collective: every rank calls it after every step. It runs on the host
    (a CPU tensor over the gloo group), so the host does not wait for the device here."""
    signum = _STOP.get("requested", 0)
    if proc.world > 1:
        flag = torch.tensor([signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=proc.host_group)
        signum = _STOP["requested"] = int(flag)
    return signum


@contextlib.contextmanager
def deferred():
    """A stop signal inside the block waits for its end (if the block ends without an error): a
    checkpoint is written whole, and `latest` never names a folder half-way through a rename."""
    _STOP["saving"] = True
    try:
        yield
    finally:
        _STOP["saving"] = False
    if _STOP.get("requested") and not _STOP.get("finish_step"):
        stop_run(_STOP["requested"])


def _on_stop(signum, frame):
    # a process forked from the run: behave as it would have without us (data-loader workers set
    # their own: leave_to_the_run)
    if os.getpid() != _STOP["pid"]:
        previous = _STOP["previous"][signum]
        if callable(previous):
            return previous(signum, frame)
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)
        return
    if _STOP["finish_step"] or _STOP["saving"]:
        # Said once, acted on once: under torchrun a Ctrl-C reaches each rank twice (from the
        # terminal and from the launcher), and a cluster may follow SIGUSR1 with SIGTERM; all of
        # them ask for the checkpoint being made.
        if not _STOP["requested"]:
            _STOP["requested"] = signum
            what = ("the step in flight, then saving it" if _STOP["finish_step"]
                    else "the checkpoint being written")
            print(f"{signal.Signals(signum).name}: finishing {what}, then stopping",
                  file=sys.stderr, flush=True)
        return
    stop_run(signum)


def stop_run(signum):
    """End the run for a stop signal, with 128 + signum (the shell's "ended by signal N")."""
    # Data-loader workers that end with the run must not be reported by the loader's SIGCHLD
    # check as failures in the middle of the shutdown; not SIG_DFL: a pending SIGCHLD would then
    # raise its own error.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, lambda *args: None)
    # Said at exit, after the unwinding has closed the progress bar, so that it is the last line on
    # the terminal; once, however many signals come.
    message = _STOP.pop("message", None)
    if message:
        atexit.register(print, message(signal.Signals(signum).name), file=sys.stderr, flush=True)
    # SystemExit unwinds through the writers, which remove their temporaries
    raise SystemExit(128 + signum)


def leave_to_the_run(worker_id=None):
    """A data loader's worker_init_fn: the worker ignores the stop signals, and the run shuts its
    workers down as it ends (a worker whose run died exits by itself: torch's watchdog). Without it
    a SIGTERM sent to the whole job (SLURM, kill -TERM -<pgid>) ends the workers at once (torch's
    handler), and the loader fails the step the run is finishing; a SIGUSR1 kills them."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
