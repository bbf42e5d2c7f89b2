"""Deterministic APDB ids: ``diaSourceId``, ``diaForcedSourceId`` and ``diaObjectId``.

A retried visit must produce the same ids, so ids are packed from what the
visit is (exposure, detector, row index), never drawn from a counter.
"""

from __future__ import annotations

import datetime

import numpy as np
import numpy.typing as npt

__all__ = ["pack_id", "unpack_id"]

# Id bit layout (int64, sign bit 0): [62..29] exposure code (34 bits),
# [28..21] detector (8 bits, 0..255), [20..0] index (21 bits, 0..2_097_151).
# The exposure code is the exposure id itself below 2**33; a Rubin-style id
# YYYYMMDD * 100_000 + seq (>= 1.97e12) becomes 2**33 + days_since_1970 * 100_000 + seq,
# valid until 2205. This keeps 21 bits for sources: a crowded CCD cannot overflow it.
_INDEX_BITS = 21
_DETECTOR_BITS = 8
_CODE_BITS = 34
_PLAIN_LIMIT = 1 << (_CODE_BITS - 1)
_EPOCH = datetime.date(1970, 1, 1)


def _exposure_code(exposure_id: int) -> int:
    exposure_id = int(exposure_id)
    if 0 <= exposure_id < _PLAIN_LIMIT:
        return exposure_id
    day_obs, seq = divmod(exposure_id, 100_000)
    try:
        date = datetime.date(day_obs // 10_000, day_obs // 100 % 100, day_obs % 100)
    except ValueError:
        date = None
    days = (date - _EPOCH).days if date is not None else -1
    code = days * 100_000 + seq
    if date is None or days < 0 or code >= _PLAIN_LIMIT:
        raise ValueError(
            f"exposure id {exposure_id} fits neither id layout: < 2**33, or "
            "YYYYMMDD * 100000 + seq with 1970 <= YYYYMMDD < 2205"
        )
    return _PLAIN_LIMIT + code


def pack_id(exposure_id: int, detector: int, index: npt.ArrayLike) -> np.ndarray:
    """Deterministic ``int64`` ids from an exposure, a detector and per-row indices.

    Raises
    ------
    ValueError
        If the detector is outside 0..255, an index outside 0..2**21-1, or the
        exposure id fits neither layout (module comments).
    """
    if not 0 <= int(detector) < 1 << _DETECTOR_BITS:
        raise ValueError(f"detector {detector} is outside 0..{(1 << _DETECTOR_BITS) - 1}")
    idx = np.asarray(index, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << _INDEX_BITS):
        raise ValueError(f"row index outside 0..{(1 << _INDEX_BITS) - 1} for the id layout")
    head = (_exposure_code(exposure_id) << _DETECTOR_BITS | int(detector)) << _INDEX_BITS
    return np.int64(head) + idx


def unpack_id(packed: int) -> tuple[int, int, int]:
    """``(exposure_id, detector, index)`` of an id made by :func:`pack_id`."""
    packed = int(packed)
    index = packed & ((1 << _INDEX_BITS) - 1)
    detector = (packed >> _INDEX_BITS) & ((1 << _DETECTOR_BITS) - 1)
    code = packed >> (_INDEX_BITS + _DETECTOR_BITS)
    if code < _PLAIN_LIMIT:
        return code, detector, index
    days, seq = divmod(code - _PLAIN_LIMIT, 100_000)
    date = _EPOCH + datetime.timedelta(days=days)
    return (date.year * 10_000 + date.month * 100 + date.day) * 100_000 + seq, detector, index
