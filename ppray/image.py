"""In-memory image containers shared by the simulator and the science steps."""

from __future__ import annotations

import enum
import functools
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
    # On a difference image: within a satellite or aircraft streak's width (and a margin) along
    # its length, as ppray.science.streaks.find_streaks masks it; DIA sources there are its
    # fragments, not transients.
    STREAK = 64


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
    finite
        Every segment value is known to be finite (the file held integers, as a
        camera writes): ISR then skips looking for NaN and inf.
    """

    segments: dict[str, np.ndarray]
    header: dict[str, Any]
    finite: bool = False

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
        Flat field, ``float32``: the pixels' relative response, normalised across
        the focal plane (about 1 on average over the camera's good pixels, so a
        detector's own mean is its response relative to the others).
    defects
        ``True`` where a pixel is unusable (hot, dead, bad column).

    Planes derived for ISR (inverse flat, bias + dark, defect mask) are made on
    first use and kept: the arrays must not be changed in place afterwards.
    """

    bias: np.ndarray
    dark: np.ndarray
    flat: np.ndarray
    defects: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    # Derived planes; mutable contents of a frozen object, left out of eq and repr.
    _scratch: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.bias.shape

    @functools.cached_property
    def inverse_flat(self) -> np.ndarray:
        """``1 / flat`` (inf where the flat is 0), made once: ISR multiplies by it,
        as a division costs several multiplications on every pixel of every visit."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.float32(1.0) / self.flat

    def bias_and_dark(self, darktime_s: float) -> np.ndarray:
        """``bias + dark * darktime_s``, kept for the last ``darktime_s`` asked for.

        Visits repeat their dark time, so ISR reads one plane instead of two
        and skips a multiplication per pixel.
        """
        key = float(darktime_s)
        cached = self._scratch.get("bias_and_dark")
        if cached is None or cached[0] != key:
            plane = self.dark * np.float32(key)
            plane += self.bias
            cached = self._scratch["bias_and_dark"] = (key, plane)
        return cached[1]

    @functools.cached_property
    def defect_mask(self) -> np.ndarray:
        """``defects`` as ``uint32`` ``MaskBit.BAD`` bits, made once: ISR starts each
        mask from it with a plain copy instead of a conversion."""
        return self.defects.astype(np.uint32) * np.uint32(MaskBit.BAD)

    @functools.cached_property
    def all_finite(self) -> bool:
        """Whether bias, dark and flat hold no NaN or inf."""
        return all(bool(np.isfinite(p).all()) for p in (self.bias, self.dark, self.flat))

    @functools.cached_property
    def flat_ok(self) -> bool:
        """Whether every flat value is positive (a NaN is not)."""
        return bool(self.flat.min() > 0)


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
