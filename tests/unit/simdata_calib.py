"""Simulated, processed detectors for the calibration tests (CR, PSF, astrometry, photometry).

Like :mod:`tests.unit.simdata`, but a render may use a "true" WCS that differs
from the nominal one the pipeline is given, and the result is carried through
ISR, background subtraction and detection. Results are cached per argument
set: tests must copy arrays before changing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS

from ppray.image import Exposure, RawExposure
from ppray.instrument import Detector, Instrument, detector_wcs, load_instrument
from ppray.science.background import estimate_background, subtract_background
from ppray.science.cosmicrays import find_cosmic_rays, mask_cosmic_rays
from ppray.science.detection import detect_sources
from ppray.science.isr import run_isr
from ppray.sim.render import SimTruth, SimulatedObservation, make_calibrations, render_detector
from ppray.sim.sky import make_star_catalog

from .simdata import BORESIGHT, OBS, TEST_DENSITY_PER_DEG2, header_for

__all__ = ["CalibSim", "perturbed_wcs", "processed", "refcat_for"]

# The "true" pointing error of the astrometry tests: a shift and a small rotation.
SHIFT_ARCSEC = (1.5, -1.0)
ROTATION_DEG = 0.02


@dataclass(frozen=True)
class CalibSim:
    """A rendered and processed detector, with the nominal and the true WCS."""

    instrument: Instrument
    detector: Detector
    nominal_wcs: WCS
    true_wcs: WCS
    obs: SimulatedObservation
    truth: SimTruth
    isr_exposure: Exposure  # post-ISR, before cosmic-ray repair
    exposure: Exposure  # CRs repaired, background-subtracted, nominal WCS attached
    sources: pa.Table
    catalog: pa.Table

    @property
    def fwhm_px(self) -> float:
        return self.truth.psf_sigma_px * 2.0 * math.sqrt(2.0 * math.log(2.0))


def perturbed_wcs(wcs: WCS, shift_arcsec: tuple[float, float], rotation_deg: float) -> WCS:
    """``wcs`` with its tangent point moved by ``shift_arcsec`` (east, north) and rotated."""
    out = wcs.deepcopy()
    dra, ddec = shift_arcsec
    dec0 = out.wcs.crval[1]
    out.wcs.crval = [
        out.wcs.crval[0] + dra / 3600.0 / math.cos(math.radians(dec0)),
        dec0 + ddec / 3600.0,
    ]
    t = math.radians(rotation_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    out.wcs.cd = rot @ out.wcs.cd
    out.wcs.set()
    return out


@cache
def _catalog(instrument: str, density: float, seed: int) -> pa.Table:
    inst = load_instrument(instrument)
    ra, dec, _ = BORESIGHT
    if instrument == "synthetic":
        radius = inst.field_radius_deg() + 0.01
        return make_star_catalog(ra, dec, radius, density_per_deg2=density, seed=seed)
    raise ValueError(instrument)


@cache
def processed(
    detector: str = "R22_S11",
    *,
    seeing_fwhm_arcsec: float = OBS.seeing_fwhm_arcsec,
    misaligned: bool = False,
    cosmic_rays: int = 20,
    density: float = TEST_DENSITY_PER_DEG2,
    empty_sky: bool = False,
    seed: int = 0,
) -> CalibSim:
    """Render a synthetic-camera detector and run ISR, background and detection (cached).

    With ``misaligned`` the pixels are rendered through :func:`perturbed_wcs` of
    the nominal WCS while the exposure carries the nominal one.
    """
    inst = load_instrument("synthetic")
    det = inst.detector(detector)
    ra, dec, rot = BORESIGHT
    nominal = detector_wcs(inst, det, ra, dec, rot)
    true = perturbed_wcs(nominal, SHIFT_ARCSEC, ROTATION_DEG) if misaligned else nominal
    obs = replace(OBS, seeing_fwhm_arcsec=seeing_fwhm_arcsec)
    calibs = make_calibrations(inst, det, seed=0)
    catalog = _catalog("synthetic", density, 0)
    if empty_sky:
        catalog = catalog.slice(0, 0)
    segments, truth = render_detector(
        catalog, inst, det, true, obs, calibs, seed=seed, cosmic_rays=cosmic_rays
    )
    raw = RawExposure(segments=segments, header=header_for(inst, det, obs))
    isr_exp = run_isr(raw, calibs, inst, det, wcs=nominal)
    # The pipeline's order: cosmic rays go before background and detection.
    fwhm_px = truth.psf_sigma_px * 2.0 * math.sqrt(2.0 * math.log(2.0))
    exp = mask_cosmic_rays(isr_exp, find_cosmic_rays(isr_exp, psf_fwhm_px=fwhm_px))
    background, _ = estimate_background(exp)
    exp = subtract_background(exp, background)
    sources = detect_sources(exp)
    return CalibSim(inst, det, nominal, true, obs, truth, isr_exp, exp, sources, catalog)


def refcat_for(sim: CalibSim, faint_mag: float = 22.0) -> pa.Table:
    """The reference catalog (``id, ra, dec, mag``) down to ``faint_mag``, as a refcat shard."""
    cat = sim.catalog
    mag = cat["mag"].to_numpy()
    keep = np.flatnonzero(mag < faint_mag)
    return cat.take(keep).select(["id", "ra", "dec", "mag"])
