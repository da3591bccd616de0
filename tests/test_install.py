"""pip install makes `import ptunifier_min` work from any folder, with the declared dependencies;
every checkpoint records the version that wrote it."""

import os
import re
import shutil
import subprocess
import sys

import ptunifier_min
from ptunifier_min import checkpoint
from test_checkpoint import make

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(name):
    with open(os.path.join(REPO, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith(("#", "-r"))]


def test_the_checkout_installs_and_imports_from_another_folder(tmp_path):
    # a copy of what the build reads (setuptools writes build/ and *.egg-info into the source)
    src = tmp_path / "src"
    shutil.copytree(os.path.join(REPO, "ptunifier_min"), src / "ptunifier_min",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "requirements.txt"):
        shutil.copy(os.path.join(REPO, name), src / name)
    # no network: the installed setuptools builds it, no dependency is fetched
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                    "--no-deps", "--target", str(tmp_path / "site"), str(src)], check=True,
                   capture_output=True)
    elsewhere = tmp_path / "notebook"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-c", "import ptunifier_min, ptunifier_min.model; "
                          "print(ptunifier_min.__version__, ptunifier_min.__file__)"],
                         cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True, check=True)
    version, where = run.stdout.split()
    assert version == ptunifier_min.__version__ and where.startswith(str(tmp_path / "site"))
    meta = next((tmp_path / "site").glob("ptunifier_min-*.dist-info")) / "METADATA"
    text = meta.read_text()
    runtime = re.findall(r"^Requires-Dist: ([^;\n]+)$", text, re.M)
    extra = re.findall(r'^Requires-Dist: (.+); extra == "test"$', text, re.M)
    assert runtime == _lines("requirements.txt")  # exactly requirements.txt
    assert extra == _lines("requirements-dev.txt")  # the test extra: requirements-dev.txt's own
    assert "License-Expression: MIT" in text


def test_every_checkpoint_records_the_version_that_wrote_it(tmp_path):
    make(tmp_path)
    saved = checkpoint.read_checkpoint_config(checkpoint.resolve_checkpoint(str(tmp_path)))
    assert saved["version"] == ptunifier_min.__version__
