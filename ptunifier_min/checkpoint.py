"""Checkpoints: step folders written whole and verified when read, and resuming from them exactly.

    save_checkpoint(out, step, model, cfg, trainer_state, files=[tokenizer])  # out/step_N + latest
    state = resume_from(path, cfg, model, opt, sched)  # refuses what can't change, applies the rest
    load_weights(path, model); resolve_checkpoint(path)

Checkpoints are plain: safetensors weights of the unwrapped model, a readable config.json with the
step, the ptunifier-min version that wrote it and the sha256 of every other file (checked when it
is read), and (for resuming) trainer.pt
with the optimizer, schedule and every rank's RNG state, read with weights_only=True. Every file
goes through a temporary and a rename, so a kill at any moment leaves the previous version whole.
The run folder around them (lock, log, leftovers) is runs.py's.
"""

import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil

import safetensors.torch
import torch
import torch.distributed as dist

from . import __version__, manifests, stopping
from .distributed import unwrap
from .fields import flag
from .files import write_atomic

# realpath(checkpoint folder) -> the step folders this run wrote there (or resumed from),
# oldest first
_WRITTEN = {}


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
            record = {"step": step, "version": __version__, "config": dataclasses.asdict(cfg),
                      "sha256": sha256}
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


# Where the data and the tokenizer are, not what they are: a resumed run may find them at another
# place when their content is what the checkpoint recorded (manifests.differences finds none).
PLACES = ("data_root", "synth_root", "tokenizer")


def _flat(d):
    """A config's dict form with the model's fields beside the run's."""
    return {**{k: v for k, v in d.items() if k != "model"}, **d.get("model", {})}


def resume_differences(saved, cfg, same_data=False):
    """Compare cfg (a config dataclass) with the config a checkpoint was written with (its dict
    form). Returns (refused, changed): one line per differing field that a resumed run must keep
    (the model, the data, the objectives, the batch, the seed...), and one per differing field it
    may change (`may_change`: steps, cadences, learning rates, workers; and PLACES when same_data
    says the data and the tokenizer found there are those the run was trained with)."""
    fields = [*dataclasses.fields(cfg), *(dataclasses.fields(cfg.model) if hasattr(cfg, "model")
                                          else ())]
    may_change = {f.name for f in fields if f.metadata.get("may_change")}
    may_change |= set(PLACES) if same_data else set()
    # a field the checkpoint lacks was added after it was written: the run had that field's default
    # (as a built config holds it: pixel_mean's tuple default is kept as a list)
    defaults = _flat(dataclasses.asdict(type(cfg)()))
    before, now = {**defaults, **_flat(saved)}, _flat(dataclasses.asdict(cfg))
    refused, changed = [], []
    # how a run was started, not a setting
    for name in sorted((set(before) | set(now)) - {"resume", "overwrite"}):
        a, b = before.get(name, "<none>"), now.get(name, "<none>")
        if a != b:
            (changed if name in may_change else refused).append(f"{flag(name)} {a!r} -> {b!r}")
    return refused, changed


def resume_from(path, cfg, model, opt, sched, print0=print, record=None):
    """Continue a run from its checkpoint (a run or step folder) honestly. Returns the checkpoint's
    trainer state.

    `record`, the data record of what this run reads (manifests.data_record), is compared with the
    checkpoint's: a file, split or tokenizer whose content differs is refused, naming it; the same
    content may sit at another place (--data-root, --synth-root, --tokenizer: PLACES).
    The config is compared with the checkpoint's (resume_differences): settings a resumed run
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
        refused, changed = resume_differences(
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
