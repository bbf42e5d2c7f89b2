"""Test and local-run helpers that ship with the library (a broker launcher)."""

from __future__ import annotations

__all__: list[str] = []
