"""--report-to: the scalars of log.jsonl, on the same steps, live in TensorBoard (read back from the
event file here) or W&B; the optional package is imported only when asked for."""

import builtins
import json

import pytest

import finetune
import train
from test_finetune import run, world  # noqa: F401
from ptunifier_min import runs


def _logged(out):
    """{(tag, step): value} of every number in log.jsonl, nested ones as "val/auroc"."""
    got = {}
    for line in open(out / "log.jsonl"):
        record = json.loads(line)
        for name, value in runs._scalars(record):
            if name != "step":
                got[(name, record["step"])] = value
    return got


def _events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


@pytest.mark.parametrize("script", ["train.py", "finetune.py"])
def test_tensorboard_shows_the_scalars_of_the_log_on_the_same_steps(script, world,  # noqa: F811
                                                                      tmp_path):
    out = tmp_path / "run"
    if script == "train.py":
        train.main(["--preset", "tiny", "--synth-root", world[0], "--steps", "4", "--log-every",
                    "2", "--eval-pairs", "8", "--out", str(out), "--report-to", "tensorboard"])
    else:
        run(world, "--task", "chexpert", "--init", "scratch", "--log-every", "2", "--out", str(out),
            "--report-to", "tensorboard")
    logged, shown = _logged(out), _events(out)
    assert logged and set(shown) == set(logged)
    for key, value in logged.items():  # event files store float32
        assert shown[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert ("loss", 4) in shown
    assert ("val/auroc", 4) in shown if script == "finetune.py" else ("mlm_loss", 2) in shown


@pytest.mark.parametrize("kind, module", [("tensorboard", "torch.utils.tensorboard"),
                                          ("wandb", "wandb")])
def test_a_missing_tracker_package_says_what_to_install_before_anything_runs(kind, module,
                                                                              tmp_path,
                                                                              monkeypatch):
    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == module:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    for script in (train, finetune):
        with pytest.raises(SystemExit, match=f"--report-to {kind} needs the {kind} package: pip "
                                             f"install {kind}"):
            script.main(["--preset", "tiny", "--task", "chexpert"][:2 + 2 * (script is finetune)]
                        + ["--out", str(tmp_path / "run"), "--report-to", kind])
    assert not (tmp_path / "run").exists()  # refused before the run folder is claimed
