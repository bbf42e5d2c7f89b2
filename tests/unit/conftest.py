"""Unit tests never start Ray."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _forbid_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("unit tests must not start Ray; put this test in tests/integration")

    monkeypatch.setattr(ray, "init", forbidden)
