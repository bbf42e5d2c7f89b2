"""Focal-plane flat normalisation: a reduction over small per-detector statistics.

A camera's flats are normalised together, so that the focal plane's median
response is 1 while each detector keeps its response relative to the others
(what lets one zero point serve every detector). Each detector's actor
measures a :class:`FlatStatistics` from its own combined flat, a few kB; the
reduction (:func:`focal_plane_scales`) needs only those, never the images.

The focal-plane median is exact to the resolution of the quantiles: each
record carries ``n_quantiles`` quantiles of its good pixels, the reduction
builds the camera's cumulative distribution as the pixel-count-weighted
mixture of the detectors' (piecewise linear between quantiles) and finds
where it crosses one half. A median of medians would be wrong whenever the
detectors differ in size, good pixels or spread.

A combined flat from :mod:`ppray.calib.combine` has median about 1 (every
input was normalised by its own median); its level in electrons,
:attr:`~ppray.calib.combine.MasterResult.mean_scale`, is what carries the
detector's relative response, so pass it as ``scale``. All detectors must be
combined from the same flat exposures for those levels to be comparable.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "FlatStatistics",
    "apply_flat_scale",
    "flat_statistics",
    "focal_plane_median",
    "focal_plane_scales",
]


class FlatStatistics(BaseModel):
    """Statistics of one detector's combined flat, for the focal-plane reduction.

    Attributes
    ----------
    detector
        Detector name.
    scale
        The factor the flat was multiplied by before measuring (its level).
    n_good
        Good pixels measured.
    median
        Median of ``flat * scale`` over the good pixels.
    quantiles
        Quantiles of ``flat * scale`` at evenly spaced probabilities from 0 to 1.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    detector: str
    scale: float = Field(gt=0)
    n_good: int = Field(gt=0)
    median: float
    quantiles: tuple[float, ...] = Field(min_length=2)

    @field_validator("quantiles")
    @classmethod
    def _non_decreasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(b < a for a, b in itertools.pairwise(value)):
            raise ValueError("quantiles must be non-decreasing")
        return value


def flat_statistics(
    flat: np.ndarray,
    detector: str,
    *,
    good: np.ndarray | None = None,
    scale: float = 1.0,
    n_quantiles: int = 257,
) -> FlatStatistics:
    """Measure one detector's combined flat.

    Parameters
    ----------
    flat
        The combined flat (unnormalised, or normalised with its level in ``scale``).
    detector
        Detector name.
    good
        ``True`` on pixels to use, e.g. ``~defects.mask``; non-finite and
        non-positive pixels are always left out.
    scale
        Multiplies ``flat``: the detector's flat level (e-) for a flat with
        median 1, else 1.
    n_quantiles
        Quantiles to keep (>= 2); 257 resolve the median to ~1e-4 of a flat's
        spread of a few per cent.

    Raises
    ------
    ValueError
        When no pixel is good.
    """
    if n_quantiles < 2:
        raise ValueError(f"n_quantiles must be >= 2, not {n_quantiles!r}")
    values = np.asarray(flat, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        use = np.isfinite(values) & (values > 0)
    if good is not None:
        use &= np.asarray(good, dtype=bool)
    values = values[use] * float(scale)
    if values.size == 0:
        raise ValueError(f"flat of {detector}: no good pixels")
    q = np.quantile(values, np.linspace(0.0, 1.0, n_quantiles))
    return FlatStatistics(
        detector=detector,
        scale=float(scale),
        n_good=int(values.size),
        median=float(np.median(values)),
        quantiles=tuple(float(v) for v in np.maximum.accumulate(q)),
    )


def focal_plane_median(stats: Sequence[FlatStatistics]) -> float:
    """Median of ``flat * scale`` over every good pixel of the focal plane.

    The pixel-count-weighted mixture of the detectors' piecewise-linear
    distributions is linear between the union of their quantiles, so its
    half-way point is found exactly by interpolation there.

    Raises
    ------
    ValueError
        For an empty sequence.
    """
    if not stats:
        raise ValueError("no detector statistics to reduce")
    knots = np.unique(np.concatenate([np.asarray(s.quantiles) for s in stats]))
    total = float(sum(s.n_good for s in stats))
    cdf = np.zeros(knots.size)
    for s in stats:
        q = np.asarray(s.quantiles)
        p = np.linspace(0.0, 1.0, q.size)
        # Repeated quantiles (a narrow distribution) would confuse interp: keep the last.
        last = np.r_[q[1:] != q[:-1], True]
        cdf += s.n_good * np.interp(knots, q[last], p[last], left=0.0, right=1.0)
    cdf /= total
    k = int(np.searchsorted(cdf, 0.5))
    if k == 0:
        return float(knots[0])
    c0, c1 = cdf[k - 1], cdf[k]
    t = (0.5 - c0) / (c1 - c0) if c1 > c0 else 0.0
    return float(knots[k - 1] + t * (knots[k] - knots[k - 1]))


def focal_plane_scales(stats: Sequence[FlatStatistics]) -> dict[str, float]:
    """Per detector, the factor that brings its flat onto the focal plane's scale.

    Multiplying each detector's flat (as given to :func:`flat_statistics`) by
    its factor gives the whole camera's flat a median of 1 over good pixels
    and keeps the ratios between detectors: the factor is ``scale /
    focal_plane_median``.

    Raises
    ------
    ValueError
        For an empty sequence or a detector listed twice.
    """
    names = [s.detector for s in stats]
    if len(set(names)) != len(names):
        raise ValueError("a detector appears more than once")
    level = focal_plane_median(stats)
    if not level > 0:
        raise ValueError(f"focal-plane median {level!r} is not positive")
    return {s.detector: s.scale / level for s in stats}


def apply_flat_scale(flat: np.ndarray, factor: float) -> np.ndarray:
    """``flat * factor`` as a new ``float32`` image (NaN stays NaN)."""
    return np.asarray(flat, dtype=np.float32) * np.float32(factor)
