"""Simulated detectors with known truth, shared by the science and simulator tests.

Renders are cached per argument set, so several test modules share one render;
tests must copy arrays before changing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS

from ppray.image import Calibrations, RawExposure
from ppray.instrument import Detector, Instrument, detector_wcs, load_instrument
from ppray.sim.render import SimTruth, SimulatedObservation, make_calibrations, render_detector
from ppray.sim.sky import make_star_catalog

__all__ = [
    "BORESIGHT",
    "OBS",
    "TEST_DENSITY_PER_DEG2",
    "Sim",
    "header_for",
    "psf_fwhm_px",
    "simulate",
    "sky_catalog",
    "star_at",
]

BORESIGHT = (150.0, 2.2, 0.0)  # ra, dec, rotation (deg)
# Dense enough for ~100 stars per 512x512 detector, sparse enough that most are isolated.
TEST_DENSITY_PER_DEG2 = 100_000.0
OBS = SimulatedObservation(exptime_s=30.0, seeing_fwhm_arcsec=0.8, sky_e_per_px_per_s=30.0)


@dataclass(frozen=True)
class Sim:
    """One rendered detector and everything needed to process and score it."""

    instrument: Instrument
    detector: Detector
    wcs: WCS
    obs: SimulatedObservation
    calibs: Calibrations
    segments: dict[str, np.ndarray]
    truth: SimTruth
    header: dict[str, Any]

    def raw(self, segments: dict[str, np.ndarray] | None = None) -> RawExposure:
        """A RawExposure of (copies of) the segments, or of replacement segments."""
        segs = segments if segments is not None else self.segments
        return RawExposure(segments={k: v.copy() for k, v in segs.items()}, header=self.header)


def header_for(
    instrument: Instrument, detector: Detector, obs: SimulatedObservation
) -> dict[str, Any]:
    ra, dec, rot = BORESIGHT
    return {
        "INSTRUME": instrument.name,
        "DETNAME": detector.name,
        "DETECTOR": detector.id,
        "OBSID": "SY_O_20261125_000042",
        "GROUPID": "2026-11-25T03:14:15.926535",
        "EXPID": 2026112500042,
        "EXPTIME": obs.exptime_s,
        "DARKTIME": obs.exptime_s,
        "DATE-OBS": "2026-11-25T03:14:15.926535",
        "MJD-OBS": 61004.13,
        "FILTER": obs.band,
        "RA": ra,
        "DEC": dec,
        "ROTPA": rot,
        "SNAP": 0,
        "DAYOBS": 20261125,
        "SEQNUM": 42,
    }


@cache
def sky_catalog(density: float = TEST_DENSITY_PER_DEG2, seed: int = 0) -> pa.Table:
    """Stars over the whole synthetic camera."""
    inst = load_instrument("synthetic")
    ra, dec, _ = BORESIGHT
    return make_star_catalog(
        ra, dec, inst.field_radius_deg() + 0.01, density_per_deg2=density, seed=seed
    )


def star_at(wcs: WCS, x: float, y: float, mag: float, star_id: int = 10_000_000) -> pa.Table:
    """A one-star catalog whose star lands at pixel ``(x, y)``."""
    ((ra, dec),) = wcs.all_pix2world([[x, y]], 0)
    return pa.table(
        {
            "id": pa.array([star_id], pa.int64()),
            "ra": [float(ra)],
            "dec": [float(dec)],
            "mag": [mag],
            "size_arcsec": [0.0],
        }
    )


def _with_extra(catalog: pa.Table, extra: pa.Table | None) -> pa.Table:
    if extra is None:
        return catalog
    common = [c for c in extra.column_names if c in catalog.column_names]
    return pa.concat_tables([catalog.select(common), extra.select(common)])


@cache
def simulate(
    detector: str = "R22_S11",
    *,
    seed: int = 0,
    density: float = TEST_DENSITY_PER_DEG2,
    cosmic_rays: int = 20,
    empty_sky: bool = False,
    bright_star_at: tuple[float, float, float] | None = None,
    seeing_fwhm_arcsec: float = OBS.seeing_fwhm_arcsec,
) -> Sim:
    """Render one synthetic-camera detector (cached; do not modify the result).

    ``bright_star_at`` = ``(x, y, mag)`` adds one star at that pixel.
    """
    inst = load_instrument("synthetic")
    det = inst.detector(detector)
    ra, dec, rot = BORESIGHT
    wcs = detector_wcs(inst, det, ra, dec, rot)
    obs = replace(OBS, seeing_fwhm_arcsec=seeing_fwhm_arcsec)
    calibs = make_calibrations(inst, det, seed=0)
    catalog = sky_catalog(density).slice(0, 0) if empty_sky else sky_catalog(density)
    if bright_star_at is not None:
        catalog = _with_extra(catalog, star_at(wcs, *bright_star_at))
    segments, truth = render_detector(
        catalog, inst, det, wcs, obs, calibs, seed=seed, cosmic_rays=cosmic_rays
    )
    return Sim(inst, det, wcs, obs, calibs, segments, truth, header_for(inst, det, obs))


def psf_fwhm_px(sim: Sim) -> float:
    return sim.truth.psf_sigma_px * 2.0 * math.sqrt(2.0 * math.log(2.0))
