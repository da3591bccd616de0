"""The layout: ptunifier_min/ is the method, ptunifier_min/datasets/ the data plumbing, which the method never imports
and the scripts load only when they must make the embedded synthetic world; and every `python -m` command the code
and README print names a module that exists."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUMBING = "ptunifier_min.datasets"
GENERATOR = ("ptunifier_min.datasets.synth", "ptunifier_min.datasets.prepare")


def _loaded_after(code):
    """Run code in a fresh interpreter at the repository root; return the ptunifier_min modules it left loaded (a
    fresh process, because this one has long imported everything)."""
    report = "import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith('ptunifier_min'))))"
    run = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_method_never_imports_the_data_plumbing():
    # every module of ptunifier_min/ itself (config, model, objectives, data, tasks, ... and any added later)
    modules = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "ptunifier_min", "*.py")))
    assert {"model", "objectives", "tasks", "data"} <= set(modules)
    loaded = _loaded_after("import " + ", ".join(f"ptunifier_min.{m}" for m in modules if m != "__init__"))
    assert {f"ptunifier_min.{m}" for m in ("model", "objectives", "tasks", "data")} <= set(loaded)
    assert [m for m in loaded if m.startswith(PLUMBING)] == []


def test_the_scripts_do_not_load_the_generator_at_import():
    loaded = _loaded_after("import train, finetune, eval")
    assert "ptunifier_min.datasets.source" in loaded  # ensure_prepared: imported, so the check below is not vacuous
    assert [m for m in loaded if m in GENERATOR] == []


def test_a_run_on_a_data_root_never_loads_the_generator(tmp_path):
    root, tok = tmp_path / "prepared", tmp_path / "tokenizer.json"
    (root / "roco").mkdir(parents=True)
    (root / "roco" / "meta.json").write_text("{}")
    tok.write_text("{}")
    loaded = _loaded_after(f"""
import types
from ptunifier_min.datasets.source import ensure_prepared
cfg = types.SimpleNamespace(data_root={str(root)!r}, tokenizer={str(tok)!r})
assert ensure_prepared(cfg, ["roco"], proc=None, print0=print) == ({str(root)!r}, {str(tok)!r})
try:  # the other outcome on a data root: a missing folder, refused with the command that prepares it
    ensure_prepared(cfg, ["roco", "chexpert"], proc=None, print0=print)
    raise AssertionError("a missing prepared folder was accepted")
except SystemExit as e:
    assert "python -m ptunifier_min.datasets.prepare chexpert --root RAW/chexpert" in str(e), e
""")
    assert "ptunifier_min.datasets.source" in loaded
    assert [m for m in loaded if m in GENERATOR] == []


@pytest.mark.parametrize("module", GENERATOR)
def test_the_data_commands_run(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage:")


def _named_modules(path):
    """Every module a `python -m M` command or a `from M import` line in the file names (docstrings, error
    messages, README examples): a stale one is a command a user copies and that fails."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return set(re.findall(r"python -m (ptunifier_min[\w.]*)", text)) | \
        set(re.findall(r"from (ptunifier_min[\w.]*) import", text))


def _assert_exist(paths):
    named = {(os.path.relpath(p, REPO), m) for p in paths for m in _named_modules(p)}
    assert named, "no command found: the pattern has gone stale"
    assert [(p, m) for p, m in sorted(named) if importlib.util.find_spec(m) is None] == []


def test_every_command_the_code_prints_names_a_module_that_exists():
    _assert_exist(glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True))


def test_every_command_and_file_the_readme_names_exists():
    readme = os.path.join(REPO, "README.md")
    _assert_exist([readme])
    with open(readme, encoding="utf-8") as f:
        files = set(re.findall(r"`((?:ptunifier_min|tests)/[\w/]+\.py)`", f.read()))
    assert [p for p in sorted(files) if not os.path.isfile(os.path.join(REPO, p))] == []


def test_the_code_a_reader_reads_fits_in_100_columns():
    # the package and the three scripts (the tests may run wider); the one exception is the task
    # table, one row per task so that it reads as a table
    paths = glob.glob(os.path.join(REPO, "ptunifier_min", "**", "*.py"), recursive=True)
    paths += [os.path.join(REPO, f) for f in ("train.py", "finetune.py", "eval.py")]
    assert len(paths) > 20, "the file pattern has gone stale"
    wide = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        table = range(0)
        if path.endswith(os.path.join("ptunifier_min", "tasks.py")):
            start = lines.index("TASKS = {t.name: t for t in (")
            table = range(start, lines.index(")}", start))
        wide += [f"{os.path.relpath(path, REPO)}:{i + 1}" for i, line in enumerate(lines)
                 if len(line) > 100 and i not in table]
    assert wide == []
