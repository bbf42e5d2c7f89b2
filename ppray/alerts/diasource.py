"""From a detector's DIA table to APDB ``DiaSource`` rows in the alert schema.

:func:`dia_source_table` maps the columns of
:data:`ppray.science.dia.DIA_SOURCE_SCHEMA` (pixels, electrons) to the
``diaSource`` record of the alert schema (degrees, arcsec, nJy):

- ``diaSourceId`` = :func:`ppray.apdb.ids.pack_id` ``(visit, detector, diaSourceIndex)``.
- Fluxes: ``nJy = e- * 10**(-0.4 * (zp - 31.4)) / exposure_time_s`` with ``zp``
  the AB magnitude of 1 e-/s (:func:`ppray.science.photometry.fit_zero_point`);
  31.4 is the AB magnitude of 1 nJy. Without a zero point the fluxes are null.
- ``raErr``, ``decErr``, ``ra_dec_Cov``: ``xErr``, ``yErr`` (independent)
  through the WCS's local Jacobian (``raErr`` is along RA*cos(Dec), as the schema says).
- ``trailLength``, ``dipoleLength`` (px -> arcsec), ``trailAngle``, ``dipoleAngle``
  (from +x towards +y -> position angle east of north: trails modulo 180,
  dipoles, which point from the negative to the positive lobe, modulo 360), ``ixx``,
  ``iyy``, ``ixy`` (px² -> arcsec², pixel axes) need the WCS; null without it.
- Flags: ``centroid_flag``, ``shape_flag``, ``psfFlux_flag_edge``, ``pixelFlags_*``
  from the DIA ``flags`` bits; ``apFlux_flag_apertureTruncated`` from sep's
  ``APER_TRUNC``.
- Fields ppray does not measure are null when nullable; required counts that it
  does not measure (``trailNdata``, ``dipoleNdata``, ``bboxSize``) are 0, and
  ``psfNdata`` is the detection footprint's pixel count (``nPix``).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS
from pydantic import BaseModel, ConfigDict, Field

from ppray.apdb.ids import pack_id
from ppray.schema import AlertSchema, load_alert_schema, table_from_columns
from ppray.science.dia import (
    FLAG_BAD,
    FLAG_CENTROID,
    FLAG_EDGE,
    FLAG_NO_DATA,
    FLAG_SATURATED,
    FLAG_SHAPE,
)
from ppray.times import now_mjd_tai

__all__ = ["AB_NJY_MAG", "VisitInfo", "dia_source_table", "local_jacobian"]

AB_NJY_MAG = 31.4
"""AB magnitude of a 1 nJy source."""

# sep's aperture flags, the low byte of the DIA ``flags``.
_APER_TRUNC = 16
_APER_ALLMASKED = 64

_DIA_COLUMNS = ("diaSourceIndex", "x", "y", "xErr", "yErr", "ra", "dec", "psfFlux", "psfFluxErr")


class VisitInfo(BaseModel):
    """What a detector's DIA rows need to know about their visit.

    ``visit`` is the exposure id of the (first) snap; ``zero_point_mag`` is the
    AB magnitude of 1 e-/s (None: not calibrated, fluxes become null);
    ``processed_mjd_tai`` is ``timeProcessedMjdTai`` (None: now, at each use;
    give it for reproducible rows).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    visit: int = Field(ge=0)
    detector: int = Field(ge=0, lt=256)
    band: str = Field(min_length=1)
    midpoint_mjd_tai: float
    exposure_time_s: float = Field(gt=0)
    zero_point_mag: float | None = None
    processed_mjd_tai: float | None = None

    @property
    def njy_per_electron(self) -> float | None:
        """nJy of one electron in this exposure, or None without a zero point."""
        zp = self.zero_point_mag
        if zp is None or not math.isfinite(zp):
            return None
        return 10.0 ** (-0.4 * (zp - AB_NJY_MAG)) / self.exposure_time_s

    def processed(self) -> float:
        return self.processed_mjd_tai if self.processed_mjd_tai is not None else now_mjd_tai()


def local_jacobian(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``d(xi, eta)/d(x, y)`` in deg/px at each pixel, shape ``(n, 2, 2)``.

    ``xi`` points east (along RA*cos(Dec)), ``eta`` north; central differences
    of ``all_pix2world`` include any SIP distortion.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    h = 0.5
    px = np.concatenate([x + h, x - h, x, x])
    py = np.concatenate([y, y, y + h, y - h])
    ra, dec = wcs.all_pix2world(px, py, 0)
    ra, dec = ra.reshape(4, -1), dec.reshape(4, -1)
    cos_dec = np.cos(np.radians(dec.mean(axis=0)))
    d_ra = (ra[[0, 2]] - ra[[1, 3]] + 180.0) % 360.0 - 180.0
    d_dec = dec[[0, 2]] - dec[[1, 3]]
    jac = np.empty((x.size, 2, 2))
    jac[:, 0, :] = (d_ra * cos_dec).T / (2 * h)
    jac[:, 1, :] = d_dec.T / (2 * h)
    return jac


def _position_angle(jac: np.ndarray, angle_deg: np.ndarray, period: float) -> np.ndarray:
    a = np.radians(angle_deg)
    v = np.stack([np.cos(a), np.sin(a)], axis=-1)
    d = np.einsum("nij,nj->ni", jac, v)
    return np.degrees(np.arctan2(d[:, 0], d[:, 1])) % period


def dia_source_table(
    dia: pa.Table,
    info: VisitInfo,
    *,
    wcs: WCS | None = None,
    science_flux: tuple[np.ndarray, np.ndarray] | None = None,
    schema: AlertSchema | None = None,
) -> pa.Table:
    """APDB ``DiaSource`` rows (alert-schema columns, no ``diaObjectId`` yet).

    Parameters
    ----------
    dia
        A table of :func:`ppray.science.dia.detect_dia_sources` (``detector`` and
        ``exposure_id`` columns, if present, must agree with ``info``).
    info
        The visit, detector, band, times and zero point.
    wcs
        The difference image's WCS: sky errors, angles and moments in arcsec
        (module docstring); also fills non-finite ``ra``/``dec``.
    science_flux
        ``(flux, flux_err)`` in electrons of forced photometry on the science
        image at the sources (:func:`ppray.alerts.forced.psf_fluxes`), for ``scienceFlux``.
    schema
        Alert schema (default the newest).

    Raises
    ------
    ValueError
        A DIA column is missing, ``detector``/``exposure_id`` disagree with ``info``,
        or a source has no finite ``ra``/``dec`` (and no WCS to compute it).
    """
    schema = schema or load_alert_schema()
    missing = [c for c in _DIA_COLUMNS if c not in dia.column_names]
    if missing:
        raise ValueError(f"DIA table lacks columns {missing}")
    n = dia.num_rows
    col = {name: dia[name].to_numpy(zero_copy_only=False) for name in dia.column_names}
    for name, want in (("detector", info.detector), ("exposure_id", info.visit)):
        if name in col and n and (col[name] != want).any():
            raise ValueError(f"DIA column {name!r} holds {np.unique(col[name])[:5]}, not {want}")
    x, y = col["x"].astype(np.float64), col["y"].astype(np.float64)
    ra, dec = col["ra"].astype(np.float64), col["dec"].astype(np.float64)
    if wcs is not None and n:
        bad = ~(np.isfinite(ra) & np.isfinite(dec))
        if bad.any():
            ra, dec = ra.copy(), dec.copy()
            ra[bad], dec[bad] = wcs.all_pix2world(x[bad], y[bad], 0)
    bad_pos = np.flatnonzero(~(np.isfinite(ra) & np.isfinite(dec)))
    if bad_pos.size:
        raise ValueError(
            f"DIA sources {col['diaSourceIndex'][bad_pos[:5]].tolist()} have no finite ra/dec "
            "(give the difference image's WCS)"
        )
    flags = col["flags"].astype(np.int64) if "flags" in col else np.zeros(n, dtype=np.int64)
    nan = np.full(n, np.nan)
    f = info.njy_per_electron
    scale = f if f is not None else np.nan
    out: dict[str, np.ndarray] = {
        "diaSourceId": pack_id(info.visit, info.detector, col["diaSourceIndex"]),
        "visit": np.full(n, info.visit, dtype=np.int64),
        "detector": np.full(n, info.detector, dtype=np.int32),
        "midpointMjdTai": np.full(n, info.midpoint_mjd_tai),
        "exposureTime": np.full(n, info.exposure_time_s),
        "ra": ra % 360.0,
        "dec": dec,
        "x": x,
        "xErr": col["xErr"],
        "y": y,
        "yErr": col["yErr"],
        "centroid_flag": (flags & FLAG_CENTROID) != 0,
        "psfFlux": col["psfFlux"] * scale,
        "psfFluxErr": col["psfFluxErr"] * scale,
        "psfFlux_flag": ~np.isfinite(col["psfFlux"]),
        "psfFlux_flag_edge": (flags & FLAG_EDGE) != 0,
        "psfFlux_flag_noGoodPixels": ~np.isfinite(col["psfFluxErr"]),
        "psfNdata": col.get("nPix", np.zeros(n)).astype(np.int32),
        "trailNdata": np.zeros(n, dtype=np.int32),
        "dipoleNdata": np.zeros(n, dtype=np.int32),
        "bboxSize": np.zeros(n, dtype=np.int32),
        "shape_flag": (flags & FLAG_SHAPE) != 0,
        "band": np.full(n, info.band, dtype=object),
        "timeProcessedMjdTai": np.full(n, info.processed()),
        "pixelFlags": np.zeros(n, dtype=bool),
        "pixelFlags_bad": (flags & FLAG_BAD) != 0,
        "pixelFlags_edge": (flags & FLAG_EDGE) != 0,
        "pixelFlags_nodata": (flags & FLAG_NO_DATA) != 0,
        "pixelFlags_saturated": (flags & FLAG_SATURATED) != 0,
        "dipoleFitAttempted": np.zeros(n, dtype=bool),
    }
    if "snr" in col:
        out["snr"] = col["snr"]
    if "apFlux" in col:
        out["apFlux"] = col["apFlux"] * scale
        out["apFluxErr"] = col["apFluxErr"] * scale
        out["apFlux_flag"] = ~np.isfinite(col["apFlux"]) | ((flags & _APER_ALLMASKED) != 0)
        out["apFlux_flag_apertureTruncated"] = (flags & _APER_TRUNC) != 0
    for name in ("isNegative", "isDipole"):
        if name in col:
            out[name] = col[name].astype(bool)
    if "reliability" in col:
        out["reliability"] = col["reliability"].astype(np.float64)
        version = (dia.schema.metadata or {}).get(b"ppray.reliability_version", b"").decode()
        out["reliabilityVersion"] = np.full(n, version or None, dtype=object)
    if "dipoleMeanFlux" in col:
        out["dipoleMeanFlux"] = col["dipoleMeanFlux"] * scale
        out["dipoleFluxDiff"] = col["dipoleFluxDiff"] * scale
    if science_flux is not None:
        out["scienceFlux"] = np.asarray(science_flux[0], dtype=np.float64) * scale
        out["scienceFluxErr"] = np.asarray(science_flux[1], dtype=np.float64) * scale
    if wcs is not None and n:
        jac = local_jacobian(wcs, x, y)
        ex, ey = col["xErr"].astype(np.float64), col["yErr"].astype(np.float64)
        cov = np.einsum("nik,nk,njk->nij", jac, np.stack([ex**2, ey**2], axis=-1), jac)
        out["raErr"], out["decErr"] = np.sqrt(cov[:, 0, 0]), np.sqrt(cov[:, 1, 1])
        out["ra_dec_Cov"] = cov[:, 0, 1]
        arcsec_per_px = np.sqrt(np.abs(np.linalg.det(jac))) * 3600.0
        for name in ("ixx", "iyy", "ixy"):
            if name in col:
                out[name] = col[name] * arcsec_per_px**2
        if "trailLength" in col:
            trailed = col.get("isTrailed", np.isfinite(col["trailLength"])).astype(bool)
            out["trailLength"] = np.where(trailed, col["trailLength"] * arcsec_per_px, nan)
            out["trailAngle"] = np.where(
                trailed, _position_angle(jac, col["trailAngle"], 180.0), nan
            )
        if "dipoleLength" in col:
            out["dipoleLength"] = col["dipoleLength"] * arcsec_per_px
            out["dipoleAngle"] = _position_angle(jac, col["dipoleAngle"], 360.0)
    return table_from_columns(out, n, "diaSource", schema)
