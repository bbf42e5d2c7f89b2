"""PSF measurement from bright isolated stars, PSF photometry and aperture corrections.

:func:`measure_psf` picks bright (S/N > ``min_snr``), unflagged, isolated
sources, fits each stamp with an elliptical Gaussian plus a constant by least
squares, and keeps the stars whose sizes agree (a sigma-clip on the fitted
FWHM rejects blends, galaxies and cosmic-ray residue). The model is constant
over the detector:

* ``fwhm_px``, ``sigma_px`` and ``ellipticity`` from the median of the fitted
  second moments. The fitted Gaussian is point-sampled while pixels integrate
  light, which adds ``1/12 px²`` to each axis' variance; that is taken off, so
  ``fwhm_px`` is the PSF's own width (the seeing), not that of its pixelised image.
* ``image``: the pixelised PSF on a ``stamp_size`` square, centred on its middle
  pixel and normalised to sum 1 — the median of the stars' stamps, each shifted
  to the centre with a cubic spline and divided by its fitted flux.

A detector with too few good stars (clouds, a crowded or empty field) gets a
model with ``ok=False``, a ``reason``, and a Gaussian of ``default_fwhm_px``,
so that later steps can still run; nothing here raises for bad data.

:func:`psf_flux` fits the PSF image's amplitude at fixed positions (linear
least squares with uniform weights: unbiased whatever the noise, with its error
from the variance plane). :func:`aperture_correction` is the median ratio of
PSF flux to aperture flux over good stars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import sep
from astropy.stats import mad_std, sigma_clip
from scipy import ndimage
from scipy.optimize import least_squares
from scipy.spatial import cKDTree
from scipy.special import erf

from ppray.image import Exposure, MaskBit
from ppray.science.stats import FWHM_PER_SIGMA

__all__ = [
    "PsfModel",
    "aperture_correction",
    "gaussian_psf_image",
    "measure_psf",
    "normalized_psf_image",
    "pixel_gaussian",
    "psf_flux",
]

# Pixels that must not inform a fit.
_UNUSABLE = np.uint32(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NO_DATA)
# Fitted flux, a fraction of a pixel of centroid and the shape do not need better
# than this; a looser tolerance halves least_squares' evaluations.
_FIT_TOL = 1e-6
_MIN_SIGMA_PX = 0.5
# The size clip: 3 robust sigma, but never narrower than 2% of the median size, for
# stars that agree so well that their MAD is smaller than the fit's own noise.
_SIZE_CLIP_SIGMA = 3.0
_SIZE_CLIP_FLOOR = 0.02
_SIZE_CLIP_ITERS = 3


@dataclass(frozen=True, eq=False)
class PsfModel:
    """A constant PSF model of one detector.

    Attributes
    ----------
    fwhm_px
        FWHM of the PSF (pixels), as if round: ``FWHM_PER_SIGMA * sigma_px`` (2.3548).
    sigma_px
        Gaussian sigma (pixels): the geometric mean of the major and minor axes.
    ellipticity
        ``1 - b/a`` of the fitted second moments.
    n_stars
        Number of stars that built the model (0 for the fallback).
    image
        Pixelised PSF, ``float64`` ``(stamp_size, stamp_size)``, peak at the
        middle pixel, summing to 1.
    ok
        Whether the model was measured; ``False`` for the fallback.
    reason
        Empty when ``ok``; otherwise why the fallback was used.
    ixx, iyy, ixy
        Second moments of the PSF (px²), without the pixel's ``1/12``.
    """

    fwhm_px: float
    sigma_px: float
    ellipticity: float
    n_stars: int
    image: np.ndarray
    ok: bool
    reason: str = ""
    ixx: float = math.nan
    iyy: float = math.nan
    ixy: float = 0.0


def gaussian_psf_image(fwhm_px: float, stamp_size: int = 25) -> np.ndarray:
    """A round Gaussian PSF integrated over pixels, centred on the middle pixel, sum 1.

    Parameters
    ----------
    fwhm_px
        FWHM (pixels).
    stamp_size
        Side of the (odd) stamp.

    Returns
    -------
    numpy.ndarray
        ``float64`` ``(stamp_size, stamp_size)``.
    """
    half = stamp_size // 2
    sigma = fwhm_px / FWHM_PER_SIGMA
    edges = np.arange(-half, half + 2) - 0.5
    profile = np.diff(erf(edges / (math.sqrt(2.0) * sigma)))
    image = np.outer(profile, profile)
    return image / image.sum()


def _fallback(reason: str, fwhm_px: float, stamp_size: int) -> PsfModel:
    sigma = fwhm_px / FWHM_PER_SIGMA
    return PsfModel(
        fwhm_px=float(fwhm_px),
        sigma_px=float(sigma),
        ellipticity=0.0,
        n_stars=0,
        image=gaussian_psf_image(fwhm_px, stamp_size),
        ok=False,
        reason=reason,
        ixx=sigma**2,
        iyy=sigma**2,
        ixy=0.0,
    )


def _stamps(
    array: np.ndarray, x: np.ndarray, y: np.ndarray, half: int, fill: float | int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square stamps about the nearest pixels to ``(x, y)``; outside the image is ``fill``.

    Returns the stamps ``(n, 2 half + 1, 2 half + 1)`` and their lower-left pixels.
    """
    ny, nx = array.shape
    cx = np.rint(x).astype(np.int64)
    cy = np.rint(y).astype(np.int64)
    offsets = np.arange(-half, half + 1)
    rows = cy[:, None] + offsets[None, :]
    cols = cx[:, None] + offsets[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    stamps = array[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    stamps = np.where(inside, stamps, fill)
    return stamps, cx - half, cy - half


def _select_stars(
    sources: pa.Table, shape: tuple[int, int], half: int, min_snr: float, max_stars: int
) -> np.ndarray:
    """Indices of bright, unflagged sources with stamps inside and free of bright neighbours."""
    if sources.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    x = sources["x"].to_numpy(zero_copy_only=False)
    y = sources["y"].to_numpy(zero_copy_only=False)
    flux = sources["flux"].to_numpy(zero_copy_only=False)
    snr = sources["snr"].to_numpy(zero_copy_only=False)
    flags = sources["flags"].to_numpy(zero_copy_only=False)
    ny, nx = shape
    ok = (
        np.isfinite(x)
        & np.isfinite(y)
        & (snr > min_snr)
        & (flags == 0)
        & (x >= half)
        & (x <= nx - 1 - half)
        & (y >= half)
        & (y <= ny - 1 - half)
    )
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        return cand
    # Isolated: no other source in the stamp brighter than 2% of the star, and none
    # at all within a third of it (whose light would bend the fitted shape).
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    tree = cKDTree(np.c_[x[finite], y[finite]])
    keep = []
    for i, neighbours in zip(
        cand, tree.query_ball_point(np.c_[x[cand], y[cand]], r=half * math.sqrt(2.0)), strict=True
    ):
        j = finite[np.asarray(neighbours, dtype=np.int64)]
        j = j[j != i]
        d = np.hypot(x[j] - x[i], y[j] - y[i])
        if np.any(d < half / 3.0) or np.any(np.nan_to_num(flux[j]) > 0.02 * flux[i]):
            continue
        keep.append(i)
    chosen = np.asarray(keep, dtype=np.int64)
    # The brightest stars constrain the shape best; more than a hundred add little
    # to a constant model and cost time.
    order = np.argsort(-snr[chosen], kind="stable")
    return chosen[order[:max_stars]]


def _gauss_model(p: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Elliptical Gaussian with total flux ``p[0]``, centre ``p[1:3]``, Cholesky shape, constant."""
    flux, x0, y0, l11, l21, l22, sky = p
    dx, dy = xx - x0, yy - y0
    # Precision-matrix square root L (lower triangular): |L^T d|^2 is the Mahalanobis
    # distance, and det(cov) = 1 / (l11 l22)^2, so every parameter vector is valid.
    u = l11 * dx + l21 * dy
    v = l22 * dy
    norm = abs(l11 * l22) / (2.0 * math.pi)
    return flux * norm * np.exp(-0.5 * (u * u + v * v)) + sky


def _fit_star(stamp: np.ndarray, weight: np.ndarray, sigma0: float) -> tuple[np.ndarray, bool]:
    """Least-squares Gaussian fit of one stamp (stamp coordinates); returns params and success."""
    k = stamp.shape[0]
    yy, xx = np.mgrid[:k, :k].astype(np.float64)
    c = (k - 1) / 2.0
    flux0 = float(np.sum(stamp * (weight > 0)))
    p0 = np.array([max(flux0, 1.0), c, c, 1.0 / sigma0, 0.0, 1.0 / sigma0, 0.0])
    sw = np.sqrt(weight)

    def resid(p: np.ndarray) -> np.ndarray:
        return ((_gauss_model(p, xx, yy) - stamp) * sw).ravel()

    try:
        res = least_squares(resid, p0, method="lm", xtol=_FIT_TOL, ftol=_FIT_TOL)
    except (ValueError, np.linalg.LinAlgError):
        return p0, False
    p = res.x
    ok = bool(
        res.success
        and p[0] > 0
        and abs(p[1] - c) < 2.0
        and abs(p[2] - c) < 2.0
        and abs(p[3] * p[5]) > 1e-6
    )
    return p, ok


def _moments(p: np.ndarray) -> tuple[float, float, float]:
    """Covariance ``(ixx, iyy, ixy)`` from the Cholesky factor of the precision matrix."""
    l11, l21, l22 = p[3], p[4], p[5]
    # Precision P = L L^T with L = [[l11, 0], [l21, l22]] acting on (dx, dy) as
    # u = l11 dx + l21 dy, v = l22 dy: P = [[l11², l11 l21], [l11 l21, l21² + l22²]].
    precision = np.array([[l11 * l11, l11 * l21], [l11 * l21, l21 * l21 + l22 * l22]])
    cov = np.linalg.inv(precision)
    return float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1])


def _size_spread(size: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``sigma_clip``'s ``stdfunc`` for the star sizes: ``mad_std`` with its floor.

    Clipped sizes arrive as NaN, hence the NaN-ignoring statistics.
    """
    spread = mad_std(size, axis=axis, ignore_nan=True)
    floor = _SIZE_CLIP_FLOOR / _SIZE_CLIP_SIGMA * np.nanmedian(size, axis=axis)
    return np.maximum(spread, floor)


def measure_psf(
    exposure: Exposure,
    sources: pa.Table,
    *,
    stamp_size: int = 25,
    min_snr: float = 50.0,
    min_stars: int = 5,
    max_stars: int = 100,
    default_fwhm_px: float = 4.0,
) -> PsfModel:
    """Measure a constant PSF from the bright isolated stars of an exposure.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (electrons) with variance and mask.
    sources
        Its detections, as from :func:`ppray.science.detection.detect_sources`
        (``x``, ``y``, ``flux``, ``snr``, ``flags``).
    stamp_size
        Side of the stamps and of ``PsfModel.image`` (odd; pixels).
    min_snr
        Minimum aperture S/N of a PSF star.
    min_stars
        Fewest good stars for a measured model.
    max_stars
        Most stars fitted (the brightest isolated ones).
    default_fwhm_px
        FWHM of the fallback model (e.g. the seeing forecast).

    Returns
    -------
    PsfModel
        ``ok=False`` with a ``reason`` and a Gaussian of ``default_fwhm_px``
        when fewer than ``min_stars`` good stars are found.

    Raises
    ------
    ValueError
        For an even or too small ``stamp_size``, or a non-positive ``default_fwhm_px``.
    """
    if stamp_size < 5 or stamp_size % 2 == 0 or not default_fwhm_px > 0:
        raise ValueError(
            f"stamp_size must be odd and >= 5 and default_fwhm_px > 0, not "
            f"{stamp_size}, {default_fwhm_px}"
        )
    half = stamp_size // 2
    chosen = _select_stars(sources, exposure.shape, half, min_snr, max_stars)
    if chosen.size < min_stars:
        return _fallback(
            f"{chosen.size} isolated unflagged stars with S/N > {min_snr:g}, "
            f"fewer than {min_stars}",
            default_fwhm_px,
            stamp_size,
        )
    x = sources["x"].to_numpy(zero_copy_only=False)[chosen]
    y = sources["y"].to_numpy(zero_copy_only=False)[chosen]
    image, _, _ = _stamps(exposure.image, x, y, half, 0.0)
    variance, _, _ = _stamps(exposure.variance, x, y, half, np.inf)
    mask, _, _ = _stamps(exposure.mask, x, y, half, int(MaskBit.NO_DATA))
    with np.errstate(divide="ignore"):
        weight = np.where(
            ((mask & _UNUSABLE) == 0) & np.isfinite(variance) & (variance > 0), 1.0 / variance, 0.0
        )
    image = np.where(weight > 0, image, 0.0).astype(np.float64)

    sigma0 = default_fwhm_px / FWHM_PER_SIGMA
    params, good = [], []
    for i in range(chosen.size):
        p, ok = _fit_star(image[i], weight[i], sigma0)
        params.append(p)
        good.append(ok)
    fitted = np.asarray(params)
    good_arr = np.asarray(good)
    mom = np.array(
        [
            _moments(p) if g else (np.nan, np.nan, np.nan)
            for p, g in zip(fitted, good_arr, strict=True)
        ]
    )
    size = np.sqrt(np.abs(mom[:, 0] * mom[:, 1] - mom[:, 2] ** 2)) ** 0.5
    # Nothing the optics make is sharper than half a pixel: such "stars" are
    # cosmic rays or hot pixels that got past the earlier steps.
    good_arr &= np.isfinite(size) & (size > _MIN_SIGMA_PX)
    # Blends, galaxies and stars hit by cosmic rays are outliers in size: clip them.
    # Fewer than min_stars ends in the fallback whatever a clip would do, so skip it;
    # for the same reason, rounds after one that leaves fewer change only the count
    # the fallback's reason quotes.
    if good_arr.sum() >= min_stars:
        # axis=0: astropy then clips cumulatively (a star once out stays out); with
        # axis=None its final mask comes from the last bounds alone, which could let
        # back a star an earlier round clipped.
        clipped = sigma_clip(
            size[good_arr],
            sigma=_SIZE_CLIP_SIGMA,
            maxiters=_SIZE_CLIP_ITERS,
            cenfunc="median",
            stdfunc=_size_spread,
            axis=0,
            masked=True,
        )
        good_arr[np.flatnonzero(good_arr)] = ~np.ma.getmaskarray(clipped)
    n_good = int(good_arr.sum())
    if n_good < min_stars:
        return _fallback(
            f"{n_good} stars with a good Gaussian fit, fewer than {min_stars}",
            default_fwhm_px,
            stamp_size,
        )

    # The fit is of the pixelised image; the pixel box adds 1/12 px² to each axis.
    ixx = float(np.median(mom[good_arr, 0])) - 1.0 / 12.0
    iyy = float(np.median(mom[good_arr, 1])) - 1.0 / 12.0
    ixy = float(np.median(mom[good_arr, 2]))
    trace, det = ixx + iyy, ixx * iyy - ixy * ixy
    if not (ixx > 0 and iyy > 0 and det > 0):
        return _fallback(
            "fitted PSF moments are not positive definite", default_fwhm_px, stamp_size
        )
    disc = math.sqrt(max(trace * trace / 4.0 - det, 0.0))
    a2, b2 = trace / 2.0 + disc, trace / 2.0 - disc
    sigma = det**0.25
    ellipticity = 1.0 - math.sqrt(max(b2, 0.0) / a2)

    # Recentre each star on the middle pixel, scale to unit flux, and take the
    # median: robust to faint neighbours and to the odd masked pixel.
    sel = np.flatnonzero(good_arr)
    shifted = np.empty((sel.size, stamp_size, stamp_size))
    valid = np.empty((sel.size, stamp_size, stamp_size), dtype=bool)
    for k, i in enumerate(sel.tolist()):
        p = fitted[i]
        shift = (half - p[2], half - p[1])
        shifted[k] = ndimage.shift(image[i] - p[6], shift, order=3, mode="nearest") / p[0]
        valid[k] = (
            ndimage.shift((weight[i] > 0).astype(float), shift, order=1, mode="constant", cval=0.0)
            > 0.99
        )
    stack = np.where(valid, shifted, np.nan)
    with np.errstate(invalid="ignore"):
        psf_image = np.nanmedian(stack, axis=0) if valid.any(axis=0).all() else None
    if psf_image is None or not np.isfinite(psf_image).all() or psf_image.sum() <= 0:
        psf_image = gaussian_psf_image(sigma * FWHM_PER_SIGMA, stamp_size)
    else:
        psf_image = psf_image / psf_image.sum()
    return PsfModel(
        fwhm_px=sigma * FWHM_PER_SIGMA,
        sigma_px=sigma,
        ellipticity=ellipticity,
        n_stars=n_good,
        image=psf_image,
        ok=True,
        reason="",
        ixx=ixx,
        iyy=iyy,
        ixy=ixy,
    )


def psf_flux(
    exposure: Exposure, x: np.ndarray, y: np.ndarray, psf: PsfModel
) -> tuple[np.ndarray, np.ndarray]:
    """PSF fluxes at fixed positions by linear least squares.

    The PSF image, shifted to each position with a cubic spline, is fitted to
    the pixels of a ``psf.image``-sized stamp with uniform weights, leaving out
    ``BAD``, ``SAT``, ``CR`` and ``NO_DATA`` pixels: ``flux = sum(P d) / sum(P²)``
    and ``flux_err² = sum(P² var) / sum(P²)²``. Uniform weights keep the flux
    unbiased (weights from a variance plane that holds each pixel's own noise
    bias it low) and are optimal where the sky dominates the noise.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (electrons).
    x, y
        0-based pixel positions (arrays of one shape).
    psf
        The PSF model.

    Returns
    -------
    flux, flux_err
        ``float64`` arrays (electrons, total over the PSF image); NaN where the
        position is not finite or more than half the PSF's light falls on
        unusable or off-image pixels.
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    out_shape = x.shape
    x, y = x.ravel(), y.ravel()
    flux = np.full(x.size, np.nan)
    err = np.full(x.size, np.nan)
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if finite.size == 0:
        return flux.reshape(out_shape), err.reshape(out_shape)
    k = psf.image.shape[0]
    half = k // 2
    xs, ys = x[finite], y[finite]
    data, _, _ = _stamps(exposure.image, xs, ys, half, 0.0)
    var, _, _ = _stamps(exposure.variance, xs, ys, half, np.inf)
    msk, _, _ = _stamps(exposure.mask, xs, ys, half, int(MaskBit.NO_DATA))
    usable = ((msk & _UNUSABLE) == 0) & np.isfinite(var) & np.isfinite(data)
    # Sample the PSF at (stamp pixel - sub-pixel offset) for every source at once;
    # the spline coefficients are computed once.
    coeffs = ndimage.spline_filter(psf.image, order=3, mode="constant")
    fx = xs - np.rint(xs)
    fy = ys - np.rint(ys)
    grid = np.arange(k, dtype=np.float64)
    rows = grid[None, :, None] - fy[:, None, None] + np.zeros((1, 1, k))
    cols = grid[None, None, :] - fx[:, None, None] + np.zeros((1, k, 1))
    model = ndimage.map_coordinates(
        coeffs,
        [rows.ravel(), cols.ravel()],
        order=3,
        mode="constant",
        cval=0.0,
        prefilter=False,
    ).reshape(finite.size, k, k)
    model_u = np.where(usable, model, 0.0)
    sum_pp = np.einsum("nij,nij->n", model_u, model_u)
    sum_pd = np.einsum("nij,nij->n", model_u, np.where(usable, data, 0.0))
    sum_ppv = np.einsum("nij,nij->n", model_u * model_u, np.where(usable, var, 0.0))
    covered = model_u.sum(axis=(1, 2)) / np.maximum(model.sum(axis=(1, 2)), 1e-30)
    ok = (covered > 0.5) & (sum_pp > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = sum_pd / sum_pp
        e = np.sqrt(sum_ppv) / sum_pp
    flux[finite[ok]] = f[ok]
    err[finite[ok]] = e[ok]
    return flux.reshape(out_shape), err.reshape(out_shape)


def aperture_correction(
    exposure: Exposure,
    sources: pa.Table,
    psf: PsfModel,
    aperture_radius_px: float,
    *,
    min_snr: float = 50.0,
    min_stars: int = 5,
) -> float:
    """The factor that turns circular-aperture fluxes into total (PSF) fluxes.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (electrons).
    sources
        Detections (``x``, ``y``, ``snr``, ``flags``).
    psf
        The PSF model.
    aperture_radius_px
        Radius of the aperture to correct (pixels).
    min_snr
        Minimum S/N of the stars used.
    min_stars
        Fewest stars for a measured correction.

    Returns
    -------
    float
        Median of ``psf_flux / aperture_flux`` over unflagged stars with S/N >
        ``min_snr``; with fewer than ``min_stars`` such stars (or an
        ``ok=False`` PSF), ``1 / (fraction of psf.image inside the aperture)``.
    """
    k = psf.image.shape[0]
    half = k // 2
    yy, xx = np.mgrid[:k, :k]
    # The model's own encircled energy, sampled finely enough for a few-pixel radius.
    sub = 5
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    inside = np.zeros((k, k))
    for oy in offs:
        for ox in offs:
            inside += np.hypot(xx + ox - half, yy + oy - half) <= aperture_radius_px
    model_value = 1.0 / max(float(np.sum(psf.image * inside / sub**2)), 1e-6)
    if not psf.ok or sources.num_rows == 0:
        return model_value
    snr = sources["snr"].to_numpy(zero_copy_only=False)
    flags = sources["flags"].to_numpy(zero_copy_only=False)
    sel = np.flatnonzero((snr > min_snr) & (flags == 0))
    if sel.size < min_stars:
        return model_value
    x = sources["x"].to_numpy(zero_copy_only=False)[sel]
    y = sources["y"].to_numpy(zero_copy_only=False)[sel]
    pflux, _ = psf_flux(exposure, x, y, psf)
    data = np.ascontiguousarray(exposure.image, dtype=np.float32)
    bad = (exposure.mask & _UNUSABLE) != 0
    aflux, _, aflag = sep.sum_circle(data, x, y, aperture_radius_px, mask=bad, subpix=5)
    good = (
        np.isfinite(pflux) & (np.asarray(aflux) > 0) & ((np.asarray(aflag) & sep.APER_TRUNC) == 0)
    )
    if good.sum() < min_stars:
        return model_value
    return float(np.median(pflux[good] / np.asarray(aflux)[good]))


def pixel_gaussian(offset: np.ndarray, sigma: float, half: int) -> np.ndarray:
    """Pixel-integrated 1-D Gaussians over pixels ``-half..half`` around sub-pixel ``offset``.

    Returns ``(len(offset), 2 * half + 1)``: differences of the error function at the
    pixel edges, so each row sums to the enclosed flux and is centred on its offset.
    """
    edges = np.arange(-half, half + 2, dtype=np.float64) - 0.5
    cdf = erf((edges[None, :] - offset[:, None]) / (math.sqrt(2.0) * sigma))
    return np.asarray(0.5 * np.diff(cdf, axis=1))


def normalized_psf_image(psf: np.ndarray) -> np.ndarray:
    """A PSF image checked (square, odd, finite, positive sum) and scaled to unit sum.

    Raises
    ------
    ValueError
        Saying which of those it is not.
    """
    kernel = np.asarray(psf, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 != 1:
        raise ValueError(f"a PSF image must be square with an odd size, not {kernel.shape}")
    if not (np.isfinite(kernel).all() and kernel.sum() > 0):
        raise ValueError("a PSF image must be finite with a positive sum")
    return kernel / kernel.sum()
