"""Style gates run with the tests: ruff and mypy must be clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_ruff_clean() -> None:
    done = _run("ruff", "check", "ppray", "actors", "tests", "benchmarks")
    assert done.returncode == 0, done.stdout[-4000:]


def test_mypy_clean() -> None:
    done = _run("mypy", "ppray", "actors")
    assert done.returncode == 0, done.stdout[-4000:]
