"""The packages re-export their public API lazily (``__init__.pyi`` + ``lazy_loader``)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ("visit", "apdb", "alerts", "calib", "science", "fitsdiff")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package: str) -> None:
    """A stub that names something its module lacks fails here, not in production."""
    module = importlib.import_module(f"ppray.{package}")
    assert module.__all__, package
    for name in module.__all__:
        assert getattr(module, name) is not None, f"ppray.{package}.{name}"
    assert sorted(module.__all__) == sorted(set(module.__all__))
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018 - the lazy loader's __getattr__ must refuse it


def test_the_coordinator_state_starts_without_the_science() -> None:
    """What the coordinator, aggregator and APDB actors import does not pull in the
    science stack: their processes start faster and stay smaller."""
    code = (
        "import sys, ppray.visit.coordinator, ppray.visit.aggregate, ppray.calib.results;"
        "print(sorted(m for m in ('scipy.signal', 'scipy.stats', 'ppray.science', "
        "'ppray.visit.processor', 'sep', 'astroscrappy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
