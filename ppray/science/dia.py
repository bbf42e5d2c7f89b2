"""Detection and measurement of sources on a difference image (DIA).

Detection is a PSF matched filter. For independent pixel noise of variance
``V``, the best flux of a point source centred on pixel ``p`` is
``F(p) = sum_q P(q-p) D(q)/V(q) / sum_q P(q-p)²/V(q)`` with variance
``1 / sum_q P(q-p)²/V(q)``, so the S/N image is
``corr(D/V, P) / sqrt(corr(1/V, P²))``: two correlations of the whole image,
exact for any variance plane whose pixels are independent. Masked pixels get
``1/V = 0``, so the S/N beside them and the border stays honest.

A real difference image is not that: warping and PSF matching correlate its
noise, and what the matching leaves of the sky is not quite zero on the PSF's
scale. Per pixel the variance plane is right, but the filter sums ~``4 pi
sigma²`` pixels, and on a simulated LSST-like detector the S/N image's
scatter is 1.03-1.24 instead of 1; at 5 sigma that is 3-40 times the noise
peaks. So, by default (``snr_scale=None``), the S/N image is divided by its
own robust standard deviation (``mad_std`` over trusted pixels; never below
1, so the threshold is never lowered) and the fitted errors are multiplied by it:
``threshold_sigma`` is then in units of the noise the image really has.
``|S/N| >= threshold_sigma`` is thresholded for each sign; each
8-connected region gives one source at its extreme pixel (no deblending).

Noise alone, at 5 sigma with a 4 px FWHM Gaussian PSF, gives 0.83 detections
(either sign) per 2048 x 2048 image (mean of 12 seeds), ~3.3 per 4k x 4k; the
rate scales roughly as 1 / FWHM² (the number of independent PSF footprints).

Measurement, at the sub-pixel peak of the S/N image (a parabola through the
log of the S/N around the peak, exact for a Gaussian):

- ``psfFlux``: the linear fit above with the PSF shifted to that position;
  ``psfFluxErr`` its error times the S/N scale.
- ``xErr``, ``yErr``: the Cramér-Rao bound ``1 / sqrt(F^2 sum (dP/dx)^2 / V)``
  times the S/N scale.
- ``apFlux``: ``sep.sum_circle`` in a circular aperture, no aperture correction;
  ``apFluxErr`` times the S/N scale.
- ``ixx``, ``iyy``, ``ixy``: adaptive (Gaussian-weighted, iterated) second
  moments of the sign-corrected image, scaled to the object's own covariance
  (twice the weighted moments, exact for a Gaussian), px².
- Dipoles: a positive and a negative source closer than ``dipole_radius_fwhm``
  PSF FWHM become one source at their midpoint, ``isDipole`` set, measured
  there, with the lobes' PSF fluxes in ``dipoleMeanFlux`` (mean of the lobes'
  absolute fluxes) and ``dipoleFluxDiff`` (positive minus absolute negative),
  and their separation and position angle in ``dipoleLength`` (px) and
  ``dipoleAngle`` (deg, from +x towards +y, pointing from the negative lobe to
  the positive one). No dipole model is fitted: overlapping lobes push the
  filtered peaks apart (4 px reads ~5.6 px at 4 px FWHM) and share flux.
- Trails: ``isTrailed`` when the major axis of the moments exceeds
  ``trail_ratio`` times the PSF's (measured the same way on the PSF model);
  ``trailLength = sqrt(12 (lambda_max - lambda_psf))`` (px, exact for a
  Gaussian-convolved segment inside the stamp, short for longer trails) and
  ``trailAngle`` (deg); a trail's ``x, y`` is its moments' centroid.

Flags (as in :mod:`ppray.science.detection`): the low byte holds ``sep``'s
aperture flags (``APER_TRUNC`` 16, ``APER_HASMASKED`` 32, ``APER_ALLMASKED`` 64,
``APER_NONPOSITIVE`` 128); above them ``FLAG_EDGE`` (the PSF stamp runs off
the image, or an ``EDGE`` pixel is within the aperture), ``FLAG_SATURATED``
(``SAT`` within the aperture), ``FLAG_BAD`` (``BAD`` or ``CR`` within the
aperture), ``FLAG_CENTROID`` (the sub-pixel peak failed; ``x, y`` are the peak
pixel), ``FLAG_NO_DATA`` (``NO_DATA`` anywhere in the measurement stamp) and
``FLAG_SHAPE`` (the adaptive moments did not converge; ``ixx...`` are NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import scipy.fft
import sep
from astropy.stats import mad_std
from scipy import ndimage
from scipy.spatial import cKDTree

from ppray.image import Exposure, MaskBit
from ppray.science._fft import convolve_same
from ppray.science.detection import FLAG_BAD, FLAG_CENTROID, FLAG_EDGE, FLAG_SATURATED
from ppray.science.psf import PsfLike, PsfModel, as_psf_model

# fmt: off
__all__ = [
    "DIA_SOURCE_SCHEMA", "FLAG_BAD", "FLAG_CENTROID", "FLAG_EDGE", "FLAG_NO_DATA",
    "FLAG_SATURATED", "FLAG_SHAPE", "SNR_SCALE_KEY", "detect_dia_sources", "psf_snr_image",
    "snr_noise_scale",
]
# fmt: on

FLAG_NO_DATA = 1 << 12
FLAG_SHAPE = 1 << 13

# fmt: off
_FLOAT_COLUMNS = (
    "x", "y", "xErr", "yErr", "ra", "dec", "psfFlux", "psfFluxErr", "apFlux", "apFluxErr",
    "snr", "ixx", "iyy", "ixy",
)
_DIPOLE_TRAIL_COLUMNS = (
    "dipoleMeanFlux", "dipoleFluxDiff", "dipoleLength", "dipoleAngle", "trailLength",
    "trailAngle",
)
# fmt: on
DIA_SOURCE_SCHEMA = pa.schema(
    [
        pa.field("diaSourceIndex", pa.int64()),
        *[pa.field(name, pa.float64()) for name in _FLOAT_COLUMNS],
        *[pa.field(name, pa.bool_()) for name in ("isNegative", "isDipole", "isTrailed")],
        *[pa.field(name, pa.float64()) for name in _DIPOLE_TRAIL_COLUMNS],
        pa.field("nPix", pa.int32()),
        pa.field("flags", pa.int32()),
    ]
)
"""Columns of :func:`detect_dia_sources` (names follow Rubin's ``DiaSource`` where they
exist). Positions are 0-based numpy pixel coordinates; fluxes are in the difference
image's units (electrons); ``ra``, ``dec`` in degrees (NaN without a WCS)."""

# A kernel reaching 4 sigma holds all but ~1e-4 of a Gaussian's flux: plenty for a filter.
_KERNEL_SIGMAS = 4.0
# A PSF that varies is followed tile by tile: ~500 px, a few per cent of its change.
_TILE_PX = 512
# Filtering with the central PSF everywhere keeps at least this share of the best S/N
# (the normalised overlap of the two PSFs) at every tile: then one filter does.
_ONE_FILTER_EFFICIENCY = 0.999
# Fewest trusted pixels in a FWHM-wide box about a pixel for its S/N to count.
_MIN_CORE_COVERAGE = 0.5
# Moments need room for trails: at least 6 PSF sigma or 12 px either side of the peak.
_MOMENT_SIGMAS = 6.0
_MOMENT_MIN_HALF = 12
_MOMENT_ITERATIONS = 12
_SEPARABLE_TOL = 1e-4
# The noise scale needs only a sample of the S/N image: every 3rd pixel each way.
_SCALE_STRIDE = 3
SNR_SCALE_KEY = b"ppray.snr_scale"
"""Schema metadata key of :func:`detect_dia_sources`' table: the S/N scale applied."""


def _psf_model(psf: PsfLike) -> PsfModel:
    """The PSF as a model; a Gaussian sigma reaches ``_KERNEL_SIGMAS`` sigma (a filter
    needs no more)."""
    if isinstance(psf, PsfModel) or np.ndim(psf) != 0:
        return as_psf_model(psf)
    sigma = float(psf)
    if not sigma > 0:
        raise ValueError(f"psf sigma must be > 0, not {psf!r}")
    return as_psf_model(sigma, max(math.ceil(_KERNEL_SIGMAS * sigma), 2))


def _correlate(image: np.ndarray, kernel: np.ndarray, workers: int | None) -> np.ndarray:
    """``image`` correlated with ``kernel`` (zero outside), ``float32``, same shape.

    A rank-one kernel (a Gaussian) is two 1-D passes, 2-3x faster than an FFT on
    one core; anything else goes through an FFT.
    """
    u, s, vt = np.linalg.svd(kernel)
    if s[1] <= _SEPARABLE_TOL * s[0]:
        col = (u[:, 0] * math.sqrt(s[0])).astype(np.float32)
        row = (vt[0] * math.sqrt(s[0])).astype(np.float32)
        tmp = ndimage.correlate1d(image, row, axis=1, mode="constant", output=np.float32)
        return ndimage.correlate1d(tmp, col, axis=0, mode="constant", output=np.float32)
    with scipy.fft.set_workers(workers or 1):
        (out,) = convolve_same(image, [kernel[::-1, ::-1]])
    return out


def _clean_planes(
    exposure: Exposure, bad_mask_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data with untrusted pixels zeroed, inverse variance (0 there) and the untrusted mask."""
    data = np.asarray(exposure.image, dtype=np.float32)
    variance = np.asarray(exposure.variance, dtype=np.float32)
    untrusted = (exposure.mask & np.uint32(bad_mask_bits)) != 0
    # Two reductions decide whether the (slow) full-plane checks are needed at all.
    with np.errstate(invalid="ignore", over="ignore"):
        clean = bool(np.isfinite(np.add.reduce(data, axis=None))) and bool(
            variance.min() > 0 and variance.max() < np.inf
        )
    if not clean:
        untrusted = untrusted | ~(np.isfinite(data) & (variance > 0) & (variance < np.inf))
    with np.errstate(divide="ignore"):
        inv_var = np.float32(1.0) / variance
    if untrusted.any():
        inv_var = np.where(untrusted, np.float32(0.0), inv_var)
        data = np.where(untrusted, np.float32(0.0), data)
    return np.ascontiguousarray(data), inv_var, untrusted


def psf_snr_image(
    difference: Exposure,
    psf: PsfLike,
    *,
    bad_mask_bits: int = int(MaskBit.BAD | MaskBit.NO_DATA),
    workers: int | None = None,
) -> np.ndarray:
    """The PSF matched-filter S/N image of a difference exposure.

    Parameters
    ----------
    difference
        Difference exposure (electrons) with variance and mask; not modified.
    psf
        Gaussian PSF sigma (px), a pixel PSF image (odd square, centred), or a
        :class:`~ppray.science.psf.PsfModel` (used tile by tile where it varies).
    bad_mask_bits
        Mask bits whose pixels carry no information (weight zero).
    workers
        FFT threads for a non-separable PSF image (default 1).

    Returns
    -------
    numpy.ndarray
        ``float32`` S/N of a point source centred on each pixel (module docstring);
        0 where no trusted pixel is within the PSF's reach.
    """
    data, inv_var, _ = _clean_planes(difference, bad_mask_bits)
    return _snr(data, inv_var, _psf_model(psf), workers)


def _tiles(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of about ``size``-long pieces covering ``0..n``."""
    count = max(1, round(n / size))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


def _snr(data: np.ndarray, inv_var: np.ndarray, psf: PsfModel, workers: int | None) -> np.ndarray:
    """The matched filter's S/N image; a PSF that varies is used tile by tile.

    Each tile (about ``_TILE_PX`` square) is filtered with the PSF at its centre,
    with a margin of the PSF's reach, so the result is what a filter that follows
    the PSF would give, to the PSF's change across one tile. Where the central PSF
    keeps ``_ONE_FILTER_EFFICIENCY`` of the best S/N at every tile (a PSF that
    barely varies, or a model that varies only by its fit's noise), one filter of
    the whole image gives the same S/N in a fraction of the time.
    """
    ny, nx = data.shape
    tiles = [(y, x) for y in _tiles(ny, _TILE_PX) for x in _tiles(nx, _TILE_PX)]
    central = psf.unit_images_at(np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0]))[0]
    if not psf.order:
        return _snr_one(data, inv_var, central, workers)
    # Each tile's PSF, at its centre: both to decide and to filter with.
    kernels = psf.unit_images_at(
        np.array([(x0 + x1 - 1) / 2.0 for _, (x0, x1) in tiles]),
        np.array([(y0 + y1 - 1) / 2.0 for (y0, y1), _ in tiles]),
    )
    if _min_efficiency(kernels, central) >= _ONE_FILTER_EFFICIENCY:
        return _snr_one(data, inv_var, central, workers)
    reach = psf.half
    out = np.empty((ny, nx), dtype=np.float32)
    for ((y0, y1), (x0, x1)), kernel in zip(tiles, kernels, strict=True):
        ya, yb = max(y0 - reach, 0), min(y1 + reach, ny)
        xa, xb = max(x0 - reach, 0), min(x1 + reach, nx)
        piece = _snr_one(data[ya:yb, xa:xb], inv_var[ya:yb, xa:xb], kernel, workers)
        out[y0:y1, x0:x1] = piece[y0 - ya : y1 - ya, x0 - xa : x1 - xa]
    return out


def _min_efficiency(images: np.ndarray, central: np.ndarray) -> float:
    """The least share of the best S/N that filtering with ``central`` keeps where the
    PSF is each of ``images``: their normalised overlap (1 for the same shape)."""
    overlap = np.tensordot(images, central, axes=2)
    norms = np.sqrt(np.sum(images**2, axis=(1, 2)) * np.sum(central**2))
    return float(np.min(overlap / norms))


def _snr_one(
    data: np.ndarray, inv_var: np.ndarray, kernel: np.ndarray, workers: int | None
) -> np.ndarray:
    num = _correlate(data * inv_var, kernel, workers)
    den = _correlate(inv_var, kernel**2, workers)
    # Pixels with nothing trusted in reach have den == 0: S/N 0, not NaN.
    np.maximum(den, np.float32(1e-30), out=den)
    np.sqrt(den, out=den)
    num /= den
    return num


def snr_noise_scale(snr: np.ndarray, untrusted: np.ndarray, reach: int) -> float:
    """The robust standard deviation of an S/N image over pixels far from untrusted ones.

    Parameters
    ----------
    snr
        S/N image (:func:`psf_snr_image`).
    untrusted
        Pixels that carried no weight; their neighbours within ``reach`` px
        (the filter's half-width) are left out too, as their S/N is computed
        from fewer pixels.
    reach
        Half-width of the filter (px).

    Returns
    -------
    float
        :func:`astropy.stats.mad_std` of the S/N of a sample of the remaining pixels, or
        1.0 when fewer than 1000 remain. Sources barely move it: a median is
        unmoved by the few per cent of pixels they cover.
    """
    step = (slice(None, None, _SCALE_STRIDE),) * 2
    sample = snr[step]
    if untrusted.any():
        near = ndimage.maximum_filter(untrusted, size=2 * reach + 1)[step]
        sample = sample[~near]
    sample = sample[np.isfinite(sample)].ravel()
    if sample.size < 1000:
        return 1.0
    return float(mad_std(sample))


def _peaks(
    snr: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Peak pixel (iy, ix), sign and pixel count of each region with ``|S/N| >= threshold``."""
    structure = np.ones((3, 3), dtype=bool)
    out_y, out_x, out_sign, out_n = [], [], [], []
    for sign, region in ((1, snr >= threshold), (-1, snr <= -threshold)):
        labels, n = ndimage.label(region, structure=structure)
        if n == 0:
            continue
        pix = np.flatnonzero(region)
        lab = labels.reshape(-1)[pix]
        value = sign * snr.reshape(-1)[pix]
        # Per region, the pixel of largest |S/N|: sort by label, then by descending value.
        order = np.lexsort((-value, lab))
        first = order[np.r_[0, np.flatnonzero(np.diff(lab[order])) + 1]]
        iy, ix = np.divmod(pix[first], snr.shape[1])
        out_y.append(iy)
        out_x.append(ix)
        out_sign.append(np.full(n, sign, dtype=np.int64))
        out_n.append(np.bincount(lab, minlength=n + 1)[1:])
    if not out_y:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    return (
        np.concatenate(out_y),
        np.concatenate(out_x),
        np.concatenate(out_sign),
        np.concatenate(out_n),
    )


def _subpixel(
    snr: np.ndarray, iy: np.ndarray, ix: np.ndarray, sign: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-pixel peak of the S/N image: a parabola through log S/N (exact for Gaussians)."""
    ny, nx = snr.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return sign * snr[np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)].astype(
            np.float64
        )

    c = at(0, 0)
    offsets, ok = [], np.ones(iy.size, dtype=bool)
    for lo, hi, pos, size in ((at(0, -1), at(0, 1), ix, nx), (at(-1, 0), at(1, 0), iy, ny)):
        inside = (pos > 0) & (pos < size - 1) & (lo > 0) & (hi > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            llo, lc, lhi = np.log(lo), np.log(c), np.log(hi)
            curv = llo - 2.0 * lc + lhi
            off = 0.5 * (llo - lhi) / curv
        good = inside & (curv < 0) & (np.abs(off) <= 1.0)
        ok &= good
        offsets.append(np.where(good, off, 0.0))
    return ix + offsets[0], iy + offsets[1], ~ok


def _stamps(
    plane: np.ndarray, cy: np.ndarray, cx: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray]:
    """Square stamps of ``plane`` around pixels (cy, cx), and which stamp pixels are inside."""
    ny, nx = plane.shape
    off = np.arange(-half, half + 1)
    rows, cols = cy[:, None] + off[None, :], cx[:, None] + off[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    r = np.clip(rows, 0, ny - 1)[:, :, None]
    c = np.clip(cols, 0, nx - 1)[:, None, :]
    return plane[r, c], inside


def _model_stamps(
    psf: PsfModel, cx: np.ndarray, cy: np.ndarray, dx: np.ndarray, dy: np.ndarray, half: int
) -> np.ndarray:
    """The local PSF at pixels (cx, cy), centred at offsets (dx, dy) from them."""
    return psf.images_at(cx, cy, dx=dx, dy=dy, half=half)


def _adaptive_moments(
    stamps: np.ndarray, weight_ok: np.ndarray, dx0: np.ndarray, dy0: np.ndarray, sigma: float
) -> tuple[np.ndarray, ...]:
    """Adaptive moments (object covariance, px², and centroid) of sign-corrected stamps.

    The weight starts as the PSF at the centroid and becomes, each iteration, a
    Gaussian with the covariance just measured: for a Gaussian object the
    weighted moments converge to half its covariance, so twice them is returned,
    with the weighted centroid (offsets from the stamps' central pixels).
    """
    n, size, _ = stamps.shape
    half = size // 2
    grid = np.arange(-half, half + 1, dtype=np.float64)
    gx, gy = grid[None, None, :], grid[None, :, None]
    xc, yc = dx0.astype(np.float64).copy(), dy0.astype(np.float64).copy()
    wxx = np.full(n, sigma**2)
    wyy = wxx.copy()
    wxy = np.zeros(n)
    lo, hi = 0.25 * sigma**2, float(half) ** 2
    mxx = myy = mxy = np.full(n, np.nan)
    good = np.ones(n, dtype=bool)
    for _ in range(_MOMENT_ITERATIONS):
        det = wxx * wyy - wxy**2
        ax, ay, axy = ((w / det)[:, None, None] for w in (wyy, wxx, wxy))
        ddx, ddy = gx - xc[:, None, None], gy - yc[:, None, None]
        w = np.exp(-0.5 * (ax * ddx**2 + ay * ddy**2 - 2.0 * axy * ddx * ddy)) * weight_ok
        wi = w * stamps
        i0 = wi.sum(axis=(1, 2))
        good &= i0 > 0
        i0 = np.where(i0 > 0, i0, 1.0)
        mx = (wi * ddx).sum(axis=(1, 2)) / i0
        my = (wi * ddy).sum(axis=(1, 2)) / i0
        mxx = (wi * ddx**2).sum(axis=(1, 2)) / i0 - mx**2
        myy = (wi * ddy**2).sum(axis=(1, 2)) / i0 - my**2
        mxy = (wi * ddx * ddy).sum(axis=(1, 2)) / i0 - mx * my
        good &= (mxx > 0) & (myy > 0) & (mxx * myy - mxy**2 > 0)
        # Keep the centroid on the stamp and the weight between a quarter of the PSF
        # and the stamp: noise must not send either off to infinity.
        xc = np.clip(xc + np.where(good, mx, 0.0), -half / 2, half / 2)
        yc = np.clip(yc + np.where(good, my, 0.0), -half / 2, half / 2)
        wxx = np.where(good, np.clip(2.0 * mxx, lo, hi), wxx)
        wyy = np.where(good, np.clip(2.0 * myy, lo, hi), wyy)
        wxy = np.where(
            good, np.clip(2.0 * mxy, -0.99 * np.sqrt(wxx * wyy), 0.99 * np.sqrt(wxx * wyy)), wxy
        )
    ixx, iyy, ixy = (np.where(good, 2.0 * m, np.nan) for m in (mxx, myy, mxy))
    return ixx, iyy, ixy, good, xc, yc


def _eigen(ixx: np.ndarray, iyy: np.ndarray, ixy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Major-axis eigenvalue and its angle (deg, from +x towards +y) of 2x2 moments."""
    mean = 0.5 * (ixx + iyy)
    rad = np.sqrt(0.25 * (ixx - iyy) ** 2 + ixy**2)
    return mean + rad, np.degrees(0.5 * np.arctan2(2.0 * ixy, ixx - iyy))


def _stamp_half(psf: PsfModel) -> int:
    return max(math.ceil(_MOMENT_SIGMAS * psf.sigma_px), _MOMENT_MIN_HALF, psf.half)


@dataclass(frozen=True)
class _Planes:  # data, inverse variance and variance are 0 on untrusted pixels
    data: np.ndarray
    inv_var: np.ndarray
    variance: np.ndarray
    untrusted: np.ndarray
    mask: np.ndarray


def _measure(
    planes: _Planes,
    psf: PsfModel,
    x: np.ndarray,
    y: np.ndarray,
    sign: np.ndarray,
    aperture_radius: float,
) -> dict[str, np.ndarray]:
    """PSF and aperture fluxes, centroid errors, moments and mask flags at (x, y)."""
    ny, nx = planes.data.shape
    cx, cy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    dx, dy = x - cx, y - cy
    half = _stamp_half(psf)
    data, inside = _stamps(planes.data, cy, cx, half)
    weight, _ = _stamps(planes.inv_var, cy, cx, half)
    weight = weight.astype(np.float64) * inside
    data = data.astype(np.float64)
    model = _model_stamps(psf, cx, cy, dx, dy, half)

    info = (model**2 * weight).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(info > 0, (model * data * weight).sum(axis=(1, 2)) / info, np.nan)
        flux_err = np.where(info > 0, 1.0 / np.sqrt(info), np.nan)
        # Cramér-Rao bound of the position for a known flux: 1 / sqrt(F² Σ (dP/dx)² / V).
        f2 = flux**2
        x_err = 1.0 / np.sqrt(f2 * (np.gradient(model, axis=2) ** 2 * weight).sum(axis=(1, 2)))
        y_err = 1.0 / np.sqrt(f2 * (np.gradient(model, axis=1) ** 2 * weight).sum(axis=(1, 2)))

    ixx, iyy, ixy, shape_ok, mx, my = _adaptive_moments(
        sign[:, None, None] * data, weight > 0, dx, dy, psf.sigma_px
    )

    p = planes
    ap, ap_err, ap_flags = sep.sum_circle(
        p.data, x, y, aperture_radius, var=p.variance, mask=p.untrusted, subpix=5
    )
    flags = np.asarray(ap_flags, dtype=np.int32)

    mask, _ = _stamps(planes.mask, cy, cx, half)
    grid = np.arange(-half, half + 1)
    r2 = (grid[None, None, :] - dx[:, None, None]) ** 2
    r2 = r2 + (grid[None, :, None] - dy[:, None, None]) ** 2
    core = np.where((r2 <= (aperture_radius + 0.5) ** 2) & inside, mask, np.uint32(0))
    for bits, flag in (
        (MaskBit.SAT, FLAG_SATURATED),
        (MaskBit.BAD | MaskBit.CR, FLAG_BAD),
        (MaskBit.EDGE, FLAG_EDGE),
    ):
        flags[((core & np.uint32(bits)) != 0).any(axis=(1, 2))] |= flag
    no_data = np.where(inside, mask, np.uint32(0)) & np.uint32(MaskBit.NO_DATA)
    flags[(no_data != 0).any(axis=(1, 2))] |= FLAG_NO_DATA
    off_image = (cx < psf.half) | (cy < psf.half) | (cx >= nx - psf.half) | (cy >= ny - psf.half)
    flags[off_image] |= FLAG_EDGE
    flags[~shape_ok] |= FLAG_SHAPE
    ap, ap_err = np.asarray(ap, dtype=np.float64), np.asarray(ap_err, dtype=np.float64)
    return dict(
        psfFlux=flux, psfFluxErr=flux_err, xErr=x_err, yErr=y_err, apFlux=ap, apFluxErr=ap_err,
        ixx=ixx, iyy=iyy, ixy=ixy, flags=flags, mx=cx + mx, my=cy + my,
    )  # fmt: skip


def _pair_dipoles(
    x: np.ndarray, y: np.ndarray, sign: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (positive, negative) of opposite-sign pairs closer than ``radius``.

    Pairs are accepted closest first and each source joins at most one pair, so
    the result does not depend on the order of the inputs.
    """
    pos, neg = np.flatnonzero(sign > 0), np.flatnonzero(sign < 0)
    if pos.size == 0 or neg.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    tree = cKDTree(np.column_stack([x[pos], y[pos]]))
    candidates = []
    hits = tree.query_ball_point(np.column_stack([x[neg], y[neg]]), radius)
    for k, j in enumerate(neg.tolist()):
        for i in pos[hits[k]].tolist():
            candidates.append((math.hypot(x[i] - x[j], y[i] - y[j]), i, j))
    used: set[int] = set()
    out_p, out_n = [], []
    for _, i, j in sorted(candidates):
        if i not in used and j not in used:
            used.update((i, j))
            out_p.append(i)
            out_n.append(j)
    return np.asarray(out_p, dtype=np.int64), np.asarray(out_n, dtype=np.int64)


def detect_dia_sources(
    difference: Exposure,
    psf: PsfLike,
    *,
    threshold_sigma: float = 5.0,
    aperture_radius_px: float | None = None,
    dipole_radius_fwhm: float = 2.0,
    trail_ratio: float = 2.0,
    trail_min_snr: float = 10.0,
    bad_mask_bits: int = int(MaskBit.BAD | MaskBit.NO_DATA),
    snr_scale: float | None = None,
    workers: int | None = None,
) -> pa.Table:
    """Detect and measure positive, negative, dipole and trailed sources on a difference image.

    Parameters
    ----------
    difference
        Difference exposure (science minus PSF-matched template, electrons),
        background-free, with variance and mask; it is not modified.
    psf
        The difference image's PSF: a Gaussian sigma in pixels, a pixel image
        (odd square, centred; normalised here), or a
        :class:`~ppray.science.psf.PsfModel`, which the filter, the fits and the
        trail test follow across the detector.
    threshold_sigma
        Detection threshold on ``|S/N|`` of the PSF matched filter.
    aperture_radius_px
        Radius of the ``apFlux`` aperture; default 2 PSF FWHM (all of a Gaussian's flux).
    dipole_radius_fwhm
        Opposite-sign detections closer than this many PSF FWHM merge into a dipole.
    trail_ratio
        ``isTrailed`` when the major-axis moment exceeds this multiple of the PSF's
        (2 means a trail about 1.5 FWHM long).
    trail_min_snr
        ``isTrailed`` needs ``|snr|`` of at least this: noise in the moments of
        fainter sources would call point sources trails.
    bad_mask_bits
        Mask bits whose pixels carry no information: weight zero in the filter
        and the fits, left out of the aperture sums.
    snr_scale
        Divide the S/N image by this and multiply the errors by it; ``None``
        (default) measures it (:func:`snr_noise_scale`, at least 1).
    workers
        FFT threads when the PSF image is not separable (default 1).

    Returns
    -------
    pyarrow.Table
        One row per source, schema :data:`DIA_SOURCE_SCHEMA`, ordered by ``y``
        then ``x``, ``diaSourceIndex`` 0..n-1 in that order. See the module
        docstring for the measurements and the ``flags`` bits. The scale
        applied is in the schema metadata under :data:`SNR_SCALE_KEY`.
    """
    if not (threshold_sigma > 0 and dipole_radius_fwhm >= 0 and trail_ratio > 1):
        raise ValueError("need threshold_sigma > 0, dipole_radius_fwhm >= 0, trail_ratio > 1")
    model = _psf_model(psf)
    fwhm = model.fwhm_px
    radius = 2.0 * fwhm if aperture_radius_px is None else float(aperture_radius_px)
    if not radius > 0:
        raise ValueError(f"aperture_radius_px must be > 0, not {aperture_radius_px!r}")
    if snr_scale is not None and not snr_scale > 0:
        raise ValueError(f"snr_scale must be > 0 or None, not {snr_scale!r}")
    data, inv_var, untrusted = _clean_planes(difference, bad_mask_bits)
    snr = _snr(data, inv_var, model, workers)
    if untrusted.any():
        # Where most of the PSF's core lies on untrusted pixels the filter sees only
        # its wings on the good side: a noisy S/N, not a measurement (a PSF of wide
        # reach would find "sources" inside a dead amplifier). The core's coverage
        # is the trusted fraction of a FWHM-wide box.
        box = 2 * math.ceil(0.75 * model.fwhm_px) + 1
        covered = ndimage.uniform_filter((~untrusted).astype(np.float32), box, mode="constant")
        snr[covered < _MIN_CORE_COVERAGE] = 0.0
    scale = (
        max(snr_noise_scale(snr, untrusted, model.half), 1.0) if snr_scale is None else snr_scale
    )
    metadata = {SNR_SCALE_KEY: repr(scale).encode()}
    if scale != 1.0:
        snr /= np.float32(scale)
    iy, ix, sign, npix = _peaks(snr, threshold_sigma)
    x, y, centroid_failed = _subpixel(snr, iy, ix, sign)
    del snr
    if iy.size == 0:
        return DIA_SOURCE_SCHEMA.empty_table().replace_schema_metadata(metadata)
    variance = np.asarray(difference.variance, dtype=np.float32)
    if untrusted.any():  # keep inf and NaN variances out of sep
        variance = np.where(untrusted, np.float32(0.0), variance)
    planes = _Planes(data, inv_var, variance, untrusted, difference.mask)
    m = _measure(planes, model, x, y, sign, radius)
    for name in ("psfFluxErr", "xErr", "yErr", "apFluxErr"):
        m[name] = m[name] * scale
    m["flags"][centroid_failed] |= FLAG_CENTROID
    m["nPix"] = npix.astype(np.int32)

    p_idx, n_idx = _pair_dipoles(x, y, sign, dipole_radius_fwhm * fwhm)
    single = np.ones(x.size, dtype=bool)
    single[p_idx] = single[n_idx] = False
    cols = {k: v[single] for k, v in m.items()}
    cols["x"], cols["y"] = x[single], y[single]
    n_single, n_dip = int(single.sum()), p_idx.size
    nan_single = np.full(n_single, np.nan)
    for name in _DIPOLE_TRAIL_COLUMNS[:4]:
        cols[name] = nan_single
    if n_dip:
        # A dipole is measured at the midpoint of its lobes; the lobes' own fits give
        # its Rubin-style mean flux, flux difference, length and angle.
        xd, yd = 0.5 * (x[p_idx] + x[n_idx]), 0.5 * (y[p_idx] + y[n_idx])
        md = _measure(planes, model, xd, yd, np.ones(n_dip, dtype=np.int64), radius)
        md["psfFluxErr"], md["apFluxErr"] = md["psfFluxErr"] * scale, md["apFluxErr"] * scale
        md["flags"] |= m["flags"][p_idx] | m["flags"][n_idx]
        md["nPix"] = (npix[p_idx] + npix[n_idx]).astype(np.int32)
        md["xErr"] = 0.5 * np.hypot(m["xErr"][p_idx], m["xErr"][n_idx])
        md["yErr"] = 0.5 * np.hypot(m["yErr"][p_idx], m["yErr"][n_idx])
        f_pos, f_neg = m["psfFlux"][p_idx], np.abs(m["psfFlux"][n_idx])
        md["x"], md["y"] = xd, yd
        md["dipoleMeanFlux"] = 0.5 * (f_pos + f_neg)
        md["dipoleFluxDiff"] = f_pos - f_neg
        md["dipoleLength"] = np.hypot(x[p_idx] - x[n_idx], y[p_idx] - y[n_idx])
        md["dipoleAngle"] = np.degrees(np.arctan2(y[p_idx] - y[n_idx], x[p_idx] - x[n_idx]))
        cols = {k: np.concatenate([cols[k], md[k]]) for k in cols}
    is_dipole = np.r_[np.zeros(n_single, dtype=bool), np.ones(n_dip, dtype=bool)]

    with np.errstate(divide="ignore", invalid="ignore"):
        cols["snr"] = cols["psfFlux"] / cols["psfFluxErr"]
    major, angle = _eigen(cols["ixx"], cols["iyy"], cols["ixy"])
    # The local PSF's own moments, measured as the sources' are: an elongated PSF
    # must not make its point sources look trailed.
    n_all = cols["x"].size
    zero = np.zeros(n_all)
    half = _stamp_half(model)
    local = _model_stamps(model, np.rint(cols["x"]), np.rint(cols["y"]), zero, zero, half)
    pxx, pyy, pxy, *_ = _adaptive_moments(local, local > -1, zero, zero, model.sigma_px)
    psf_major = _eigen(pxx, pyy, pxy)[0]
    with np.errstate(invalid="ignore"):
        trailed = ~is_dipole & (major >= trail_ratio * psf_major)
        trailed &= np.abs(cols["snr"]) >= trail_min_snr
    cols["trailLength"] = np.where(
        trailed, np.sqrt(12.0 * np.maximum(major - psf_major, 0.0)), np.nan
    )
    cols["trailAngle"] = np.where(trailed, angle, np.nan)
    # A trail's S/N peak lies anywhere along it; its moment centroid is its middle.
    cols["x"] = np.where(trailed, cols["mx"], cols["x"])
    cols["y"] = np.where(trailed, cols["my"], cols["y"])
    cols["isTrailed"] = trailed
    cols["isDipole"] = is_dipole
    cols["isNegative"] = cols["psfFlux"] < 0

    order = np.lexsort((cols["x"], cols["y"]))
    cols = {k: np.asarray(v)[order] for k, v in cols.items()}
    n = order.size
    cols["diaSourceIndex"] = np.arange(n, dtype=np.int64)
    if difference.wcs is not None:
        cols["ra"], cols["dec"] = difference.wcs.all_pix2world(cols["x"], cols["y"], 0)
    else:
        cols["ra"] = cols["dec"] = np.full(n, np.nan)
    return pa.table(
        [pa.array(np.asarray(cols[f.name]), f.type) for f in DIA_SOURCE_SCHEMA],
        schema=DIA_SOURCE_SCHEMA.with_metadata(metadata),
    )
