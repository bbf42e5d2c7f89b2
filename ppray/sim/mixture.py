"""Objects as mixtures of concentric elliptical Gaussians, integrated over pixels.

The realistic sky (:mod:`ppray.sim.realistic`) draws every object as a sum of
elliptical Gaussians: a PSF is a mixture approximating a Moffat profile, a
galaxy is a mixture approximating an exponential or de Vaucouleurs profile, and
a galaxy seen through a PSF is the mixture of every pair of their components,
whose covariances add. The profiles below *are* the truth: their FWHM (PSFs)
or half-light radius (galaxies) is exactly the scale they are given.

Pixel integration
-----------------
A pixel's value is the integral of the profile over its unit square. Each
Gaussian component is sampled at the centres of ``s x s`` sub-pixels with its
covariance increased by the variance of a sub-pixel's box, ``1 / (12 s^2)``
per axis: the sum is then the box integral up to the box's fourth cumulant,
a relative error of about ``2e-3 / (s sigma)^4`` at a component's centre (sigma
in pixels), and the flux and centroid are exact up to aliasing terms of order
``exp(-2 pi^2 s^2 sigma^2)``. ``s`` grows as a component narrows
(:func:`supersampling`), so the error stays below ``1e-4`` of a component's peak.

Stamps
------
Each component is evaluated on a square window about the object's centre
pixel, large enough that what lies outside is below ``floor_e`` electrons per
pixel and, summed over components, below a third of ``flux_loss`` of the flux.
A component whose peak is below ``floor_e`` is left out altogether while the
weights left out stay below two thirds of ``flux_loss``: faint stars do without
the faint far wings that bright stars need. What a stamp does not hold is
missing from the image (the truth flux is the object's total).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from scipy.optimize import brentq

__all__ = [
    "DEFAULT_FLOOR_E",
    "DEFAULT_FLUX_LOSS",
    "MAX_HALF_PX",
    "MOFFAT_BETA",
    "PROFILES",
    "mixture_stamp",
    "profile_mixture",
    "render_mixtures",
    "shape_matrix",
    "supersampling",
]

MOFFAT_BETA = 3.5
"""The Moffat index the PSF profile ``"moffat"`` approximates."""

# Weights and sigmas of five Gaussians fitted in log space to a Moffat of beta 3.5 and
# unit FWHM over 0-10 FWHM, with its half maximum held at r = 0.5: within 5% of it
# (relative to the peak) out to 8 FWHM, the wings then fall off faster. Gaussians
# fitted in the same way (weighted by sqrt(r)) to exp(-1.678 r / r_e) over 0.03-5 r_e
# (within 9% for r < 3) and to exp(-7.669 (r / r_e)^(1/4)) over 0.03-6 r_e (within
# 35%, worst in the cusp). Each is rescaled to its exact FWHM or half-light radius.
_RAW_PROFILES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "moffat": (
        (0.43343753, 0.47020703, 0.087430798, 0.0083518424, 0.00057280438),
        (0.37109152, 0.62677655, 1.0656466, 1.8354292, 3.366495),
    ),
    "gaussian": ((1.0,), (1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0))),)),
    "exponential": (
        (0.060545, 0.34168, 0.447489, 0.150286),
        (0.238787, 0.601999, 1.066424, 1.673162),
    ),
    "devaucouleurs": (
        (0.073915, 0.180673, 0.253871, 0.255336, 0.236205),
        (0.074877, 0.249345, 0.638391, 1.425428, 3.342542),
    ),
}
PROFILES: tuple[str, ...] = tuple(_RAW_PROFILES)
"""Profile names: PSFs ``"moffat"``, ``"gaussian"`` (scale: FWHM); galaxies
``"exponential"``, ``"devaucouleurs"`` (scale: half-light radius)."""
_PSF_PROFILES = ("moffat", "gaussian")

DEFAULT_FLOOR_E = 0.02
"""Electrons per pixel below which a stamp may end (1/300 of a 30 s sky's noise)."""
DEFAULT_FLUX_LOSS = 1.5e-3
"""Largest fraction of an object's flux its stamp may leave out."""
MAX_HALF_PX = 400
"""Largest stamp half-size (pixels): the reach of a 9th-magnitude star's wings."""

# Components are evaluated in chunks of about this many samples (float32: 16 MB).
_CHUNK_SAMPLES = 4_000_000


@cache
def profile_mixture(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Weights and sigmas of a named profile, scaled to unit FWHM or half-light radius.

    Parameters
    ----------
    name
        One of :data:`PROFILES`.

    Returns
    -------
    weights, sigmas
        ``(K,)`` arrays; the weights sum to 1. For the PSF profiles a round
        mixture of these sigmas (times the FWHM) has exactly that FWHM; for the
        galaxy profiles, exactly that half-light radius.
    """
    if name not in _RAW_PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {PROFILES}")
    w_raw, s_raw = (np.asarray(v, dtype=np.float64) for v in _RAW_PROFILES[name])
    w = w_raw / w_raw.sum()
    scale = _round_fwhm(w, s_raw) if name in _PSF_PROFILES else _round_hlr(w, s_raw)
    w.setflags(write=False)
    s = s_raw / scale
    s.setflags(write=False)
    return w, s


def _round_fwhm(w: np.ndarray, s: np.ndarray) -> float:
    """FWHM of a round mixture of Gaussians (weights ``w``, sigmas ``s``)."""

    def profile(r: float) -> float:
        return float(np.sum(w / s**2 * np.exp(-0.5 * (r / s) ** 2)))

    half = 0.5 * profile(0.0)
    return 2.0 * brentq(lambda r: profile(r) - half, 0.0, 10.0 * float(s.max()), xtol=1e-14)


def _round_hlr(w: np.ndarray, s: np.ndarray) -> float:
    """Half-light radius of a round mixture of Gaussians."""

    def enclosed(r: float) -> float:
        return float(np.sum(w * -np.expm1(-0.5 * (r / s) ** 2)))

    return brentq(lambda r: enclosed(r) - 0.5, 0.0, 10.0 * float(s.max()), xtol=1e-14)


def shape_matrix(
    ellipticity: np.ndarray | float, angle_rad: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unit-determinant shape ``(sxx, sxy, syy)`` of an ellipse.

    Parameters
    ----------
    ellipticity
        ``1 - b/a``, in ``[0, 1)``.
    angle_rad
        Angle of the major axis from the first axis towards the second.

    Returns
    -------
    sxx, sxy, syy
        ``R diag(1/q, q) R^T`` with ``q = b/a``: a round covariance ``sigma^2``
        times this has major and minor sigmas ``sigma / sqrt(q)`` and
        ``sigma sqrt(q)``, whose geometric mean is ``sigma``.
    """
    q = 1.0 - np.asarray(ellipticity, dtype=np.float64)
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    major, minor = 1.0 / q, q
    return major * c * c + minor * s * s, (major - minor) * c * s, major * s * s + minor * c * c


def supersampling(sigma_min_px: np.ndarray) -> np.ndarray:
    """Sub-pixels per axis for a component whose narrowest sigma is ``sigma_min_px``.

    Keeps the relative error of the pixel integral at a component's centre,
    about ``2e-3 / (s sigma)^4``, below ``1e-4``.
    """
    sigma = np.asarray(sigma_min_px, dtype=np.float64)
    return np.clip(np.ceil(2.2 / np.maximum(sigma, 1e-3)), 1, 8).astype(np.int64)


def _eigen(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and smallest eigenvalues of covariances stored as ``(..., 3)``."""
    cxx, cxy, cyy = cov[..., 0], cov[..., 1], cov[..., 2]
    mean = 0.5 * (cxx + cyy)
    spread = np.hypot(0.5 * (cxx - cyy), cxy)
    return mean + spread, np.maximum(mean - spread, 0.0)


def _add_component(
    out: np.ndarray,
    xc: np.ndarray,
    yc: np.ndarray,
    amp: np.ndarray,
    cov: np.ndarray,
    lo: int,
    hi: int,
    ss: int,
) -> None:
    """Add one pixel-integrated Gaussian per stamp to ``out[:, lo:hi, lo:hi]``, in place.

    ``xc``, ``yc`` are the centres in stamp pixel coordinates (pixel ``i``
    spans ``[i - 0.5, i + 0.5]``), ``amp`` the fluxes, ``cov`` the ``(n, 3)``
    covariances, ``ss`` the sub-pixels per axis.
    """
    n = out.shape[0]
    m = hi - lo
    sub = lo - 0.5 + (np.arange(m * ss) + 0.5) / ss
    dx = (sub[None, :] - xc[:, None]).astype(np.float32)
    dy = (sub[None, :] - yc[:, None]).astype(np.float32)
    box = 1.0 / (12.0 * ss * ss)
    a, b, c = cov[:, 0] + box, cov[:, 1], cov[:, 2] + box
    det = a * c - b * b
    with np.errstate(divide="ignore"):
        log_norm = np.log(amp / (2.0 * math.pi * np.sqrt(det) * ss * ss))
    # amp exp(-(c dx^2 - 2 b dx dy + a dy^2) / (2 det)): the inverse covariance expanded,
    # the normalisation folded into the exponent to save a pass over the samples.
    qx = (-0.5 * c / det).astype(np.float32)[:, None] * dx * dx
    qy = (-0.5 * a / det).astype(np.float32)[:, None] * dy * dy
    qy += log_norm.astype(np.float32)[:, None]
    bx = (b / det).astype(np.float32)[:, None] * dx
    arg = np.multiply(dy[:, :, None], bx[:, None, :])
    arg += qy[:, :, None]
    arg += qx[:, None, :]
    np.exp(arg, out=arg)
    if ss > 1:
        arg = _bin(arg, n, m, ss)
    out[:, lo:hi, lo:hi] += arg


def _bin(samples: np.ndarray, n: int, m: int, ss: int) -> np.ndarray:
    """Sum ``ss x ss`` blocks of ``(n, m ss, m ss)`` samples into ``(n, m, m)`` pixels.

    Strided additions: numpy's reduction over the reshaped sub-pixel axes is 15x slower.
    """
    rows = samples.reshape(n, m, ss, m * ss)
    acc = rows[:, :, 0, :].copy()
    for j in range(1, ss):
        acc += rows[:, :, j, :]
    cols = acc.reshape(n, m, m, ss)
    out = cols[..., 0].copy()
    for j in range(1, ss):
        out += cols[..., j]
    return out


def mixture_stamp(
    weights: np.ndarray, cov: np.ndarray, size: int, xc: float, yc: float
) -> np.ndarray:
    """One mixture integrated over the pixels of a ``size x size`` stamp.

    Parameters
    ----------
    weights
        ``(K,)`` component fluxes.
    cov
        ``(K, 3)`` covariances ``(cxx, cxy, cyy)`` in pixels².
    size
        Stamp side (pixels).
    xc, yc
        Centre in stamp pixel coordinates (pixel ``i`` spans ``[i - 0.5, i + 0.5]``).

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64, ``[y, x]``; every component over the whole stamp.
    """
    stamp = np.zeros((1, size, size), dtype=np.float32)
    ss = supersampling(np.sqrt(_eigen(cov)[1]))
    for k in range(weights.size):
        _add_component(
            stamp,
            np.array([xc]),
            np.array([yc]),
            np.array([weights[k]]),
            cov[k : k + 1],
            0,
            size,
            int(ss[k]),
        )
    return stamp[0].astype(np.float64)


def _bin_half(half: np.ndarray) -> np.ndarray:
    """Round stamp half-sizes up to a coarse ladder, so that few groups are vectorised."""
    step = np.where(half <= 12, 1, np.where(half <= 48, 4, 16))
    return -(-half // step) * step


def _stamp_plan(
    flux: np.ndarray,
    weights: np.ndarray,
    cov: np.ndarray,
    floor_e: float,
    flux_loss: float,
    max_half: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per object: stamp half-size; per component: half-size (-1: left out) and sub-pixels."""
    amp = flux[:, None] * weights
    lam_max, lam_min = _eigen(cov)
    box = 1.0 / 12.0
    det_px = (cov[..., 0] + box) * (cov[..., 2] + box) - cov[..., 1] ** 2
    peak = amp / (2.0 * math.pi * np.sqrt(det_px))
    # Leave out faint components, smallest weight first, within half the flux budget.
    order = np.argsort(weights, axis=1, kind="stable")
    w_sorted = np.take_along_axis(weights, order, axis=1)
    faint = np.take_along_axis(peak < floor_e, order, axis=1)
    drop_sorted = np.logical_and.accumulate(
        faint & (np.cumsum(w_sorted, axis=1) <= 2.0 / 3.0 * flux_loss), axis=1
    )
    drop = np.empty_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=1)
    kept = np.maximum((~drop & (weights > 0)).sum(axis=1), 1)[:, None]
    # A third of flux_loss for the windows' edges: half of it split evenly between the
    # components, half in proportion to their weights, so that light wide components
    # may end early and heavy ones need not reach far.
    budget = flux_loss / 6.0 * (np.where(drop, 0.0, weights) + 1.0 / kept)
    # On a square window of half-side h the largest value on its edge x = h is
    # exp(-h^2 / (2 cxx)) of the peak, and the light beyond it is at most both the light
    # beyond the inscribed circle, exp(-h^2 / (2 lam_max)), and the two marginal tails,
    # 2 exp(-h^2 / (2 max(cxx, cyy))) (smaller for elongated, tilted components).
    marginal = np.maximum(cov[..., 0], cov[..., 2]) + box
    with np.errstate(divide="ignore"):
        log_circle = np.log(np.maximum(weights / budget, 1.0))
        log_square = np.log(np.maximum(2.0 * weights / budget, 1.0))
        log_floor = np.log(np.maximum(peak / floor_e, 1.0))
    r_flux = np.minimum((lam_max + box) * log_circle, marginal * log_square)
    radius = np.sqrt(2.0 * np.maximum(r_flux, marginal * log_floor))
    comp_half = np.minimum(np.ceil(radius).astype(np.int64), max_half)
    comp_half = np.where(drop | (weights <= 0), -1, np.maximum(comp_half, 1))
    half = _bin_half(np.clip(comp_half.max(axis=1), 2, max_half))
    ss = np.where(comp_half >= 0, supersampling(np.sqrt(lam_min)), 0)
    return half, comp_half, ss


def render_mixtures(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    weights: np.ndarray,
    cov: np.ndarray,
    *,
    noise_e2: float,
    floor_e: float = DEFAULT_FLOOR_E,
    flux_loss: float = DEFAULT_FLUX_LOSS,
    max_half: int = MAX_HALF_PX,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render objects made of Gaussian components onto an image.

    Parameters
    ----------
    shape
        Numpy ``(ny, nx)`` of the image.
    x, y
        ``(n,)`` centres in 0-based pixel coordinates (objects may lie off the
        image; what reaches it is drawn).
    flux
        ``(n,)`` total fluxes (electrons).
    weights
        ``(n, K)`` fraction of each object's flux in each component (summing to 1).
    cov
        ``(n, K, 3)`` component covariances ``(cxx, cxy, cyy)`` in pixels²,
        without the pixel response (added here).
    noise_e2
        Variance per pixel of the background (electrons²), for the S/N.
    floor_e, flux_loss, max_half
        Where stamps may end (module docstring).
    out
        A float64 image to add to; a new one by default.

    Returns
    -------
    image
        ``out`` with the objects added.
    snr
        ``(n,)`` PSF-optimal S/N of each object alone:
        ``sqrt(sum_p m_p^2 / (m_p + noise_e2))`` over its stamp ``m``.
    peak
        ``(n,)`` expected electrons in each object's brightest pixel.
    """
    ny, nx = shape
    image = np.zeros(shape, dtype=np.float64) if out is None else out
    n = x.size
    snr, peak = np.zeros(n), np.zeros(n)
    if n == 0:
        return image, snr, peak
    half, comp_half, ss = _stamp_plan(flux, weights, cov, floor_e, flux_loss, max_half)
    col0 = np.floor(x + 0.5).astype(np.int64) - half
    row0 = np.floor(y + 0.5).astype(np.int64) - half
    reaches = (col0 < nx) & (col0 + 2 * half >= 0) & (row0 < ny) & (row0 + 2 * half >= 0)
    keys = np.column_stack([half, ss])
    uniq, inverse = np.unique(keys[reaches], axis=0, return_inverse=True)
    members_all = np.flatnonzero(reaches)
    inverse = inverse.reshape(-1)
    for g, key in enumerate(uniq):
        h = int(key[0])
        m = 2 * h + 1
        group = members_all[inverse == g]
        chunk = max(1, _CHUNK_SAMPLES // (m * m * int(max(key[1:].max(), 1)) ** 2))
        for start in range(0, group.size, chunk):
            idx = group[start : start + chunk]
            stamps = np.zeros((idx.size, m, m), dtype=np.float32)
            xc = h + (x[idx] - np.floor(x[idx] + 0.5))
            yc = h + (y[idx] - np.floor(y[idx] + 0.5))
            for k in np.flatnonzero(key[1:]):
                hk = int(comp_half[idx, k].max())
                amp = np.where(comp_half[idx, k] >= 0, flux[idx] * weights[idx, k], 0.0)
                _add_component(
                    stamps, xc, yc, amp, cov[idx, k], h - hk, h + hk + 1, int(key[1 + k])
                )
            flat = stamps.reshape(idx.size, -1)
            ratio = flat * flat
            ratio /= flat + np.float32(noise_e2)
            snr[idx] = np.sqrt(ratio.sum(axis=1, dtype=np.float64))
            peak[idx] = flat.max(axis=1)
            _paste(image, stamps, col0[idx], row0[idx])
    return image, snr, peak


def _paste(image: np.ndarray, stamps: np.ndarray, col0: np.ndarray, row0: np.ndarray) -> None:
    """Add each stamp at its origin, clipped to the image, in place."""
    ny, nx = image.shape
    m = stamps.shape[1]
    xa, ya = np.maximum(-col0, 0), np.maximum(-row0, 0)
    xb, yb = np.minimum(nx - col0, m), np.minimum(ny - row0, m)
    for i in range(stamps.shape[0]):
        if xa[i] >= xb[i] or ya[i] >= yb[i]:
            continue
        r, c = int(row0[i]), int(col0[i])
        image[r + ya[i] : r + yb[i], c + xa[i] : c + xb[i]] += stamps[
            i, ya[i] : yb[i], xa[i] : xb[i]
        ]
