"""The layout: ptunifier_min/ is the method, ptunifier_min/datasets/ the data plumbing, which the
method never imports and the scripts load only when they must make the embedded synthetic world;
tools/ the experiments and benchmarks, which use the method and which it never imports; and every
`python -m` or `python tools/` command the code and README print names a module or script that
exists."""

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
TOOLS = ("ablations", "bench", "poolreport", "table2")  # experiments and benchmarks, not the method


def _loaded_after(code):
    """Run code in a fresh interpreter at the repository root; return the ptunifier_min modules it
    left loaded (a fresh process, because this one has long imported everything)."""
    report = ("import json, sys; "
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ptunifier_min'))))")
    run = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_method_never_imports_the_data_plumbing():
    # every module of ptunifier_min/ itself (config, model, objectives, data,
    # tasks, ... and any added later)
    modules = sorted(os.path.basename(p)[:-3]
                     for p in glob.glob(os.path.join(REPO, "ptunifier_min", "*.py")))
    assert {"model", "objectives", "tasks", "data"} <= set(modules)
    loaded = _loaded_after("import "
                           + ", ".join(f"ptunifier_min.{m}" for m in modules if m != "__init__"))
    assert {f"ptunifier_min.{m}" for m in ("model", "objectives", "tasks", "data")} <= set(loaded)
    assert [m for m in loaded if m.startswith(PLUMBING)] == []


def test_the_scripts_do_not_load_the_generator_at_import():
    loaded = _loaded_after("import train, finetune, eval")
    # ensure_prepared: imported, so the check below is not vacuous
    assert "ptunifier_min.datasets.source" in loaded
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
# the other outcome on a data root: a missing folder, refused with the command that prepares it
try:
    ensure_prepared(cfg, ["roco", "chexpert"], proc=None, print0=print)
    raise AssertionError("a missing prepared folder was accepted")
except SystemExit as e:
    assert "python -m ptunifier_min.datasets.prepare chexpert --root RAW/chexpert" in str(e), e
""")
    assert "ptunifier_min.datasets.source" in loaded
    assert [m for m in loaded if m in GENERATOR] == []


@pytest.mark.parametrize("module", GENERATOR)
def test_the_data_commands_run(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage:")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _named_modules(path):
    """Every module a `python -m M` command or a `from M import` line in the file names (docstrings,
    error messages, README examples): a stale one is a command a user copies and that fails."""
    text = _read(path)
    return set(re.findall(r"python -m (ptunifier_min[\w.]*)", text)) | \
        set(re.findall(r"from (ptunifier_min[\w.]*) import", text))


def _named_tools(path):
    """Every script a `python tools/<name>.py` command in the file names."""
    return set(re.findall(r"python (tools/\w+\.py)", _read(path)))


def _assert_exist(paths):
    named = {(os.path.relpath(p, REPO), m) for p in paths for m in _named_modules(p)}
    assert named, "no command found: the pattern has gone stale"
    assert [(p, m) for p, m in sorted(named) if importlib.util.find_spec(m) is None] == []
    tools = {(os.path.relpath(p, REPO), t) for p in paths for t in _named_tools(p)}
    assert [(p, t) for p, t in sorted(tools) if not os.path.isfile(os.path.join(REPO, t))] == []
    return tools


def test_every_command_the_code_prints_names_a_module_that_exists():
    tools = _assert_exist(glob.glob(os.path.join(REPO, "**", "*.py"), recursive=True))
    # each tool's usage lines are found: the pattern has not gone stale
    assert {t for _, t in tools} >= {f"tools/{t}.py" for t in TOOLS}


def _imports_tools(text):
    return re.search(r"^\s*(from\s+tools\b|import\s+tools\b)", text, re.M) is not None


def test_the_experiments_live_in_tools_and_the_method_never_imports_them():
    package, tools = os.path.join(REPO, "ptunifier_min"), os.path.join(REPO, "tools")
    assert [t for t in TOOLS if os.path.exists(os.path.join(package, f"{t}.py"))] == []
    assert [t for t in TOOLS if not os.path.isfile(os.path.join(tools, f"{t}.py"))] == []
    # by the source, so that an import inside a function counts too; the pattern must find the
    # tests' own imports of the tools
    assert _imports_tools(_read(os.path.join(REPO, "tests", "tools", "test_bench.py")))
    paths = glob.glob(os.path.join(package, "**", "*.py"), recursive=True)
    assert len(paths) > 20, "the file pattern has gone stale"
    assert [os.path.relpath(p, REPO) for p in paths if _imports_tools(_read(p))] == []


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_runs_as_a_script_from_anywhere(tool, tmp_path):
    # no PYTHONPATH, another folder: the script finds the package itself
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), "--help"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: {tool}.py")


def test_every_command_and_file_the_readme_names_exists():
    readme = os.path.join(REPO, "README.md")
    _assert_exist([readme])
    with open(readme, encoding="utf-8") as f:
        files = set(re.findall(r"`((?:ptunifier_min|tests|tools)/[\w/]+\.py)`", f.read()))
    assert [p for p in sorted(files) if not os.path.isfile(os.path.join(REPO, p))] == []


def test_the_code_a_reader_reads_fits_in_100_columns():
    # the package, the three scripts, the tools and the tests; the one exception is the task table,
    # one row per task so that it reads as a table
    paths = glob.glob(os.path.join(REPO, "ptunifier_min", "**", "*.py"), recursive=True)
    paths += glob.glob(os.path.join(REPO, "tools", "*.py"))
    paths += [os.path.join(REPO, f) for f in ("train.py", "finetune.py", "eval.py")]
    paths += glob.glob(os.path.join(REPO, "tests", "**", "*.py"), recursive=True)
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
