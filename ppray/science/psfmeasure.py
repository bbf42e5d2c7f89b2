"""Measuring a detector's PSF model from its bright isolated stars (the PSFEx idea).

:func:`measure_psf` picks bright (S/N > ``min_snr``), unflagged, isolated
sources spread over the detector, measures each one's centre and size with
adaptive moments (vectorised: a least-squares fit per star cost ten times
more), drops the stars whose size departs from the detector's smooth trend
(blends, galaxies, cosmic-ray residue), and
fits every pixel of the PSF image as a polynomial of the position over the
stars (:class:`ppray.science.psf.PsfModel`):

1. each star's stamp, sky removed, is shifted so that its centre is on the
   middle pixel (Lanczos-3) and divided by its flux;
2. for each of the ``stamp_size²`` pixels, weighted linear least squares over
   the stars gives the pixel's polynomial coefficients; a star's weight is its
   normalised stamp's expected inverse variance (sky, read noise and the star's
   own photon noise from the current model, not from its data, which would bias
   bright pixels low);
3. the stars' fluxes are refitted with the model and the fit repeated; stars
   whose chi² is an outlier are dropped between rounds.

The order falls with the number of stars (``spatial_order`` needs at least
``_STARS_PER_TERM`` good stars per polynomial term); with fewer than
``min_stars`` the result is a Gaussian of ``default_fwhm_px`` with ``ok=False``
and a ``reason``, so that later steps can still run; nothing here raises for
bad data.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from astropy.stats import mad_std, sigma_clip
from scipy.spatial import cKDTree

from ppray.image import Exposure, MaskBit
from ppray.science.psf import PsfModel, adaptive_moments, poly_terms, poly_values, shift_images
from ppray.science.stats import FWHM_PER_SIGMA

__all__ = ["PSF_UNUSABLE_BITS", "cut_stamps", "measure_psf"]

# Pixels that must not inform a fit.
PSF_UNUSABLE_BITS = np.uint32(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NO_DATA)
_MIN_SIGMA_PX = 0.5
# The size clip: 3 robust sigma about the smooth trend, but never narrower than 3%
# of the size, for stars that agree better than the fit's own noise.
_SIZE_CLIP_SIGMA = 3.0
_SIZE_CLIP_FLOOR = 0.03
_SIZE_CLIP_ITERS = 3
# Good stars per polynomial term before an order is used (PSFEx asks for a few).
_STARS_PER_TERM = 4
# Stars are chosen over a grid of cells so that the model is constrained everywhere.
_GRID = 6
_CHI2_CLIP_SIGMA = 4.0
_ROUNDS = 3
# A small ridge on every pixel's normal equations: a pixel that few stars cover
# (stamps masked near their edge) stays finite.
_RIDGE = 1e-9


def cut_stamps(
    array: np.ndarray, x: np.ndarray, y: np.ndarray, half: int, fill: float | int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square stamps about the nearest pixels to ``(x, y)``; outside the image is ``fill``.

    Returns the stamps ``(n, 2 half + 1, 2 half + 1)`` and their central pixels
    ``(cx, cy)``.
    """
    ny, nx = array.shape
    cx = np.rint(x).astype(np.int64)
    cy = np.rint(y).astype(np.int64)
    offsets = np.arange(-half, half + 1)
    rows = cy[:, None] + offsets[None, :]
    cols = cx[:, None] + offsets[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    stamps = array[np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :]]
    return np.where(inside, stamps, fill), cx, cy


def _select_stars(
    sources: pa.Table, shape: tuple[int, int], half: int, min_snr: float, max_stars: int
) -> np.ndarray:
    """Bright, unflagged, isolated sources with stamps inside, spread over the detector."""
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
    # The brightest stars constrain the shape best; take them cell by cell over the
    # detector so that a spatial model is constrained everywhere, then by brightness.
    chosen = chosen[np.argsort(-snr[chosen], kind="stable")]
    cell = (y[chosen] * _GRID // ny).astype(np.int64) * _GRID + (x[chosen] * _GRID // nx).astype(
        np.int64
    )
    rank = np.zeros(chosen.size, dtype=np.int64)
    seen: dict[int, int] = {}
    for k, c in enumerate(cell.tolist()):
        rank[k] = seen.get(c, 0)
        seen[c] = rank[k] + 1
    order = np.lexsort((np.arange(chosen.size), rank))
    return chosen[order[:max_stars]]


def _star_shapes(
    image: np.ndarray, usable: np.ndarray, sigma0: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Centroid offsets, size, flux and fit quality of each star's stamp, vectorised.

    Adaptive moments (an elliptical Gaussian weight that follows the star) give
    the centroid and the geometric-mean sigma ``(ixx iyy - ixy²)^(1/4)``; the
    flux is the stamp's sum within the usable pixels (refined later with the
    PSF model itself).
    """
    ixx, iyy, ixy, ok, xc, yc = adaptive_moments(image, sigma0, usable, recentre=True)
    with np.errstate(invalid="ignore"):
        size = np.sqrt(np.maximum(ixx * iyy - ixy**2, 0.0)) ** 0.5
    flux = (image * usable).sum(axis=(1, 2))
    ok &= np.isfinite(size) & (flux > 0) & (np.abs(xc) < 2.0) & (np.abs(yc) < 2.0)
    return xc, yc, size, flux, ok


def _size_spread(size: np.ndarray, axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``sigma_clip``'s ``stdfunc`` for the size residuals: ``mad_std`` with its floor."""
    spread = mad_std(size, axis=axis, ignore_nan=True)
    return np.maximum(spread, _SIZE_CLIP_FLOOR / _SIZE_CLIP_SIGMA)


def _clip_sizes(
    size: np.ndarray, x: np.ndarray, y: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Which stars' sizes agree with the detector's smooth trend of size (a bool array).

    The trend is a plane in log size (the seeing changes across a detector, so a
    clip about one median would drop the good stars of one corner); outliers in
    size about it are blends, galaxies and stars hit by cosmic rays.
    """
    log_size = np.log(size)
    keep = np.ones(size.size, dtype=bool)
    order = 1 if size.size >= 4 * _STARS_PER_TERM else 0
    terms = poly_values(x, y, shape, order)
    resid = log_size - np.median(log_size)
    for _ in range(_SIZE_CLIP_ITERS):
        coef = np.linalg.lstsq(terms[keep], log_size[keep], rcond=None)[0]
        resid = log_size - terms @ coef
        # axis=0: astropy then clips cumulatively (a star once out stays out).
        clipped = sigma_clip(
            np.ma.masked_array(resid, ~keep),
            sigma=_SIZE_CLIP_SIGMA,
            maxiters=1,
            cenfunc="median",
            stdfunc=_size_spread,
            axis=0,
            masked=True,
        )
        new_keep = keep & ~np.ma.getmaskarray(clipped)
        if new_keep.sum() == keep.sum() or new_keep.sum() < 3:
            break
        keep = new_keep
    return keep


def _fallback(reason: str, fwhm_px: float, stamp_size: int) -> PsfModel:
    return PsfModel.gaussian(fwhm_px, stamp_size, ok=False, reason=reason)


def _fit_pixels(
    stamps: np.ndarray,
    weights: np.ndarray,
    terms: np.ndarray,
) -> np.ndarray:
    """Per pixel, weighted least squares of the normalised stamps on the polynomial terms.

    ``stamps`` and ``weights`` are ``(n, k, k)``, ``terms`` ``(n, m)``; returns the
    coefficients ``(m, k, k)``.
    """
    m = terms.shape[1]
    ata = np.einsum("nm,nl,nyx->yxml", terms, terms, weights)
    atb = np.einsum("nm,nyx,nyx->yxm", terms, weights, stamps)
    scale = np.trace(ata, axis1=2, axis2=3)[..., None, None] / m
    ata = ata + _RIDGE * np.maximum(scale, 1e-30) * np.eye(m)
    coef = np.linalg.solve(ata, atb[..., None])[..., 0]
    return np.asarray(coef.transpose(2, 0, 1))


def _chosen_order(n_good: int, spatial_order: int) -> int:
    order = spatial_order
    while order > 0 and n_good < _STARS_PER_TERM * len(poly_terms(order)):
        order -= 1
    return order


def measure_psf(
    exposure: Exposure,
    sources: pa.Table,
    *,
    stamp_size: int = 25,
    min_snr: float = 50.0,
    min_stars: int = 5,
    max_stars: int = 200,
    spatial_order: int = 3,
    default_fwhm_px: float = 4.0,
) -> PsfModel:
    """Measure the PSF model of a detector from its bright isolated stars.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (electrons) with variance and mask.
    sources
        Its detections, as from :func:`ppray.science.detection.detect_sources`
        (``x``, ``y``, ``flux``, ``snr``, ``flags``).
    stamp_size
        Side of the stamps and of the model's image (odd; pixels).
    min_snr
        Minimum aperture S/N of a PSF star.
    min_stars
        Fewest good stars for a measured model.
    max_stars
        Most stars fitted (the brightest isolated ones, spread over the detector).
    spatial_order
        Highest order of the pixels' polynomials in the position; lower when
        there are too few stars for it.
    default_fwhm_px
        FWHM of the fallback model (e.g. the seeing forecast).

    Returns
    -------
    PsfModel
        Unit-stamp normalised (its flux scale is measured by
        :func:`ppray.science.psfphot.aperture_corrections`); ``ok=False`` with a
        ``reason`` and a Gaussian of ``default_fwhm_px`` when fewer than
        ``min_stars`` good stars are found.

    Raises
    ------
    ValueError
        For an even or too small ``stamp_size``, a negative ``spatial_order`` or
        a non-positive ``default_fwhm_px``.
    """
    if stamp_size < 5 or stamp_size % 2 == 0 or not default_fwhm_px > 0 or spatial_order < 0:
        raise ValueError(
            f"stamp_size must be odd and >= 5, default_fwhm_px > 0 and spatial_order >= 0, "
            f"not {stamp_size}, {default_fwhm_px}, {spatial_order}"
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
    image, cx, cy = cut_stamps(exposure.image, x, y, half, 0.0)
    variance, _, _ = cut_stamps(exposure.variance, x, y, half, np.inf)
    mask, _, _ = cut_stamps(exposure.mask, x, y, half, int(MaskBit.NO_DATA))
    usable = (
        ((mask & PSF_UNUSABLE_BITS) == 0)
        & np.isfinite(variance)
        & (variance > 0)
        & np.isfinite(image)
    )
    image = np.where(usable, image, 0.0).astype(np.float64)

    sigma0 = default_fwhm_px / FWHM_PER_SIGMA
    dx, dy, size, flux, good = _star_shapes(image, usable, sigma0)
    # Nothing the optics make is sharper than half a pixel: such "stars" are
    # cosmic rays or hot pixels that got past the earlier steps.
    good &= size > _MIN_SIGMA_PX
    if good.sum() >= min_stars:
        sel = np.flatnonzero(good)
        good[sel] = _clip_sizes(size[sel], x[sel], y[sel], exposure.shape)
    n_good = int(good.sum())
    if n_good < min_stars:
        return _fallback(
            f"{n_good} stars with good moments and a size on the trend, fewer than {min_stars}",
            default_fwhm_px,
            stamp_size,
        )

    # Centre each star on the middle pixel; what the background left is the ring's median.
    ring = np.hypot(*np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1))) > half - 2
    sky = np.array(
        [np.median(image[i][ring & usable[i]]) if (ring & usable[i]).any() else 0.0
         for i in range(chosen.size)]
    )  # fmt: skip
    flux = flux - sky * usable.sum(axis=(1, 2))
    good &= flux > 0
    centred = shift_images(np.where(usable, image - sky[:, None, None], 0.0), -dx, -dy)
    # A shifted pixel is usable where every input it was made from was.
    usable_c = shift_images(usable.astype(np.float64), -dx, -dy) > 0.999
    sky_var = np.array([np.median(variance[i][usable[i]]) for i in range(chosen.size)])
    xs = cx + dx
    ys = cy + dy

    keep = good.copy()
    model = None
    order = 0
    for _ in range(_ROUNDS):
        order = _chosen_order(int(keep.sum()), spatial_order)
        terms = poly_values(xs[keep], ys[keep], exposure.shape, order)
        norm = centred[keep] / flux[keep, None, None]
        # Expected variance of a normalised pixel: sky (and read noise) plus the
        # star's own photons, from the current model (or the stars' median stamp).
        current = (
            model.unit_images_at(xs[keep], ys[keep])
            if model is not None
            else np.broadcast_to(np.median(norm, axis=0), norm.shape)
        )
        expected = sky_var[keep, None, None] + flux[keep, None, None] * np.maximum(current, 0.0)
        w = usable_c[keep] * flux[keep, None, None] ** 2 / expected
        coef = _fit_pixels(norm, w, terms)
        model = PsfModel.from_coefficients(coef, exposure.shape, n_stars=int(keep.sum()))
        # Refit every star's flux with the model, and judge each star by its chi².
        unit = model.unit_images_at(xs, ys)
        wu = (
            usable_c
            * flux[:, None, None] ** 2
            / (sky_var[:, None, None] + flux[:, None, None] * np.maximum(unit, 0.0))
        )
        num = (unit * centred * wu).sum(axis=(1, 2)) / flux**2
        den = (unit * unit * wu).sum(axis=(1, 2)) / flux**2
        new_flux = np.where(den > 0, num / np.where(den > 0, den, 1.0), flux)
        flux = np.where(good & (new_flux > 0), new_flux, flux)
        resid = centred / flux[:, None, None] - unit
        chi2 = (resid**2 * wu).sum(axis=(1, 2)) / np.maximum(usable_c.sum(axis=(1, 2)), 1)
        med = float(np.median(chi2[keep]))
        spread = float(mad_std(chi2[keep]))
        new_keep = keep & (chi2 <= med + _CHI2_CLIP_SIGMA * max(spread, 0.05 * med))
        if new_keep.sum() < min_stars or new_keep.sum() == keep.sum():
            break
        keep = new_keep
    assert model is not None
    if not (model.fwhm_px > 0 and np.isfinite(model.image).all()):
        return _fallback("the fitted PSF model is not usable", default_fwhm_px, stamp_size)
    return model
