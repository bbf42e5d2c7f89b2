"""Constants and robust statistics shared by the science and calibration steps.

One place for the Gaussian FWHM/sigma ratio and the MAD-to-sigma factor, so that
steps do not each carry their own rounding of them.

For a robust sigma about the median, call :func:`astropy.stats.mad_std` directly
(it uses :data:`MAD_TO_SIGMA`); for iterative clipping about the median, use
:func:`astropy.stats.sigma_clip`. :func:`robust_sigma` is for what ``mad_std``
does not do: ignore infinities as well as NaN, return NaN instead of warning
on no data, and take the absolute deviations about a given centre (e.g. a
weighted mean) instead of the median.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.stats import mad_std
from numpy.typing import ArrayLike

__all__ = ["FWHM_PER_SIGMA", "MAD_TO_SIGMA", "robust_sigma"]

FWHM_PER_SIGMA: float = 2.0 * math.sqrt(2.0 * math.log(2.0))
"""Full width at half maximum of a Gaussian over its sigma, ``2 sqrt(2 ln 2)`` = 2.35482."""

MAD_TO_SIGMA: float = float(mad_std(np.array([-1.0, 0.0, 1.0])))
"""Sigma of a normal distribution over its median absolute deviation, ``1 / Phi^-1(3/4)``.

Taken from :func:`astropy.stats.mad_std` itself (1.482602218505602), so that a MAD
scaled here and a ``mad_std`` can never disagree."""


def robust_sigma(values: ArrayLike, center: float | None = None) -> float:
    """Standard deviation from the median absolute deviation of the finite values.

    Parameters
    ----------
    values
        Any array; NaN and infinite values are left out.
    center
        The value the absolute deviations are taken about; ``None`` (default)
        uses the median of the finite values, as :func:`astropy.stats.mad_std`.

    Returns
    -------
    float
        ``MAD_TO_SIGMA * median(|values - center|)`` over the finite values, or
        NaN when there are none.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan
    if center is None:
        return float(mad_std(v))
    return float(MAD_TO_SIGMA * np.median(np.abs(v - center)))
