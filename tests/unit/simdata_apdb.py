"""Builders for the APDB, association and alert tests: WCSs, images, DIA-like tables."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS, Sip
from scipy.special import erf

from ppray.alerts.diasource import VisitInfo
from ppray.image import Exposure

__all__ = ["dia_like", "offset_radec", "render", "tan_wcs", "visit_info"]

DAY0 = 20260101


def tan_wcs(
    ra: float,
    dec: float,
    shape: tuple[int, int] = (200, 200),
    scale_arcsec: float = 0.2,
    rotation_deg: float = 30.0,
    sip: bool = True,
) -> WCS:
    """A TAN (optionally SIP-distorted) WCS centred on ``(ra, dec)``, rotated."""
    wcs = WCS(naxis=2)
    ctype = "-SIP" if sip else ""
    wcs.wcs.ctype = [f"RA---TAN{ctype}", f"DEC--TAN{ctype}"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    s = scale_arcsec / 3600.0
    a = math.radians(rotation_deg)
    wcs.wcs.cd = np.array([[-s * math.cos(a), s * math.sin(a)], [s * math.sin(a), s * math.cos(a)]])
    if sip:
        coeff_a = np.zeros((3, 3))
        coeff_b = np.zeros((3, 3))
        coeff_a[2, 0] = 2e-6
        coeff_b[0, 2] = -1.5e-6
        coeff_a[1, 1] = 1e-6
        wcs.sip = Sip(coeff_a, coeff_b, None, None, wcs.wcs.crpix)
    return wcs


def offset_radec(
    ra: float, dec: float, east_arcsec: float, north_arcsec: float
) -> tuple[float, float]:
    """The position ``east``/``north`` arcsec from ``(ra, dec)`` (exact on the sphere)."""
    ra0, dec0 = math.radians(ra), math.radians(dec)
    xi, eta = math.radians(east_arcsec / 3600.0), math.radians(north_arcsec / 3600.0)
    # Inverse gnomonic projection about (ra0, dec0).
    denom = math.cos(dec0) - eta * math.sin(dec0)
    ra1 = ra0 + math.atan2(xi, denom)
    dec1 = math.atan2(math.sin(dec0) + eta * math.cos(dec0), math.hypot(xi, denom))
    return math.degrees(ra1) % 360.0, math.degrees(dec1)


def render(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    sigma_px: float,
    *,
    sky_var: float = 400.0,
    seed: int = 0,
    wcs: WCS | None = None,
) -> Exposure:
    """Pixel-integrated Gaussian point sources plus Gaussian noise of ``sky_var``."""
    ny, nx = shape
    image = np.zeros(shape)
    half = math.ceil(5 * sigma_px)
    for xs, ys, fs in zip(x, y, flux, strict=True):
        cx, cy = round(xs), round(ys)
        x0, x1 = max(cx - half, 0), min(cx + half + 1, nx)
        y0, y1 = max(cy - half, 0), min(cy + half + 1, ny)
        ex = (np.arange(x0, x1 + 1) - 0.5 - xs) / (math.sqrt(2) * sigma_px)
        ey = (np.arange(y0, y1 + 1) - 0.5 - ys) / (math.sqrt(2) * sigma_px)
        fx, fy = 0.5 * np.diff(erf(ex)), 0.5 * np.diff(erf(ey))
        image[y0:y1, x0:x1] += fs * np.outer(fy, fx)
    rng = np.random.default_rng(seed)
    image += rng.normal(0.0, math.sqrt(sky_var), shape)
    return Exposure(
        image=image.astype(np.float32),
        variance=np.full(shape, sky_var, dtype=np.float32),
        mask=np.zeros(shape, dtype=np.uint32),
        wcs=wcs,
    )


def visit_info(k: int, detector: int = 0, band: str = "r", **changes: object) -> VisitInfo:
    """Visit ``k`` of a run of nightly visits (Rubin-style exposure ids)."""
    fields: dict[str, object] = {
        "visit": (DAY0 + k) * 100_000 + 17,
        "detector": detector,
        "band": band,
        "midpoint_mjd_tai": 61041.1 + k,
        "exposure_time_s": 30.0,
        "zero_point_mag": 28.0,
        "processed_mjd_tai": 61041.2 + k,
    }
    fields.update(changes)
    return VisitInfo.model_validate(fields)


def dia_like(
    ra: np.ndarray,
    dec: np.ndarray,
    flux: np.ndarray | None = None,
    flux_err: float = 50.0,
    *,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
) -> pa.Table:
    """A minimal table with the columns of ``detect_dia_sources`` that matter here."""
    ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    n = ra.size
    flux = np.full(n, 1000.0) if flux is None else np.asarray(flux, dtype=np.float64)
    return pa.table(
        {
            "diaSourceIndex": np.arange(n, dtype=np.int64),
            "x": np.arange(n, dtype=np.float64) * 10.0 + 5.0 if x is None else x,
            "y": np.full(n, 7.0) if y is None else y,
            "xErr": np.full(n, 0.05),
            "yErr": np.full(n, 0.07),
            "ra": ra,
            "dec": dec,
            "psfFlux": flux,
            "psfFluxErr": np.full(n, flux_err),
            "snr": flux / flux_err,
            "flags": np.zeros(n, dtype=np.int32),
            "nPix": np.full(n, 12, dtype=np.int32),
        }
    )
