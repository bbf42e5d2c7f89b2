"""Forced PSF photometry at known positions, and DiaForcedSource rows.

:func:`psf_fluxes` is a stateless estimator: at each fixed position the PSF
model ``P`` (the local PSF, centred there, normalised to total flux) is fitted
linearly to the pixels ``D`` of a stamp with weights ``w``::

    F = sum(w P D) / sum(w P²),    Var(F) = sum(w² P² V) / sum(w P²)²

``w = 1/V`` (``weighting="inverse_variance"``, the default) is the optimal
linear estimator when ``V`` is the noise variance of each pixel independent of
the data: true for sky-dominated noise and for a difference image's variance
plane, which comes from the images, not the transient. Where a bright
source's own Poisson noise is in ``V`` the weights anticorrelate with the
data and bias ``F`` low by about ``1/S/N_pixel``; ``weighting="uniform"``
(as :func:`ppray.science.psf.psf_flux` does) is unbiased there, at some loss
of S/N when the sky dominates. Pixels with a mask bit in ``bad_mask_bits``,
non-finite data or non-positive variance get weight zero; a position where
less than half the PSF's light falls on usable pixels yields NaN.

:func:`forced_photometry` measures every DiaObject whose position falls on a
detector, on the difference image (``psfFlux``) and on the science image
(``scienceFlux``), and returns alert-schema ``diaForcedSource`` rows in nJy.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pyarrow as pa

from ppray.alerts.diasource import VisitInfo
from ppray.apdb.ids import pack_id
from ppray.image import Exposure, MaskBit
from ppray.schema import AlertSchema, load_alert_schema, table_from_columns
from ppray.science.psf import PsfLike, PsfModel, as_psf_model
from ppray.skyregion import angular_separation_deg

__all__ = ["forced_photometry", "psf_fluxes"]

_DEFAULT_BAD = int(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NO_DATA)
# A Gaussian stamp to 4 sigma holds all but ~1e-4 of the flux.
_GAUSS_HALF_SIGMAS = 4.0
_MIN_USABLE_FRACTION = 0.5


def _models(
    psf: PsfLike, cx: np.ndarray, cy: np.ndarray, fx: np.ndarray, fy: np.ndarray
) -> tuple[np.ndarray, int]:
    """The local PSF stamps ``(n, k, k)`` at pixels (cx, cy), centred at offsets (fx, fy)."""
    gaussian = not isinstance(psf, PsfModel) and np.ndim(psf) == 0
    model = as_psf_model(psf, _gauss_half(psf) if gaussian else None)
    return model.images_at(cx, cy, dx=fx, dy=fy), model.half


def _gauss_half(psf: PsfLike) -> int:
    sigma = float(psf)  # type: ignore[arg-type]
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"PSF sigma must be finite and > 0, not {psf!r}")
    return max(math.ceil(_GAUSS_HALF_SIGMAS * sigma), 2)


def psf_fluxes(
    exposure: Exposure,
    x: np.ndarray,
    y: np.ndarray,
    psf: PsfLike,
    *,
    weighting: Literal["inverse_variance", "uniform"] = "inverse_variance",
    bad_mask_bits: int = _DEFAULT_BAD,
) -> tuple[np.ndarray, np.ndarray]:
    """PSF fluxes (electrons) at fixed pixel positions by weighted linear least squares.

    Parameters
    ----------
    exposure
        Background-free exposure (electrons) with variance and mask.
    x, y
        0-based pixel positions.
    psf
        Gaussian sigma (px), a pixel PSF image (odd square, centred, any sum), or a
        :class:`~ppray.science.psf.PsfModel` (its local, total-flux normalised PSF).
    weighting
        ``"inverse_variance"`` or ``"uniform"`` (module docstring).
    bad_mask_bits
        Mask bits whose pixels are left out of the fit.

    Returns
    -------
    flux, flux_err
        ``float64`` arrays; NaN where the position is not finite or less than
        half the PSF's light falls on usable pixels.
    """
    if weighting not in ("inverse_variance", "uniform"):
        raise ValueError(f"weighting must be 'inverse_variance' or 'uniform', not {weighting!r}")
    x = np.atleast_1d(np.asarray(x, dtype=np.float64)).ravel()
    y = np.atleast_1d(np.asarray(y, dtype=np.float64)).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in shape: {x.shape} vs {y.shape}")
    flux = np.full(x.size, np.nan)
    err = np.full(x.size, np.nan)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if ok.size == 0:
        return flux, err
    cx, cy = np.rint(x[ok]).astype(np.int64), np.rint(y[ok]).astype(np.int64)
    model, half = _models(psf, cx, cy, x[ok] - cx, y[ok] - cy)
    ny, nx = exposure.shape
    off = np.arange(-half, half + 1)
    rows, cols = cy[:, None] + off[None, :], cx[:, None] + off[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    r = np.clip(rows, 0, ny - 1)[:, :, None]
    c = np.clip(cols, 0, nx - 1)[:, None, :]
    data = exposure.image[r, c].astype(np.float64)
    var = exposure.variance[r, c].astype(np.float64)
    usable = inside & ((exposure.mask[r, c] & np.uint32(bad_mask_bits)) == 0)
    usable &= np.isfinite(data) & np.isfinite(var) & (var > 0)
    data = np.where(usable, data, 0.0)
    var = np.where(usable, var, 1.0)
    if weighting == "inverse_variance":
        w = np.where(usable, 1.0 / var, 0.0)
    else:
        w = usable.astype(np.float64)
    wp = w * model
    norm = (wp * model).sum(axis=(1, 2))
    fraction = np.where(usable, model, 0.0).sum(axis=(1, 2)) / model.sum(axis=(1, 2))
    good = (norm > 0) & (fraction >= _MIN_USABLE_FRACTION)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (wp * data).sum(axis=(1, 2)) / norm
        e = np.sqrt((wp * wp * var).sum(axis=(1, 2))) / norm
    flux[ok] = np.where(good, f, np.nan)
    err[ok] = np.where(good, e, np.nan)
    return flux, err


def _on_image(exposure: Exposure, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Pixel positions ``(2, n)`` of sky positions; NaN for those far off the image."""
    wcs = exposure.wcs
    if wcs is None:
        raise ValueError("forced photometry needs the exposure's WCS")
    ny, nx = exposure.shape
    corners_x = np.array([-0.5, nx - 0.5, -0.5, nx - 0.5, (nx - 1) / 2])
    corners_y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, (ny - 1) / 2])
    c_ra, c_dec = wcs.all_pix2world(corners_x, corners_y, 0)
    radius = angular_separation_deg(c_ra[:4], c_dec[:4], c_ra[4], c_dec[4]).max()
    near = angular_separation_deg(ra, dec, c_ra[4], c_dec[4]) <= 1.5 * radius
    out = np.full((2, ra.size), np.nan)
    if near.any():
        # Only near positions: the TAN projection of the far side is meaningless.
        px, py = wcs.all_world2pix(ra[near], dec[near], 0, quiet=True)
        out[0, near], out[1, near] = px, py
    return out


def forced_photometry(
    objects: pa.Table,
    info: VisitInfo,
    *,
    difference: Exposure,
    science: Exposure | None,
    psf: PsfLike,
    weighting: Literal["inverse_variance", "uniform"] = "inverse_variance",
    schema: AlertSchema | None = None,
) -> pa.Table:
    """``DiaForcedSource`` rows for the DiaObjects whose positions fall on this detector.

    Parameters
    ----------
    objects
        DiaObjects (at least ``diaObjectId``, ``ra``, ``dec``); those off the image are skipped.
    info
        Visit, detector, band, times and zero point (fluxes null without one).
    difference
        The difference exposure (electrons) with its WCS; gives ``psfFlux``.
    science
        The calibrated science exposure on the same pixel grid; gives
        ``scienceFlux`` (null without it).
    psf
        Gaussian sigma (px) or PSF image, as in :func:`psf_fluxes` (the difference
        image's; the science image is PSF-matched to it only approximately).
    weighting
        See :func:`psf_fluxes`.

    Returns
    -------
    pyarrow.Table
        Alert-schema ``diaForcedSource`` rows sorted by ``diaObjectId``;
        ``diaForcedSourceId`` = :func:`ppray.apdb.ids.pack_id` ``(visit, detector, rank)``.
    """
    schema = schema or load_alert_schema()
    for name in ("diaObjectId", "ra", "dec"):
        if name not in objects.column_names:
            raise ValueError(f"objects lack column {name!r}")
    if science is not None and science.shape != difference.shape:
        raise ValueError(f"science {science.shape} and difference {difference.shape} differ")
    objects = objects.sort_by("diaObjectId")
    ra = objects["ra"].to_numpy(zero_copy_only=False).astype(np.float64)
    dec = objects["dec"].to_numpy(zero_copy_only=False).astype(np.float64)
    px, py = _on_image(difference, ra, dec) if objects.num_rows else np.zeros((2, 0))
    ny, nx = difference.shape
    with np.errstate(invalid="ignore"):
        keep = np.flatnonzero((px >= -0.5) & (px < nx - 0.5) & (py >= -0.5) & (py < ny - 0.5))
    n = keep.size
    scale = info.njy_per_electron
    scale = np.nan if scale is None else scale
    flux, flux_err = psf_fluxes(difference, px[keep], py[keep], psf, weighting=weighting)
    columns: dict[str, np.ndarray] = {
        "diaForcedSourceId": pack_id(info.visit, info.detector, np.arange(n)),
        "diaObjectId": objects["diaObjectId"].to_numpy()[keep],
        "ra": ra[keep],
        "dec": dec[keep],
        "visit": np.full(n, info.visit, dtype=np.int64),
        "detector": np.full(n, info.detector, dtype=np.int32),
        "psfFlux": flux * scale,
        "psfFluxErr": flux_err * scale,
        "midpointMjdTai": np.full(n, info.midpoint_mjd_tai),
        "band": np.full(n, info.band, dtype=object),
        "timeProcessedMjdTai": np.full(n, info.processed()),
    }
    if science is not None:
        s_flux, s_err = psf_fluxes(science, px[keep], py[keep], psf, weighting=weighting)
        columns["scienceFlux"] = s_flux * scale
        columns["scienceFluxErr"] = s_err * scale
    return table_from_columns(columns, n, "diaForcedSource", schema)
