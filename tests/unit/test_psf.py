"""PSF measurement, PSF photometry and aperture corrections against the simulator's truth.

The simulator's PSF is a circular Gaussian of known sigma integrated over
pixels; truth fluxes are total electrons in flat-fielded units, which is what
ISR returns.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import sep
from scipy.spatial import cKDTree

from ppray.science.detection import SOURCE_SCHEMA
from ppray.science.psf import PsfModel, gaussian_psf_image
from ppray.science.psfmeasure import measure_psf
from ppray.science.psfphot import aperture_corrections, psf_flux

from .simdata_calib import CalibSim, processed


def _isolated(sim: CalibSim) -> np.ndarray:
    """Truth stars away from edges, cosmic rays, defects and any star within 4 FWHM."""
    stars = sim.truth.stars
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
    ny, nx = sim.truth.image_e.shape
    inside = (x > 13) & (x < nx - 14) & (y > 13) & (y < ny - 14)
    tree = cKDTree(np.c_[x, y])
    counts = np.array([len(n) for n in tree.query_ball_point(np.c_[x, y], 4 * sim.fwhm_px)])
    cr = cKDTree(np.argwhere(sim.truth.cosmic_ray_mask)[:, ::-1])
    d_cr, _ = cr.query(np.c_[x, y])
    return inside & (counts == 1) & (d_cr > 3 * sim.fwhm_px) & ~stars["saturated"].to_numpy()


def _matched_sources(sim: CalibSim) -> tuple[np.ndarray, np.ndarray]:
    """For each truth star, the index of the detection within 1 px (-1 if none)."""
    s = sim.sources
    d, i = cKDTree(np.c_[s["x"].to_numpy(), s["y"].to_numpy()]).query(
        np.c_[sim.truth.stars["x"].to_numpy(), sim.truth.stars["y"].to_numpy()]
    )
    return np.where(d < 1.0, i, -1), d


@pytest.mark.parametrize("seeing", [0.7, 1.1])
def test_fwhm_matches_seeing(seeing: float) -> None:
    sim = processed(seeing_fwhm_arcsec=seeing)
    psf = measure_psf(sim.exposure, sim.sources)
    assert psf.ok, psf.reason
    assert psf.n_stars >= 5
    assert abs(psf.fwhm_px / sim.fwhm_px - 1.0) <= 0.05, (psf.fwhm_px, sim.fwhm_px)
    assert psf.sigma_px == pytest.approx(sim.truth.psf_sigma_px, rel=0.05)
    assert psf.ellipticity < 0.05  # the simulator's PSF is round
    assert psf.image.shape == (25, 25)
    assert psf.image.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.unravel_index(np.argmax(psf.image), psf.image.shape) == (12, 12)
    # The pixelised model matches the truth Gaussian integrated over pixels.
    expected = gaussian_psf_image(sim.fwhm_px, 25)
    assert np.abs(psf.image - expected).max() < 0.05 * expected.max()


@pytest.mark.parametrize("seeing", [0.7, 1.1])
def test_psf_flux_is_unbiased_for_bright_stars(seeing: float) -> None:
    sim = processed(seeing_fwhm_arcsec=seeing)
    psf = measure_psf(sim.exposure, sim.sources)
    stars = sim.truth.stars
    index, _ = _matched_sources(sim)
    bright = (stars["snr"].to_numpy() > 50) & ~stars["saturated"].to_numpy() & (index >= 0)
    assert bright.sum() >= 10
    # At the detected (not the true) positions, as the pipeline measures them.
    x = sim.sources["x"].to_numpy()[index[bright]]
    y = sim.sources["y"].to_numpy()[index[bright]]
    flux, flux_err = psf_flux(sim.exposure, x, y, psf)
    ratio = flux / stars["flux_e"].to_numpy()[bright]
    assert np.all(np.isfinite(ratio)) and np.all(flux_err > 0)
    assert abs(np.median(ratio) - 1.0) <= 0.02, np.median(ratio)


def test_psf_flux_errors_match_scatter() -> None:
    sim = processed()
    psf = measure_psf(sim.exposure, sim.sources)
    stars = sim.truth.stars
    snr = stars["snr"].to_numpy()
    sel = _isolated(sim) & (snr > 5) & (snr < 100)
    assert sel.sum() >= 30
    flux, err = psf_flux(sim.exposure, stars["x"].to_numpy()[sel], stars["y"].to_numpy()[sel], psf)
    pull = (flux - stars["flux_e"].to_numpy()[sel]) / err
    robust_sd = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert 0.75 <= robust_sd <= 1.3, robust_sd
    assert abs(np.median(pull)) < 0.5, np.median(pull)


def test_psf_flux_handles_edges_and_nan() -> None:
    sim = processed()
    psf = measure_psf(sim.exposure, sim.sources)
    flux, err = psf_flux(
        sim.exposure, np.array([np.nan, -50.0, 100.0]), np.array([10.0, 10.0, np.nan]), psf
    )
    assert np.all(np.isnan(flux)) and np.all(np.isnan(err))
    # Most of the PSF on the image: measured; a quarter of it (a corner): not.
    flux, _ = psf_flux(sim.exposure, np.array([2.0, 0.0]), np.array([200.0, 0.0]), psf)
    assert np.isfinite(flux[0]) and np.isnan(flux[1])


def test_aperture_correction_brings_aperture_flux_to_total() -> None:
    sim = processed()
    psf = measure_psf(sim.exposure, sim.sources)
    radius = 6.0
    # A 512 px detector has too few bright stars to measure it: the PSF model's own.
    _, correction = aperture_corrections(sim.exposure, sim.sources, psf, radius)
    index, _ = _matched_sources(sim)
    stars = sim.truth.stars
    bright = (stars["snr"].to_numpy() > 50) & ~stars["saturated"].to_numpy() & (index >= 0)
    x = sim.sources["x"].to_numpy()[index[bright]]
    y = sim.sources["y"].to_numpy()[index[bright]]
    apcorr = correction.at(x, y)
    # A 6 px aperture holds ~98.7% of a sigma = 1.7 px Gaussian.
    assert np.all((apcorr > 1.0) & (apcorr < 1.05)), apcorr
    aflux, _, _ = sep.sum_circle(np.ascontiguousarray(sim.exposure.image), x, y, radius, subpix=5)
    ratio = aflux * apcorr / stars["flux_e"].to_numpy()[bright]
    assert abs(np.median(ratio) - 1.0) <= 0.02, np.median(ratio)


def test_no_stars_gives_a_flagged_fallback() -> None:
    sim = processed(empty_sky=True)
    psf = measure_psf(sim.exposure, sim.sources, default_fwhm_px=4.5)
    assert isinstance(psf, PsfModel)
    assert not psf.ok and "fewer than" in psf.reason
    assert psf.fwhm_px == 4.5 and psf.n_stars == 0
    assert psf.image.sum() == pytest.approx(1.0)
    empty = measure_psf(sim.exposure, SOURCE_SCHEMA.empty_table())
    assert not empty.ok
    # Downstream steps still work with the fallback.
    flux, err = psf_flux(sim.exposure, np.array([200.0]), np.array([200.0]), psf)
    assert np.isfinite(flux).all() and np.isfinite(err).all()
    scaled, apcorr = aperture_corrections(sim.exposure, sim.sources, psf, 6.0)
    assert scaled is psf and apcorr.n_stars == 0
    assert 1.0 < apcorr.centre < 1.1


def test_too_few_stars_is_flagged() -> None:
    sim = processed()
    few = sim.sources.filter(pa.compute.less(sim.sources["snr"], 60.0))
    psf = measure_psf(sim.exposure, few, min_snr=60.0)
    assert not psf.ok and psf.reason


def test_bad_arguments() -> None:
    sim = processed()
    with pytest.raises(ValueError):
        measure_psf(sim.exposure, sim.sources, stamp_size=24)
