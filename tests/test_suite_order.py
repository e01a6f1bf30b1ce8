"""The suite's own schedule: the long files start first (tests/conftest.py), which holds only while xdist keeps the
collection order and every listed file exists (a renamed one would silently start last again)."""

from __future__ import annotations

import shlex
import tomllib

from tests.conftest import LONGEST_FIRST, REPO


def test_the_longest_files_are_test_files_of_this_suite() -> None:
    files = {path.name for path in (REPO / "tests").glob("test_*.py")}
    assert set(LONGEST_FIRST) <= files, f"not test files: {sorted(set(LONGEST_FIRST) - files)}"
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)


def test_xdist_takes_whole_files_in_collection_order() -> None:
    options = shlex.split(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    )
    assert "--dist" in options and options[options.index("--dist") + 1] == "loadfile", "module fixtures built once"
    assert "--no-loadscope-reorder" in options, "xdist would start the files with the most tests first"
