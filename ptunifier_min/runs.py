"""A run's folder: claimed and locked before anything is read, its earlier contents moved aside
or continued, its log, and how a script ends on an error that says it all.

    claim_run_folder(out, resume, overwrite)   # rank 0, first: lock, refuse or move aside
    log = Log(os.path.join(out, "log.jsonl"), enabled=proc.main, resume_step=step)
    run_script(main)                           # a script's top level: clear errors, no traceback

The checkpoints inside it are checkpoint.py's.
"""

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time

from . import checkpoint, stopping
from .files import write_atomic

# What a run writes into its --out
# (tokenizer.json: a RoBERTa tokenizer made one file, pretrained.py)
# (data.json: what the run read, by content, manifests.data_record)
RUN_FILES = ("config.json", "log.jsonl", "latest", "results.json", "train_state", "tokenizer.json",
             "data.json")
# realpath(out) -> the descriptor of out/.lock, flock'ed for as long as this process lives
_LOCKS = {}


def claim_run_folder(out, resume="", overwrite=False, print0=print, checkpoints=None):
    """Make `out` this run's own, or stop saying what to do. Rank 0 calls it first, before any data
    is read.

    - An exclusive lock on out/.lock, which holds the owner's pid, host and start time: a second run
      on the folder is refused with them (two writers would mix their logs and swap each other's
      `latest`). The kernel drops the lock with the process, so not even a SIGKILL leaves a stale
      one.
    - A folder holding an earlier run (RUN_FILES, step_*) is refused, unless this run continues it
      (--resume from inside `out`) or --overwrite moves those entries aside into
      out/.replaced-<time>/: said, never deleted. Either way the temporaries a killed run left
      (.tmp_*, in `out` and in `checkpoints`) are removed first, and said.
    - A stop signal (SIGTERM, SIGINT, SIGUSR1) then prints where the last checkpoint (in
      `checkpoints`, default `out`) is and the flag that resumes it, and exits non-zero; every
      write below is atomic, so nothing is left half-written. In the training loop a stop signal
      lets the step in flight finish and be saved first (stopping.py).
    """
    if not out:
        raise SystemExit("--out is empty: name the run's output folder")
    try:
        os.makedirs(out, exist_ok=True)
        _lock(out)
    except OSError as e:
        raise SystemExit(f"cannot write to --out {out}: {e.strerror or e}") from None
    for key in [k for k in checkpoint._WRITTEN if _inside(k, out)]:
        # a new run (in a process that has run before: tests) owns none of the folders' contents
        del checkpoint._WRITTEN[key]
    continuing = bool(resume) and _inside(resume, out)
    if continuing or overwrite:
        _remove_leftovers([out, checkpoints or out], print0)
    earlier = sorted(n for n in os.listdir(out)
                     if n in RUN_FILES or n.startswith(("step_", ".tmp_")))
    if earlier and not continuing:
        if not overwrite:
            raise SystemExit(f"--out {out} holds an earlier run ({', '.join(earlier)}): continue "
                             f"it with --resume {out}, start afresh with --overwrite (moves these "
                             f"into {out}/.replaced-<time>/), or choose another --out. "
                             "Nothing was changed.")
        aside = os.path.join(out, time.strftime(".replaced-%Y%m%d-%H%M%S"))
        aside += f"-{os.getpid()}" if os.path.exists(aside) else ""
        os.makedirs(aside)
        for name in earlier:
            os.replace(os.path.join(out, name), os.path.join(aside, name))
        print0(f"--overwrite: moved the earlier run's {', '.join(earlier)} aside into {aside}")
    stopping.catch(lambda why: stop_message(why, out, checkpoints or out))


def _remove_leftovers(folders, print0):
    """Remove the .tmp_* entries a killed run left: a checkpoint it was writing, or one it was
    removing. Never a complete checkpoint: `latest` only ever names renamed step folders, and the
    lock says that no other run writes here."""
    gone = [os.path.join(folder, name) for folder in dict.fromkeys(folders)
            if os.path.isdir(folder) for name in sorted(os.listdir(folder))
            if name.startswith(".tmp_")]
    for path in gone:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if gone:
        print0(f"removed what a killed run left unfinished: {', '.join(gone)}")


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def _lock(out):
    key = os.path.realpath(out)
    # this process holds it already (a script's main() run again in one process, as tests do)
    if key in _LOCKS:
        return
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 1000).decode(errors="replace").strip() or "a process that is starting"
        os.close(fd)
        raise SystemExit(f"--out {out} is in use by another run ({holder}): two runs writing one "
                         "folder would mix their logs and checkpoints; wait for it to end, or "
                         "choose another --out") from None
    except OSError as e:
        # a file system without flock (some network mounts): run, but say that nothing guards it
        print(f"warning: cannot lock {out} ({e.strerror}): make sure no other run writes there",
              file=sys.stderr)
    # Written in place, not through a temporary and a rename: the lock belongs to this inode.
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, "
                 f"started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _LOCKS[key] = fd


def stop_message(why, out, checkpoints):
    """One line: where the last checkpoint of the run in `out` is, and the flag that continues
    from it."""
    try:
        ckpt = checkpoint.resolve_checkpoint(checkpoints)
    except checkpoint.CheckpointError:
        return (f"{why}: stopped before the first checkpoint in {checkpoints}; nothing to "
                "resume: run the same command with --overwrite to start again")
    return (f"{why}: stopped; the last checkpoint is {ckpt}: run the same command with --resume "
            f"{out}")



def refuse_the_other_scripts_run(resume, script):
    """--resume given a run that the other script wrote ("train.py" or "finetune.py"): say which
    script continues it, before anything is read or written. A fine-tuning run's config has a
    task; it is the run folder's config.json, a step folder's, or (train_state) its parent's."""
    for folder in (resume, os.path.dirname(os.path.abspath(resume))):
        try:
            with open(os.path.join(folder, "config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            continue
        saved = saved.get("config", saved) if isinstance(saved, dict) else {}
        other = "finetune.py" if isinstance(saved, dict) and "task" in saved else "train.py"
        if other != script:
            kind = "fine-tuning" if other == "finetune.py" else "pre-training"
            raise SystemExit(
                f"--resume {resume} is a {kind} run: continue it with python {other} --resume "
                f"{resume} and its flags"
                + (f"; fine-tune from it with --init {resume}" if other == "train.py" else ""))
        return


def run_script(main):
    """A script's top level: an error whose message already says what is wrong and what to do (a
    missing or damaged checkpoint, a full disk, training stopped by non-finite values) ends the run
    with that message and exit code 1, not with a traceback."""
    try:
        main()
    except (checkpoint.CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = f": {e.filename}" if e.filename else ""
        raise SystemExit(f"error: {e.strerror}{where}") from None



# ---- logging -------------------------------------------------------------------------------------
class Log:
    """log.jsonl with one line per logged step (rank 0 only), and, with report_to, the same scalars
    on the same steps in TensorBoard (<out>/tensorboard) or Weights & Biases, to watch a run live.

    A resumed run passes resume_step: the log is first cut back to the records of steps up to it
    (rewritten through a temporary file and a rename), because the steps the stopped run logged
    after its last checkpoint are trained again and must not appear twice. A line torn by a kill
    mid-write is dropped with them."""

    def __init__(self, path, enabled, resume_step=None, report_to="none", config=None):
        self.f, self.tracker = None, None
        if not enabled:
            return
        if resume_step is not None and os.path.isfile(path):
            kept = []
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                        kept.append(line.rstrip("\n") + "\n")
            write_atomic(path, "".join(kept))
        self.f = open(path, "a")
        if report_to != "none":
            self.tracker = _tracker(report_to, os.path.dirname(os.path.abspath(path)), config)

    def write(self, record):
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        if self.tracker:
            scalars = dict(_scalars(record))
            scalars.pop("step", None)
            if scalars:
                self.tracker(scalars, record["step"])


def _scalars(record, prefix=""):
    """(name, number) of every number in a log record, nested ones as "val/auroc"."""
    for k, v in record.items():
        if isinstance(v, dict):
            yield from _scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield prefix + k, v


def require_tracker(kind):
    """--report-to's package, imported only when asked for (at start, before any data is read): a
    missing one is an error saying what to install."""
    if kind == "none":
        return None
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        import wandb
        return wandb
    except ImportError:
        raise SystemExit(f"--report-to {kind} needs the {kind} package: pip install {kind}") \
            from None


def _tracker(kind, out, config):
    """log(scalars, step) for --report-to."""
    if kind == "tensorboard":
        writer = require_tracker(kind)(os.path.join(out, "tensorboard"))

        def log(scalars, step):
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            writer.flush()
        return log
    # offline unless the user's environment says otherwise: nothing here reaches the internet
    os.environ.setdefault("WANDB_MODE", "offline")
    run = require_tracker(kind).init(project="ptunifier-min", name=os.path.basename(out), dir=out,
                                     config=config)
    return lambda scalars, step: run.log(scalars, step=step)
