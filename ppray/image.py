"""In-memory image containers shared by the simulator and the science steps."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.wcs import WCS

__all__ = ["Calibrations", "Exposure", "MaskBit", "RawExposure"]


class MaskBit(enum.IntFlag):
    """Bits of the ``uint32`` mask plane (LSST-like names)."""

    BAD = 1  # defect from the calibration (hot, dead, bad column)
    SAT = 2  # saturated in the raw
    CR = 4  # cosmic ray
    EDGE = 8  # too close to the edge to measure
    NO_DATA = 16  # no valid data (e.g. an all-NaN amplifier)
    DETECTED = 32  # part of a detected footprint


@dataclass(frozen=True)
class RawExposure:
    """One raw of one detector: its per-amplifier segments and header metadata.

    Attributes
    ----------
    segments
        Amplifier name -> raw segment in ADU, numpy ``[y, x]`` of
        ``DetectorLayout.raw_amp_shape`` (prescan, data, serial overscan;
        parallel overscan rows at the top).
    header
        The primary header as a plain dict (``INSTRUME``, ``DETNAME``,
        ``EXPTIME``, ``GROUPID``, ``EXPID``...).
    """

    segments: dict[str, np.ndarray]
    header: dict[str, Any]

    @property
    def exptime_s(self) -> float:
        return float(self.header["EXPTIME"])

    @property
    def darktime_s(self) -> float:
        return float(self.header.get("DARKTIME", self.header["EXPTIME"]))


@dataclass(frozen=True)
class Calibrations:
    """Master calibrations of one detector, assembled, in electrons.

    Attributes
    ----------
    bias
        Residual bias structure after overscan subtraction (e-), ``float32``.
    dark
        Dark current (e-/s), ``float32``.
    flat
        Flat field normalised to mean 1 over good pixels, ``float32``.
    defects
        ``True`` where a pixel is unusable (hot, dead, bad column).
    """

    bias: np.ndarray
    dark: np.ndarray
    flat: np.ndarray
    defects: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.bias.shape


@dataclass
class Exposure:
    """An assembled, calibrated image with variance and mask planes (all in electrons).

    ``image`` and ``variance`` are ``float32``; ``mask`` is ``uint32`` of :class:`MaskBit`.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape
