"""ISR against the simulator's truth: the recovered image, its noise model and masks."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.ndimage import binary_dilation

from ppray.errors import NonRetriableError
from ppray.image import Calibrations, MaskBit
from ppray.science.isr import overscan_levels, run_isr

from .simdata import simulate


def _chi_and_good(name: str) -> tuple[np.ndarray, np.ndarray]:
    sim = simulate(name)
    exp = run_isr(sim.raw(), sim.calibs, sim.instrument, sim.detector)
    # Cosmic rays are not ISR's to remove; leave them and their neighbours out.
    near_cr = binary_dilation(sim.truth.cosmic_ray_mask, iterations=1)
    good = (exp.mask == 0) & ~near_cr
    chi = (exp.image - sim.truth.image_e) / np.sqrt(exp.variance)
    return chi, good


@pytest.mark.parametrize("name", ["R22_S11", "R22_S00"])
def test_isr_recovers_the_simulated_sky_with_honest_variance(name: str) -> None:
    chi, good = _chi_and_good(name)
    assert good.mean() > 0.99
    values = chi[good].astype(np.float64)
    # Variance from the noisy image biases chi by about -1/(2 sqrt(sky)) = -0.017.
    assert abs(values.mean()) < 0.05
    assert_allclose(values.std(), 1.0, atol=0.05)


def test_isr_output_types_units_and_metadata() -> None:
    sim = simulate()
    exp = run_isr(sim.raw(), sim.calibs, sim.instrument, sim.detector, wcs=sim.wcs)
    shape = (sim.instrument.layout.ny, sim.instrument.layout.nx)
    assert exp.shape == shape
    assert exp.image.dtype == exp.variance.dtype == np.float32
    assert exp.mask.dtype == np.uint32
    assert exp.wcs is sim.wcs
    for key in ("EXPTIME", "DARKTIME", "FILTER", "DETNAME", "GROUPID", "EXPID", "RA", "DEC"):
        assert exp.metadata[key] == sim.header[key]
    assert exp.metadata["BUNIT"] == "electron"
    # Electrons, flat-fielded: the sky level itself, not ADU.
    assert_allclose(np.median(exp.image), sim.truth.sky_e, rtol=0.01)


def _row_scatter(smooth_rows: int) -> list[float]:
    """Per amplifier: scatter of the residual row means over what noise alone gives."""
    sim = simulate()
    layout = sim.instrument.layout
    exp = run_isr(
        sim.raw(), sim.calibs, sim.instrument, sim.detector, overscan_smooth_rows=smooth_rows
    )
    near_cr = binary_dilation(sim.truth.cosmic_ray_mask, iterations=1)
    good = (exp.mask == 0) & ~near_cr
    resid = np.where(good, exp.image - sim.truth.image_e, np.nan)
    var = np.where(good, exp.variance, np.nan)
    ratios = []
    for amp in sim.detector.amplifiers:
        n = np.isfinite(resid[amp.slices]).sum(axis=1)
        row_mean = np.nanmean(resid[amp.slices], axis=1)
        pixel_var = np.nansum(var[amp.slices], axis=1) / n**2
        # The overscan level of each row is itself a median of noisy pixels
        # (efficiency 2/pi), averaged over ``smooth_rows`` rows.
        n_oscan = layout.serial_overscan - 2
        oscan_var = (np.pi / 2) * amp.read_noise_e**2 / n_oscan / smooth_rows
        ratios.append(float(np.std(row_mean / np.sqrt(pixel_var + oscan_var))))
    return ratios


def test_overscan_removes_the_per_row_bias_drift() -> None:
    # The raw rows drift by several ADU (checked in test_sim), i.e. 3-5x the noise of
    # a row mean; after ISR the row means scatter only as the noise allows.
    per_row = _row_scatter(1)
    assert max(per_row) < 1.15, per_row
    smoothed = _row_scatter(9)
    assert max(smoothed) < 1.15, smoothed


def test_any_per_row_offset_in_the_raw_is_removed_exactly() -> None:
    sim = simulate()
    rng = np.random.default_rng(0)
    rows = sim.instrument.layout.raw_amp_shape[0]
    shifted = {
        name: seg + np.rint(rng.normal(0, 30, rows)).astype(np.float32)[:, None]
        for name, seg in sim.segments.items()
    }
    a = run_isr(sim.raw(), sim.calibs, sim.instrument, sim.detector)
    b = run_isr(sim.raw(shifted), sim.calibs, sim.instrument, sim.detector)
    assert_allclose(b.image, a.image, atol=0.02)  # float32 rounding of ~2e4 ADU
    assert_array_equal(b.mask, a.mask)


def test_overscan_levels_median_per_row_and_nan_rows() -> None:
    rng = np.random.default_rng(0)
    block = rng.normal(100, 3, (50, 30)).astype(np.float32)
    assert_allclose(overscan_levels(block), np.median(block, axis=1), rtol=1e-6)
    block[3, :5] = np.nan
    block[7, 2] = -np.inf
    block[9, :] = np.nan
    level = overscan_levels(block)
    assert_allclose(level[3], np.median(block[3, 5:]), rtol=1e-6)
    assert_allclose(level[7], np.median(np.delete(block[7], 2)), rtol=1e-6)
    assert np.isfinite(level[9]) and abs(level[9] - 100) < 2
    assert np.isnan(overscan_levels(np.full((4, 5), np.nan, dtype=np.float32))).all()
    smooth = overscan_levels(block, smooth_rows=5)
    assert smooth.std() < level.std()


def test_masks_sat_bad_and_unmasked_cosmic_rays() -> None:
    sim = simulate(bright_star_at=(300.4, 140.6, 12.0))
    exp = run_isr(sim.raw(), sim.calibs, sim.instrument, sim.detector)
    sat = (exp.mask & MaskBit.SAT) != 0
    assert_array_equal(sat, sim.truth.saturated)
    assert sat[140, 300]
    bad = (exp.mask & MaskBit.BAD) != 0
    assert_array_equal(bad, sim.calibs.defects)
    assert not (exp.mask & MaskBit.NO_DATA).any()
    assert not (exp.mask & MaskBit.CR).any()  # ISR does not look for cosmic rays


def test_hot_pixels_are_dark_corrected() -> None:
    sim = simulate()
    exp = run_isr(sim.raw(), sim.calibs, sim.instrument, sim.detector)
    hot = (sim.calibs.dark > 1.0) & (sim.calibs.flat > 0.5) & ~sim.truth.cosmic_ray_mask
    chi = (exp.image - sim.truth.image_e) / np.sqrt(exp.variance)
    # Several hundred e- of dark each, removed to within the noise.
    assert hot.sum() >= 3
    assert np.abs(chi[hot]).max() < 4.0


def test_all_nan_amplifier_is_no_data_and_the_rest_unharmed() -> None:
    sim = simulate()
    segments = dict(sim.segments, C01=np.full_like(sim.segments["C01"], np.nan))
    exp = run_isr(sim.raw(segments), sim.calibs, sim.instrument, sim.detector)
    amp = next(a for a in sim.detector.amplifiers if a.name == "C01")
    no_data = (exp.mask & MaskBit.NO_DATA) != 0
    assert no_data[amp.slices].all()
    assert no_data.sum() == amp.nx * amp.ny
    assert (exp.image[amp.slices] == 0).all()
    assert np.isinf(exp.variance[amp.slices]).all()
    assert exp.metadata["NNODATA"] == amp.nx * amp.ny
    reference = run_isr(sim.raw(), sim.calibs, sim.instrument, sim.detector)
    others = ~no_data
    assert_array_equal(exp.image[others], reference.image[others])


def test_partial_nans_and_zero_flat_are_masked_without_warnings() -> None:
    sim = simulate()
    segments = {k: v.copy() for k, v in sim.segments.items()}
    pre = sim.instrument.layout.serial_prescan
    segments["C00"][10, pre + 20] = np.nan  # -> assembled (10, 20)
    segments["C00"][30, -1] = np.nan  # one overscan pixel: row level still fine
    flat = sim.calibs.flat.copy()
    flat[100, 100] = 0.0
    calibs = Calibrations(sim.calibs.bias, sim.calibs.dark, flat, sim.calibs.defects)
    exp = run_isr(sim.raw(segments), calibs, sim.instrument, sim.detector)
    assert exp.mask[10, 20] & MaskBit.NO_DATA
    assert exp.mask[100, 100] & MaskBit.BAD and exp.mask[100, 100] & MaskBit.NO_DATA
    assert np.isfinite(exp.image).all()
    assert exp.metadata["NNODATA"] == 2
    assert np.isfinite(exp.image[30]).all() and not (exp.mask[30] & MaskBit.NO_DATA).any()


def test_mismatched_inputs_are_non_retriable() -> None:
    sim = simulate()
    small = Calibrations(
        sim.calibs.bias[:-1], sim.calibs.dark[:-1], sim.calibs.flat[:-1], sim.calibs.defects[:-1]
    )
    with pytest.raises(NonRetriableError, match="calibrations for R22_S11 have shape"):
        run_isr(sim.raw(), small, sim.instrument, sim.detector)
    segments = {k: v for k, v in sim.segments.items() if k != "C11"}
    with pytest.raises(NonRetriableError, match="amplifier C11"):
        run_isr(sim.raw(segments), sim.calibs, sim.instrument, sim.detector)
    segments = dict(sim.segments, C11=sim.segments["C11"][:, :-1])
    with pytest.raises(NonRetriableError, match=r"amplifier C11: shape \(272, 290\)"):
        run_isr(sim.raw(segments), sim.calibs, sim.instrument, sim.detector)
