"""Everything a run writes and reads back: its folder, checkpoints, resume, RNG state, atomic JSON
and the log.

    claim_run_folder(out, resume, overwrite)           # rank 0, first: lock, refuse or move aside
    save_checkpoint(out, step, model, cfg, trainer_state, files=[tokenizer])  # out/step_N + latest
    state = resume_from(path, cfg, model, opt, sched)  # refuses what can't change, applies the rest
    load_weights(path, model); resolve_checkpoint(path); Log(path, enabled)

Checkpoints are plain: safetensors weights of the unwrapped model, a readable config.json with the
step and the sha256 of every other file (checked when it is read), and (for resuming) trainer.pt
with the optimizer, schedule and every rank's RNG state, read with weights_only=True. Every file
goes through a temporary and a rename, so a kill at any moment leaves the previous version whole.
"""

import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import time

import safetensors.torch
import torch
import torch.distributed as dist

from .files import write_atomic
from . import config as config_lib
from . import manifests, stopping
from .distributed import unwrap


# ---- run folders ---------------------------------------------------------------------------------
# What a run writes into its --out
# (tokenizer.json: a RoBERTa tokenizer made one file, pretrained.py)
# (data.json: what the run read, by content, manifests.data_record)
RUN_FILES = ("config.json", "log.jsonl", "latest", "results.json", "train_state", "tokenizer.json",
             "data.json")
# realpath(out) -> the descriptor of out/.lock, flock'ed for as long as this process lives
_LOCKS = {}
# realpath(checkpoint folder) -> the step folders this run wrote there (or resumed from),
# oldest first
_WRITTEN = {}


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
    for key in [k for k in _WRITTEN if _inside(k, out)]:
        # a new run (in a process that has run before: tests) owns none of the folders' contents
        del _WRITTEN[key]
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
        ckpt = resolve_checkpoint(checkpoints)
    except CheckpointError:
        return (f"{why}: stopped before the first checkpoint in {checkpoints}; nothing to "
                "resume: run the same command with --overwrite to start again")
    return (f"{why}: stopped; the last checkpoint is {ckpt}: run the same command with --resume "
            f"{out}")


def write_error(e, path):
    """An OSError that says what could not be written and why, a full disk as such (ENOSPC
    alone names no file)."""
    why = ("disk full (no space left on device)" if e.errno == errno.ENOSPC
           else (e.strerror or str(e)))
    # e.g. a source file that vanished
    where = f" ({e.filename})" if e.filename and e.errno != errno.ENOSPC else ""
    return OSError(e.errno, f"could not write {path}: {why}{where}; the temporary copy was removed "
                            "and the previous version, if any, is intact")


# ---- checkpoints ---------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    pass


def save_checkpoint(out, step, model, cfg, trainer_state=None, files=(), keep=1):
    """Write out/step_NNNNNNN/{model.safetensors, trainer.pt, the tokenizer file, config.json}, then
    point out/latest at it. `files` are copied in (the tokenizer: a checkpoint is useless without
    its vocabulary). config.json, written last, holds the step, the config and the sha256 of every
    other file, which reading checks (_verified): a damaged file is an error, not a model.

    Written into a temporary folder (named with the pid: no two processes share one) that is renamed
    when complete, and `latest` is replaced atomically, so a kill at any moment leaves the previous
    checkpoint intact and never a half-written one in its place; a failed write removes the
    temporary and says what failed, a full disk as such. A stop signal during the write is acted on
    once the checkpoint is complete. To keep the last `keep`, only step folders this run wrote here
    (or resumed from) are removed, never an earlier run's, whatever their names sort to: `latest`
    always names a folder that exists.
    """
    name = f"step_{step:07d}"
    tmp, final = os.path.join(out, f".tmp_{name}.{os.getpid()}"), os.path.join(out, name)
    with stopping.deferred():
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            # Serialised here and written by _write: the file writers of safetensors and torch
            # report a full disk as unrelated errors (SafetensorError, "unexpected pos").
            weights = {k: v.detach().cpu().contiguous()
                       for k, v in unwrap(model).state_dict().items()}
            sha256 = {"model.safetensors": _write(
                os.path.join(tmp, "model.safetensors"),
                safetensors.torch.save(weights, metadata={"step": str(step)}))}
            if trainer_state is not None:
                buffer = io.BytesIO()
                torch.save(trainer_state, buffer)
                sha256["trainer.pt"] = _write(os.path.join(tmp, "trainer.pt"), buffer.getbuffer())
            for src in files:
                with open(src, "rb") as f:
                    sha256[os.path.basename(src)] = _write(
                        os.path.join(tmp, os.path.basename(src)), f.read())
            record = {"step": step, "config": config_lib.to_dict(cfg), "sha256": sha256}
            _write(os.path.join(tmp, "config.json"), json.dumps(record, indent=2).encode())
            # the same step written again (a finished run resumed): the new one replaces it
            _discard(final)
            os.replace(tmp, final)
            write_atomic(os.path.join(out, "latest"), name + "\n")
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise write_error(e, final) from e
            raise
        mine = _WRITTEN.setdefault(os.path.realpath(out), [])
        mine[:] = [n for n in mine if n != name] + [name]
        for old in mine[:-keep]:
            _discard(os.path.join(out, old))
        del mine[:-keep]
    return final


def _write(path, blob):
    """Write bytes through Python's file object (so that a full disk is an OSError with ENOSPC) and
    flush them to the disk before the folder's rename makes them visible. Returns their sha256."""
    with open(path, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(blob).hexdigest()


def _verified(ckpt, name, what="checkpoint"):
    """ckpt/name (`what` it holds), once its sha256 is the one config.json recorded when it was
    written (a checkpoint from before the record is not checked). Read in 16 MB chunks; the
    loaders then read it again from the page cache (safetensors maps it), faster than from bytes."""
    file = os.path.join(ckpt, name)
    recorded = (read_checkpoint_config(ckpt).get("sha256", {}).get(name)
                if os.path.isfile(os.path.join(ckpt, "config.json")) else None)
    if recorded:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != recorded:
            raise CheckpointError(f"corrupt or truncated {what} {file}: its content is not what "
                                  "was written (its sha256 differs from the one recorded in "
                                  f"{os.path.join(ckpt, 'config.json')}); use another checkpoint, "
                                  "or copy this one again from where it came")
    return file


def _discard(folder):
    """Remove a folder by renaming it to a temporary name first: a kill mid-way never leaves
    half a checkpoint."""
    if os.path.isdir(folder):
        trash = os.path.join(os.path.dirname(folder),
                             f".tmp_{os.path.basename(folder)}.{os.getpid()}.old")
        os.replace(folder, trash)
        try:
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            # a stop signal raises SystemExit wherever it lands, rmtree included: finish the
            # removal on the way out
            if os.path.isdir(trash):
                shutil.rmtree(trash, ignore_errors=True)


def resolve_checkpoint(path):
    """A run folder (follows its `latest`) or a step folder -> the step folder, with a clear
    error otherwise."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise CheckpointError(f"no checkpoint at {path}: expected model.safetensors (or a run "
                              "folder with `latest`)")
    return path


def checkpoint_tokenizer(path):
    path = resolve_checkpoint(path)
    for name in ("tokenizer.json", "vocab.txt"):
        if os.path.isfile(os.path.join(path, name)):
            return _verified(path, name, "tokenizer")
    raise CheckpointError(f"{path} holds no tokenizer.json or vocab.txt")


def resumed_tokenizer(path):
    """The tokenizer file the checkpoint a run resumes from carries (None for a fine-tuning
    train_state written before they carried one). Asked before any data is prepared, so that a
    wrong --resume stops before anything is written."""
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"--resume {path}: {e}") from None
    try:
        return checkpoint_tokenizer(ckpt)
    except CheckpointError:
        return None


def read_data_record(path):
    """The data record (manifests.data_record) a checkpoint carries in data.json; None for a
    checkpoint written before checkpoints carried one."""
    file = os.path.join(resolve_checkpoint(path), "data.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            record = json.load(f)
        if not isinstance(record.get("files"), dict) or not isinstance(record.get("splits"), dict):
            raise ValueError("no 'files' and 'splits'")
        return record
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"unreadable data record {file}: {e}") from e


def read_checkpoint_config(path):
    path = resolve_checkpoint(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable {os.path.join(path, 'config.json')}: {e}") from e


def config_differences(saved: dict, current: dict, prefix=""):
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<missing>"), current.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} vs requested {b!r}")
    return out


def load_weights(path, model, strict=True):
    """Load model.safetensors into model; a corrupt file or mismatched tensors give a
    CheckpointError.

    With strict=False, keys the model lacks or the file lacks are allowed (a new task head); shapes
    must still match. Returns (missing, unexpected) key lists.
    """
    path = resolve_checkpoint(path)
    file = _verified(path, "model.safetensors")
    try:
        state = safetensors.torch.load_file(file)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CheckpointError(f"corrupt or truncated checkpoint {file}: {e}") from e
    own = unwrap(model).state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{file} does not fit this model:\n  " + "\n  ".join(bad))
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{file} does not fit this model: missing {missing}, "
                              f"unexpected {unexpected}")
    return missing, unexpected


def load_trainer_state(path):
    path = resolve_checkpoint(path)
    file = os.path.join(path, "trainer.pt")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no trainer.pt: it holds weights only and cannot be "
                              "resumed")
    _verified(path, "trainer.pt", "trainer state")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"corrupt or truncated trainer state {file}: {e}") from e


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
    except (CheckpointError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = f": {e.filename}" if e.filename else ""
        raise SystemExit(f"error: {e.strerror}{where}") from None


def resume_from(path, cfg, model, opt, sched, print0=print, record=None):
    """Continue a run from its checkpoint (a run or step folder) honestly. Returns the checkpoint's
    trainer state.

    `record`, the data record of what this run reads (manifests.data_record), is compared with the
    checkpoint's: a file, split or tokenizer whose content differs is refused, naming it; the same
    content may sit at another place (--data-root, --synth-root, --tokenizer: config.PLACES).
    The config is compared with the checkpoint's (config.resume_differences): settings a resumed run
    must keep (the model, the data, the objectives, the batch, the seed...) are refused with the
    list of differences; those it may change (steps, cadences, learning rates, workers) are applied
    and printed. Weights, optimizer moments and the position in the schedule are restored; learning
    rates, weight decay and betas stay this run's (see load_optimizer_state). Every failure is a
    SystemExit naming the checkpoint, not a traceback.
    """
    try:
        ckpt = resolve_checkpoint(path)
        saved = read_data_record(ckpt)
        differ = manifests.differences(saved, record) if saved and record else []
        if differ:
            raise SystemExit(f"--resume {path}: the data differs from what the run was trained on "
                             f"(recorded in {os.path.join(ckpt, 'data.json')}):\n  "
                             + "\n  ".join(differ) + "\nresume with the prepared data and "
                             "tokenizer it was trained with, or start a new run in another --out")
        refused, changed = config_lib.resume_differences(
            read_checkpoint_config(ckpt)["config"], cfg, same_data=bool(saved and record))
        if refused:
            raise SystemExit(f"--resume {path}: these settings differ from the run being "
                             "continued, and a resumed run cannot change them:\n  "
                             + "\n  ".join(refused) + "\nuse the checkpoint's values (in "
                             f"{os.path.join(ckpt, 'config.json')}) or start a new run in "
                             "another --out")
        load_weights(ckpt, model)
        state = load_trainer_state(ckpt)
        load_optimizer_state(opt, sched, state)
    except CheckpointError as e:
        raise SystemExit(f"--resume {path}: {e}") from None
    except ValueError as e:  # torch: the saved parameter groups do not fit this optimizer's
        raise SystemExit(f"--resume {path}: {ckpt}/trainer.pt does not fit this model's "
                         f"optimizer: {e}") from None
    mine = _WRITTEN.setdefault(os.path.realpath(os.path.dirname(ckpt)), [])
    # the run goes on: its next checkpoint supersedes this one
    if os.path.basename(ckpt) not in mine:
        mine.insert(0, os.path.basename(ckpt))
    print0(f"resumed from {ckpt} at step {state['step']}" +
        (f"; changed for the rest of the run: {', '.join(changed)}" if changed else ""))
    return state


def load_optimizer_state(opt, sched, state):
    """Restore the optimizer's moments and the schedule's position from a trainer state, keeping
    this run's settings.

    load_state_dict would also bring back the checkpoint's hyperparameters (every group's lr,
    initial_lr, weight_decay, betas) and LambdaLR its base_lrs: new learning rates given to a
    resumed run would be silently ignored. So they are put back from the optimizer as built from
    this run's flags, and the current LR is recomputed at the resumed position with LambdaLR's own
    formula (base_lr * lambda(step)): with unchanged flags it is bit for bit the saved one, with a
    new --steps it follows the new schedule.
    """
    own = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer"])
    for group, settings in zip(opt.param_groups, own):
        group.update(settings)
    sched.load_state_dict(state["scheduler"])
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
    for group, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * f(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def rng_state():
    # Masks, negatives, crops and sentence choices derive from (seed, step); only dropout draws from
    # the global RNG.
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def gather_rng(proc):
    """Every rank's RNG state, gathered on all ranks (rank 0 saves them), so a resumed rank r
    restores its own. A collective: every rank calls it at the same point."""
    state = rng_state()
    if proc.world == 1:
        return [state]
    out = [None] * proc.world
    dist.all_gather_object(out, state)
    return out


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and len(s["cuda"]):
        torch.cuda.set_rng_state_all(s["cuda"])


# ---- logging -------------------------------------------------------------------------------------
class Log:
    """log.jsonl with one line per logged step (rank 0 only).

    A resumed run passes resume_step: the log is first cut back to the records of steps up to it
    (rewritten through a temporary file and a rename), because the steps the stopped run logged
    after its last checkpoint are trained again and must not appear twice. A line torn by a kill
    mid-write is dropped with them."""

    def __init__(self, path, enabled, resume_step=None):
        self.f = None
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

    def write(self, record):
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
