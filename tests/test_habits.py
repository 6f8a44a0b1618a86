"""The habits that keep the code as it is (issue 21 item 6): lint and format (ruff), the import layers
(import-linter) and the type checker (mypy), each configured in pyproject.toml. A violation fails
the test suite, with the tool's report as the failure message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the tools come with the dev extra, in the interpreter's environment


def _run(tool: str, *args: str, timeout: int = 600) -> None:
    executable = BIN / tool
    if not executable.exists():
        pytest.fail(f"{tool} is not installed next to {sys.executable}: pip install -e '.[dev]'")
    env = dict(os.environ)
    # this checkout's package, whatever the environment has installed (lint-imports imports it)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run(
        [str(executable), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        pytest.fail(
            f"{tool} {' '.join(args)} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}", pytrace=False
        )


def test_ruff_finds_nothing():
    _run("ruff", "check", "--no-fix", "src", "tests", "benchmarks")


def test_code_is_formatted():
    _run("ruff", "format", "--check", "src", "tests", "benchmarks")


def test_imports_keep_the_layers():
    _run("lint-imports", "--no-logo")  # the contracts in pyproject.toml


@pytest.mark.slow
def test_mypy_finds_nothing():
    _run("mypy", "--config-file", "pyproject.toml")
