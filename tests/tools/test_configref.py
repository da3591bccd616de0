"""docs/config.md is what tools/configref.py generates from the config dataclasses."""

import os

from tools import configref

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_configuration_reference_is_what_the_command_generates():
    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        page = f.read()
    assert page == configref.reference(), \
        "docs/config.md is out of date: run python tools/configref.py > docs/config.md"
    assert "| `--pool-size` | 64 |" in page and "| `--retrieval-pairs` |" in page
