"""Photometric calibration: the zero point of an exposure from reference-catalog stars.

The zero point ``zp`` is the magnitude that gives 1 electron per second in
total, so that ``mag = zp - 2.5 log10(flux_e / exptime_s)``. Post-ISR images
are flat-fielded, so fluxes are in flat-fielded electrons and one zero point
holds for the whole detector. Each matched star gives
``zp_i = mag_ref + 2.5 log10(flux_i / exptime_s)`` with error
``1.0857 / snr_i`` plus a floor ``sys_err_mag`` in quadrature (so that the
brightest stars do not get all the weight, and reference-catalog and
colour-term scatter is allowed for). The zero point is their weighted mean
after an iterative clip at ``clip_sigma`` times a robust scatter (variable
stars, blends and mismatches).

Fluxes must be total: PSF fluxes (:func:`ppray.science.psf.psf_flux`) or
aperture fluxes times :func:`ppray.science.psf.aperture_correction`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ppray.science.stats import robust_sigma

__all__ = ["PhotoCalibResult", "fit_zero_point"]

_MAG_PER_LN = 2.5 / math.log(10.0)  # 1.0857: d mag / (d flux / flux)


@dataclass(frozen=True)
class PhotoCalibResult:
    """The outcome of :func:`fit_zero_point`.

    Attributes
    ----------
    zero_point_mag
        AB magnitude giving 1 e-/s (NaN when not ``ok``).
    zero_point_err_mag
        Its standard error (mag): the weighted-mean error, scaled up by the
        reduced chi-square when the stars scatter more than their errors say.
    n_stars
        Stars in the final mean.
    scatter_mag
        Robust (MAD) scatter of the stars' zero points about the mean (mag).
    ok
        Whether a zero point was measured.
    reason
        Empty when ``ok``; otherwise why not.
    """

    zero_point_mag: float
    zero_point_err_mag: float
    n_stars: int
    ok: bool
    reason: str = ""
    scatter_mag: float = math.nan


def _failed(reason: str, n: int = 0) -> PhotoCalibResult:
    return PhotoCalibResult(math.nan, math.nan, n, False, reason)


def fit_zero_point(
    flux_e: np.ndarray,
    flux_err_e: np.ndarray,
    ref_mag: np.ndarray,
    exptime_s: float,
    *,
    good: np.ndarray | None = None,
    min_snr: float = 20.0,
    sys_err_mag: float = 0.005,
    clip_sigma: float = 3.0,
    max_iter: int = 5,
    min_stars: int = 3,
) -> PhotoCalibResult:
    """Zero point from matched stars' total fluxes and reference magnitudes.

    Parameters
    ----------
    flux_e, flux_err_e
        Total fluxes of the matched sources and their errors (electrons), e.g.
        ``psf_flux`` at the positions of ``AstrometryResult.source_index``.
    ref_mag
        Reference magnitudes in the exposure's band, same order.
    exptime_s
        Exposure time (s).
    good
        Optional ``bool`` selection from the caller (e.g. unsaturated and
        unflagged sources); ``None`` keeps all.
    min_snr
        Minimum ``flux / flux_err`` of a star used.
    sys_err_mag
        Error floor added in quadrature to each star's (mag).
    clip_sigma
        Clip stars further than this many robust sigmas from the mean.
    max_iter
        Most clipping iterations.
    min_stars
        Fewest stars for a zero point.

    Returns
    -------
    PhotoCalibResult
        ``ok=False`` with a ``reason`` (never an exception) for no or too few
        usable stars, or a non-positive exposure time.
    """
    if not (exptime_s > 0 and math.isfinite(exptime_s)):
        return _failed(f"exposure time must be > 0, not {exptime_s!r}")
    flux = np.asarray(flux_e, dtype=np.float64).ravel()
    err = np.asarray(flux_err_e, dtype=np.float64).ravel()
    mag = np.asarray(ref_mag, dtype=np.float64).ravel()
    if not flux.size == err.size == mag.size:
        return _failed(f"array lengths differ: {flux.size}, {err.size}, {mag.size}")
    if flux.size == 0:
        return _failed("no matched stars")
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = flux / err
    use = np.isfinite(flux) & np.isfinite(mag) & (flux > 0) & (err > 0) & (snr > min_snr)
    if good is not None:
        use &= np.asarray(good, dtype=bool).ravel()
    n_use = int(use.sum())
    if n_use < min_stars:
        return _failed(f"{n_use} stars with S/N > {min_snr:g}, fewer than {min_stars}", n_use)
    zp = mag[use] + 2.5 * np.log10(flux[use] / exptime_s)
    sigma = np.hypot(_MAG_PER_LN / snr[use], sys_err_mag)
    w = 1.0 / sigma**2
    keep = np.ones(zp.size, dtype=bool)
    # Start from the median: outliers would drag a first weighted mean far enough
    # that the clip would throw out the good stars instead.
    mean = float(np.median(zp))
    # Not astropy's sigma_clip: the centre is a weighted mean, each star's bound is
    # the larger of the scatter and its own error, a clipped star may come back, and
    # a clip that would leave fewer than min_stars is not applied.
    for _ in range(max_iter):
        # Clip against the larger of the robust scatter and each star's own error,
        # so that a few precise stars cannot clip the honest faint ones.
        mad = robust_sigma(zp[keep], center=mean)
        new = np.abs(zp - mean) <= clip_sigma * np.maximum(mad, sigma)
        if new.sum() < min_stars:
            break
        mean = float(np.average(zp[new], weights=w[new]))
        converged = np.array_equal(new, keep)
        keep = new
        if converged:
            break
    mean = float(np.average(zp[keep], weights=w[keep]))
    n = int(keep.sum())
    err_mean = 1.0 / math.sqrt(float(w[keep].sum()))
    if n > 1:
        chi2 = float(np.sum(w[keep] * (zp[keep] - mean) ** 2)) / (n - 1)
        err_mean *= math.sqrt(max(chi2, 1.0))
    scatter = robust_sigma(zp[keep], center=mean)
    return PhotoCalibResult(
        zero_point_mag=mean,
        zero_point_err_mag=err_mean,
        n_stars=n,
        ok=True,
        reason="",
        scatter_mag=scatter,
    )
