"""Zero points against the simulator's truth (``SimulatedObservation.zero_point_mag``).

The end-to-end tests run the calibrate chain on a misaligned synthetic
detector: astrometric matches to the reference catalog, PSF (or
aperture-corrected) fluxes, then the zero point.
"""

from __future__ import annotations

import numpy as np
import pytest

from ppray.science.astrometry import fit_astrometry
from ppray.science.photometry import PhotoCalibResult, fit_zero_point
from ppray.science.psfmeasure import measure_psf
from ppray.science.psfphot import aperture_corrections, psf_flux

from .simdata_calib import processed, refcat_for


@pytest.mark.parametrize("detector", ["R22_S11", "R22_S00"])
@pytest.mark.parametrize("fluxes", ["psf", "aperture"])
def test_zero_point_from_matched_stars(detector: str, fluxes: str) -> None:
    sim = processed(detector, misaligned=True)
    ref = refcat_for(sim)
    astrom = fit_astrometry(sim.sources, ref, sim.nominal_wcs)
    assert astrom.ok, astrom.reason
    psf, correction = aperture_corrections(
        sim.exposure, sim.sources, measure_psf(sim.exposure, sim.sources), 6.0
    )
    src = sim.sources.take(astrom.source_index)
    if fluxes == "psf":
        flux, flux_err = psf_flux(sim.exposure, src["x"].to_numpy(), src["y"].to_numpy(), psf)
    else:
        apcorr = correction.at(src["x"].to_numpy(), src["y"].to_numpy())
        flux = src["flux"].to_numpy() * apcorr
        flux_err = src["flux_err"].to_numpy() * apcorr
    unflagged = src["flags"].to_numpy() == 0
    result = fit_zero_point(
        flux,
        flux_err,
        ref["mag"].to_numpy()[astrom.ref_index],
        sim.obs.exptime_s,
        good=unflagged,
    )
    assert result.ok, result.reason
    assert result.n_stars >= 10
    error = result.zero_point_mag - sim.obs.zero_point_mag
    assert abs(error) <= 0.02, error
    assert 0 < result.zero_point_err_mag < 0.02
    assert abs(error) < 4 * result.zero_point_err_mag + 0.005  # the error bar is honest


def test_clips_outliers_and_weights() -> None:
    rng = np.random.default_rng(0)
    n, zp, t = 200, 27.5, 15.0
    mag = rng.uniform(16.0, 21.0, n)
    flux_true = 10 ** (-0.4 * (mag - zp)) * t
    err = np.sqrt(flux_true + 500.0)
    flux = flux_true + rng.normal(0.0, 1.0, n) * err
    flux[:10] *= 3.0  # blends and variables
    result = fit_zero_point(flux, err, mag, t)
    assert result.ok
    assert abs(result.zero_point_mag - zp) < 0.005
    assert result.n_stars <= n - 10
    assert 0 < result.zero_point_err_mag < 0.005


@pytest.mark.parametrize(
    ("flux", "err", "mag", "exptime"),
    [
        ([], [], [], 30.0),  # no matches
        ([100.0, 200.0], [1e3, 1e3], [20.0, 19.0], 30.0),  # all below the S/N cut
        ([1e5] * 5, [1e2] * 5, [18.0] * 5, 0.0),  # no exposure time
        ([1e5, np.nan], [1e2, 1.0], [18.0], 30.0),  # mismatched lengths
    ],
)
def test_unusable_inputs_are_not_ok(
    flux: list[float], err: list[float], mag: list[float], exptime: float
) -> None:
    result = fit_zero_point(np.array(flux), np.array(err), np.array(mag), exptime)
    assert isinstance(result, PhotoCalibResult)
    assert not result.ok and result.reason
    assert np.isnan(result.zero_point_mag)


def test_failed_astrometry_gives_no_zero_point() -> None:
    sim = processed(misaligned=True)
    astrom = fit_astrometry(sim.sources, refcat_for(sim).slice(0, 0), sim.nominal_wcs)
    src = sim.sources.take(astrom.source_index)
    result = fit_zero_point(
        src["flux"].to_numpy(), src["flux_err"].to_numpy(), np.zeros(0), sim.obs.exptime_s
    )
    assert not result.ok and result.reason == "no matched stars"
