"""Style gates run with the tests: ruff, mypy and the import layers must be clean."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_ruff_clean() -> None:
    done = _run("ruff", "check", "ppray", "actors", "tests", "benchmarks", "scripts")
    assert done.returncode == 0, done.stdout[-4000:]


def test_mypy_clean() -> None:
    done = _run("mypy", "ppray", "actors")
    assert done.returncode == 0, done.stdout[-4000:]


def test_import_layers_kept() -> None:
    """The import-linter contracts in pyproject.toml (layers, no cycles, no Ray in ppray)."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:]


def test_ppray_never_imports_the_ray_layer() -> None:
    """``ppray.actors`` is installed from actors/, where import-linter does not look."""
    offenders = []
    for path in sorted((REPO / "ppray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno} {n}"
                for n in names
                if n == "ppray.actors" or n.startswith("ppray.actors.")
            ]
    assert not offenders, offenders
