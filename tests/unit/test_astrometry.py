"""Astrometric fits against the simulator's truth.

Detectors are rendered through a "true" WCS (the nominal one shifted by
1.5" E, -1.0" N and rotated by 0.02 deg); the pipeline gets the nominal WCS
and the reference catalog, and must recover the true mapping.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ppray.science.astrometry import AstrometryResult, fit_astrometry, sky_residuals_arcsec
from ppray.science.detection import SOURCE_SCHEMA

from .simdata_calib import processed, refcat_for


def _truth_rms(result: AstrometryResult, detector: str) -> tuple[float, float]:
    sim = processed(detector, misaligned=True)
    stars = sim.truth.stars
    args = (
        stars["x"].to_numpy(),
        stars["y"].to_numpy(),
        stars["ra"].to_numpy(),
        stars["dec"].to_numpy(),
    )
    fitted = sky_residuals_arcsec(result.wcs, *args)
    nominal = sky_residuals_arcsec(sim.nominal_wcs, *args)
    return float(np.sqrt(np.mean(fitted**2))), float(np.sqrt(np.mean(nominal**2)))


@pytest.mark.parametrize("detector", ["R22_S11", "R22_S00"])
def test_recovers_the_true_wcs(detector: str) -> None:
    sim = processed(detector, misaligned=True)
    result = fit_astrometry(sim.sources, refcat_for(sim), sim.nominal_wcs)
    assert result.ok, result.reason
    assert result.n_matches >= 10
    assert result.rms_arcsec <= 0.03, result.rms_arcsec
    fitted_rms, nominal_rms = _truth_rms(result, detector)
    assert nominal_rms > 1.0  # the nominal WCS really is off
    assert fitted_rms <= 0.03, fitted_rms
    # The matches are real: matched sources sit on their reference stars.
    ref = refcat_for(sim)
    x = sim.sources["x"].to_numpy()[result.source_index]
    y = sim.sources["y"].to_numpy()[result.source_index]
    resid = sky_residuals_arcsec(
        result.wcs,
        x,
        y,
        ref["ra"].to_numpy()[result.ref_index],
        ref["dec"].to_numpy()[result.ref_index],
    )
    assert resid.size == result.n_matches and resid.max() < 0.2


def test_aligned_wcs_stays_put() -> None:
    sim = processed()
    result = fit_astrometry(sim.sources, refcat_for(sim), sim.nominal_wcs)
    assert result.ok
    assert np.hypot(*result.offset_px) < 0.2
    assert result.rms_arcsec <= 0.03


def test_no_overlap_is_not_ok() -> None:
    sim = processed(misaligned=True)
    ref = refcat_for(sim)
    far = ref.set_column(1, "ra", pa.compute.add(ref["ra"], 1.0))
    result = fit_astrometry(sim.sources, far, sim.nominal_wcs)
    assert not result.ok and result.reason
    assert result.wcs is sim.nominal_wcs
    assert result.n_matches == 0 and np.isnan(result.rms_arcsec)


def test_offset_beyond_search_is_not_ok() -> None:
    sim = processed(misaligned=True)
    result = fit_astrometry(sim.sources, refcat_for(sim), sim.nominal_wcs, max_offset_arcsec=0.5)
    assert not result.ok and "offset" in result.reason


def test_empty_inputs_are_not_ok() -> None:
    sim = processed(misaligned=True)
    ref = refcat_for(sim)
    for sources, refcat in ((SOURCE_SCHEMA.empty_table(), ref), (sim.sources, ref.slice(0, 0))):
        result = fit_astrometry(sources, refcat, sim.nominal_wcs)
        assert not result.ok and result.reason
        assert result.wcs is sim.nominal_wcs


def test_sip_fit_with_many_stars() -> None:
    # Four times the density: enough matches (>= 36) for the degree-2 SIP terms.
    sim = processed(misaligned=True, density=400_000.0)
    result = fit_astrometry(sim.sources, refcat_for(sim), sim.nominal_wcs)
    assert result.ok, result.reason
    assert result.n_matches >= 36
    assert result.wcs.sip is not None and result.wcs.sip.a_order == 2
    assert result.rms_arcsec <= 0.03
    stars = sim.truth.stars
    resid = sky_residuals_arcsec(
        result.wcs,
        stars["x"].to_numpy(),
        stars["y"].to_numpy(),
        stars["ra"].to_numpy(),
        stars["dec"].to_numpy(),
    )
    assert np.sqrt(np.mean(resid**2)) <= 0.03
