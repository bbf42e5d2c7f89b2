"""Warping templates onto a science grid, scored against the simulator's noiseless truth."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from astropy.wcs import WCS

from ppray.image import Exposure, MaskBit
from ppray.instrument import load_instrument
from ppray.science.warp import PixelMap, warp_templates, warp_to
from ppray.sim.render import SimulatedObservation, make_calibrations, render_detector
from ppray.sim.templates import make_template_patch
from ppray.templates import Tiling, patches_for_footprint

from .simdata_diff import offset_wcs, science_wcs, star_catalog

SHAPE = (512, 512)
SEEING = 0.8
PAD = 16


@cache
def _truth() -> tuple[np.ndarray, np.ndarray]:
    """The simulator's noiseless science image (sky removed) and its stars' x, y, peak."""
    inst = load_instrument("synthetic")
    det = inst.detector("R22_S11")
    obs = SimulatedObservation(exptime_s=30.0, seeing_fwhm_arcsec=SEEING)
    _, truth = render_detector(
        star_catalog(), inst, det, science_wcs(), obs, make_calibrations(inst, det), seed=0
    )
    stars = truth.stars
    xyp = np.stack([stars["x"].to_numpy(), stars["y"].to_numpy(), stars["peak_e"].to_numpy()])
    return truth.image_e - np.float32(truth.sky_e), xyp


def _template(wcs: WCS, shape: tuple[int, int]) -> Exposure:
    return make_template_patch(star_catalog(), wcs, shape, seeing_fwhm_arcsec=SEEING, noise=False)


def _rotated_template(scale: float = 1.0) -> Exposure:
    """A template rotated 0.4 deg and shifted; with ``scale``, on a grid that much finer."""
    if scale == 1.0:
        t_wcs = offset_wcs(science_wcs(), 0.4, 3.37, -2.61, PAD)
        return _template(t_wcs, (SHAPE[0] + 2 * PAD, SHAPE[1] + 2 * PAD))
    sci = science_wcs()
    size = int(np.ceil((SHAPE[0] + 2 * PAD) / scale))
    t_wcs = WCS(naxis=2)
    t_wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    t_wcs.wcs.crval = sci.all_pix2world([[255.5, 255.5]], 0)[0]
    t_wcs.wcs.crpix = [(size + 1) / 2 + 0.37, (size + 1) / 2 - 0.21]
    th = np.radians(0.4)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    t_wcs.wcs.cd = sci.wcs.cd @ rot * scale
    t_wcs.wcs.set()
    return _template(t_wcs, (size, size))


def _bright(xyp: np.ndarray, min_peak: float = 1000.0) -> np.ndarray:
    x, y, peak = xyp
    inside = (x > 12) & (x < SHAPE[1] - 13) & (y > 12) & (y < SHAPE[0] - 13)
    return np.flatnonzero(inside & (peak > min_peak))


def test_warp_reproduces_truth_to_1pct_of_each_star_peak() -> None:
    truth, xyp = _truth()
    warped = warp_to(_rotated_template(), science_wcs(), SHAPE)
    assert warped.mask.max() == 0 and np.isfinite(warped.image).all()
    diff = warped.image - truth
    stars = _bright(xyp)
    assert stars.size > 10
    for i in stars:
        x, y, peak = (round(xyp[0, i]), round(xyp[1, i]), xyp[2, i])
        local = np.abs(diff[y - 4 : y + 5, x - 4 : x + 5]).max()
        assert local < 0.01 * peak, (i, local / peak)
    assert np.abs(diff).max() < 0.01 * xyp[2].max()


@pytest.mark.parametrize("scale", [1.0, 0.8])
def test_warp_conserves_flux(scale: float) -> None:
    """Aperture sums agree within 0.5%, also from a finer template grid (Jacobian)."""
    truth, xyp = _truth()
    warped = warp_to(_rotated_template(scale), science_wcs(), SHAPE)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    stars = _bright(xyp, 2000.0)
    assert stars.size > 5
    for i in stars:
        x, y = xyp[0, i], xyp[1, i]
        sel = (slice(int(y) - 12, int(y) + 13), slice(int(x) - 12, int(x) + 13))
        ap = (xx[sel] - x) ** 2 + (yy[sel] - y) ** 2 <= 10.0**2
        ratio = warped.image[sel][ap].sum() / truth[sel][ap].sum()
        assert abs(ratio - 1.0) < 0.005, (i, ratio)


def test_coarse_grid_mapping_matches_wcs() -> None:
    """Across a full LSSTCam CCD to a template patch: < 0.01 px everywhere sampled."""
    from ppray.instrument import detector_wcs

    inst = load_instrument("lsstcam")
    det = inst.detector("R01_S00")  # off-axis: the patch is tangent far from this CCD
    wcs = detector_wcs(inst, det, 150.0, 2.2, 30.0)
    shape = (inst.layout.ny, inst.layout.nx)
    ny, nx = shape
    corners = wcs.all_pix2world([[0, 0], [nx - 1, 0], [nx - 1, ny - 1], [0, ny - 1]], 0)
    tiling = Tiling()
    patch_wcs, _ = tiling.patch_wcs(patches_for_footprint(corners, 0.0, tiling)[0])
    mapping = PixelMap(patch_wcs, wcs, shape, grid_step=64)
    rows, cols = slice(0, ny, 37), slice(0, nx, 41)
    fx = mapping.fine(mapping.x, rows, cols)
    fy = mapping.fine(mapping.y, rows, cols)
    yy, xx = np.mgrid[rows, cols]
    ra, dec = wcs.all_pix2world(xx, yy, 0)
    ex, ey = patch_wcs.all_world2pix(ra, dec, 0)
    assert np.abs(fx - ex).max() < 0.01
    assert np.abs(fy - ey).max() < 0.01
    # A step far too coarse for the sky's curvature is caught by the same check.
    sloppy = PixelMap(patch_wcs, wcs, shape, grid_step=4000)
    assert np.abs(sloppy.fine(sloppy.x, rows, cols) - ex).max() > 0.01


def test_uncovered_pixels_are_no_data_and_masks_propagate() -> None:
    template = _rotated_template()
    # Keep only the template's left half; flag one bad pixel in the kept part.
    t_mask = np.zeros(template.shape, dtype=np.uint32)
    t_mask[:, template.shape[1] // 2 :] = MaskBit.NO_DATA
    t_image = template.image.copy()
    t_image[:, template.shape[1] // 2 :] = np.nan
    t_mask[200, 100] = MaskBit.BAD
    cut = Exposure(t_image, template.variance, t_mask, template.wcs)
    warped = warp_to(cut, science_wcs(), SHAPE)
    nodata = (warped.mask & MaskBit.NO_DATA) != 0
    assert nodata[:, -100:].all() and not nodata[:, :200].any()
    assert np.isnan(warped.image[nodata]).all() and np.isnan(warped.variance[nodata]).all()
    assert np.isfinite(warped.image[~nodata]).all()
    # The bad pixel lands near science pixel (x, y) = template (100, 200) - offsets.
    ((sx, sy),) = science_wcs().all_world2pix(template.wcs.all_pix2world([[100, 200]], 0), 0)
    bad = (warped.mask & MaskBit.BAD) != 0
    assert bad[round(sy), round(sx)]
    assert 9 <= bad.sum() <= 25  # the 2 px reach of the cubic kernel, no more


def test_warp_templates_mosaics_patches_and_flags_gaps() -> None:
    truth, _ = _truth()
    wcs = science_wcs()
    corners = wcs.all_pix2world([[0, 0], [511, 0], [511, 511], [0, 511]], 0)
    tiling = Tiling(patch_size_deg=0.02, overlap_deg=0.002)
    patches = patches_for_footprint(corners, 0.0, tiling)
    assert len(patches) >= 2
    exposures = [_template(*tiling.patch_wcs(p)) for p in patches]
    mosaic = warp_templates(exposures, wcs, SHAPE)
    assert mosaic.metadata["NPATCHES"] == len(patches)
    assert mosaic.mask.max() == 0
    assert np.abs(mosaic.image - truth).max() < 0.01 * truth.max()
    # Without the patch that owns the first corner, part of the detector has no template.
    owner = patches.index(tiling.patch_of(*corners[0]))
    partial = warp_templates(exposures[:owner] + exposures[owner + 1 :], wcs, SHAPE)
    nodata = (partial.mask & MaskBit.NO_DATA) != 0
    assert 0 < nodata.mean() < 1
    assert np.isnan(partial.image[nodata]).all()
    assert np.abs(partial.image[~nodata] - truth[~nodata]).max() < 0.01 * truth.max()


def test_warp_requires_a_wcs() -> None:
    exp = Exposure(
        np.zeros((4, 4), np.float32), np.ones((4, 4), np.float32), np.zeros((4, 4), np.uint32)
    )
    with pytest.raises(ValueError, match="WCS"):
        warp_to(exp, science_wcs(), SHAPE)
