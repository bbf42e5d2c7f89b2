"""Error types that say whether a retry is safe."""

from __future__ import annotations

__all__ = ["NonRetriableError", "PprayError", "RetriableError", "ValidationFailure"]


class PprayError(Exception):
    """Base class of ppray's own errors."""

    retriable: bool = False


class RetriableError(PprayError):
    """A transient failure (storage not ready, raw not there yet): retrying may succeed."""

    retriable = True


class NonRetriableError(PprayError):
    """A failure that a retry would repeat (corrupt file, wrong shape, bad message)."""

    retriable = False


class ValidationFailure(NonRetriableError):
    """An input message failed validation.

    Parameters
    ----------
    kind
        What was being parsed (``"next_visit"``, ``"raw_arrival"``...).
    field
        Dotted name of the offending field, or ``""`` when the whole message is bad.
    reason
        Human-readable reason.
    """

    def __init__(self, kind: str, field: str, reason: str) -> None:
        self.kind = kind
        self.field = field
        self.reason = reason
        where = f" field {field!r}" if field else ""
        super().__init__(f"invalid {kind}:{where} {reason}")
