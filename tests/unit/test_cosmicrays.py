"""Cosmic-ray detection and repair against the simulator's truth.

Scored on the post-ISR exposure (before repair) of synthetic-camera detectors
with 20 simulated tracks: the fraction of true CR pixels found, the fraction
of bright stars' pixels wrongly flagged, and flags far from any track.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from ppray.image import Exposure, MaskBit
from ppray.science.cosmicrays import find_cosmic_rays, mask_cosmic_rays

from .simdata_calib import CalibSim, processed


def _star_pixels(sim: CalibSim, min_snr: float = 50.0) -> np.ndarray:
    """Pixels within one FWHM of a truth star with S/N > ``min_snr``, away from any CR."""
    stars = sim.truth.stars
    bright = stars["snr"].to_numpy() > min_snr
    x, y = stars["x"].to_numpy()[bright], stars["y"].to_numpy()[bright]
    ny, nx = sim.truth.image_e.shape
    yy, xx = np.mgrid[:ny, :nx]
    near = np.zeros((ny, nx), dtype=bool)
    r = sim.fwhm_px
    for xi, yi in zip(x, y, strict=True):
        x0, x1 = max(int(xi - r) - 1, 0), min(int(xi + r) + 2, nx)
        y0, y1 = max(int(yi - r) - 1, 0), min(int(yi + r) + 2, ny)
        sub = (xx[y0:y1, x0:x1] - xi) ** 2 + (yy[y0:y1, x0:x1] - yi) ** 2 <= r * r
        near[y0:y1, x0:x1] |= sub
    return near & ~binary_dilation(sim.truth.cosmic_ray_mask, iterations=2)


@pytest.mark.parametrize("seeing", [0.7, 1.1])
@pytest.mark.parametrize("niter", [1, 2])
def test_finds_cosmic_rays_and_spares_stars(seeing: float, niter: int) -> None:
    sim = processed(seeing_fwhm_arcsec=seeing)
    truth = sim.truth.cosmic_ray_mask
    found = find_cosmic_rays(sim.isr_exposure, psf_fwhm_px=sim.fwhm_px, niter=niter)
    assert found.shape == truth.shape and found.dtype == bool
    assert truth.sum() > 100  # the test means something
    completeness = np.count_nonzero(found & truth) / np.count_nonzero(truth)
    assert completeness >= 0.90, completeness
    stars = _star_pixels(sim)
    assert stars.sum() > 500
    star_flagged = np.count_nonzero(found & stars) / np.count_nonzero(stars)
    assert star_flagged < 0.01, star_flagged
    # Flags away from every track (noise, hot pixels) stay rare.
    stray = np.count_nonzero(found & ~binary_dilation(truth, iterations=1))
    assert stray <= 0.2 * np.count_nonzero(truth), stray


def test_no_cosmic_rays_no_flags() -> None:
    sim = processed(cosmic_rays=0)
    found = find_cosmic_rays(sim.isr_exposure, psf_fwhm_px=sim.fwhm_px)
    assert np.count_nonzero(found) <= 20


def test_masked_pixels_are_never_flagged() -> None:
    sim = processed()
    exp = sim.isr_exposure
    mask = exp.mask.copy()
    truth = sim.truth.cosmic_ray_mask
    mask[truth] |= np.uint32(MaskBit.BAD)
    masked = Exposure(exp.image, exp.variance, mask, exp.wcs, dict(exp.metadata))
    found = find_cosmic_rays(masked, psf_fwhm_px=sim.fwhm_px)
    assert not np.any(found & truth)
    everything = Exposure(exp.image, exp.variance, mask | np.uint32(MaskBit.NO_DATA))
    assert not find_cosmic_rays(everything, psf_fwhm_px=sim.fwhm_px).any()


def test_mask_and_repair() -> None:
    sim = processed()
    exp = sim.isr_exposure
    image_before = exp.image.copy()
    found = find_cosmic_rays(exp, psf_fwhm_px=sim.fwhm_px)
    out = mask_cosmic_rays(exp, found)
    assert np.array_equal(exp.image, image_before)  # input untouched
    assert np.array_equal((out.mask & np.uint32(MaskBit.CR)) != 0, found)
    assert out.metadata["NCRPIX"] == int(found.sum())
    # Repaired track pixels are back near the true (sky + star) level: within a few
    # sigma, where they were thousands of electrons above it.
    truth = sim.truth.cosmic_ray_mask & found
    sigma = np.sqrt(exp.variance[truth])
    before = (exp.image[truth] - sim.truth.image_e[truth]) / np.sqrt(sim.truth.image_e[truth])
    after = (out.image[truth] - sim.truth.image_e[truth]) / np.sqrt(sim.truth.image_e[truth])
    assert np.median(before) > 20
    assert np.median(np.abs(after)) < 3.0, np.median(np.abs(after))
    assert np.all(out.variance[truth] < sigma**2)
    unrepaired = mask_cosmic_rays(exp, found, repair=False)
    assert np.array_equal(unrepaired.image, exp.image)


def test_bad_arguments() -> None:
    sim = processed()
    with pytest.raises(ValueError):
        find_cosmic_rays(sim.isr_exposure, psf_fwhm_px=0.0)
    with pytest.raises(ValueError):
        mask_cosmic_rays(sim.isr_exposure, np.zeros((3, 3), dtype=bool))


def test_tiles_agree_with_the_whole_image() -> None:
    sim = processed()
    truth = sim.truth.cosmic_ray_mask
    tiled = find_cosmic_rays(sim.isr_exposure, psf_fwhm_px=sim.fwhm_px, tile_size_px=128)
    whole = find_cosmic_rays(sim.isr_exposure, psf_fwhm_px=sim.fwhm_px, tile_size_px=0)
    assert np.count_nonzero(whole & truth) >= 0.9 * np.count_nonzero(truth)
    assert np.count_nonzero(tiled ^ whole) <= 0.05 * np.count_nonzero(truth)
