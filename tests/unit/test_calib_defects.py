"""Defects found from combined darks and flats against the simulator's injected truth."""

from __future__ import annotations

from functools import cache

import numpy as np
import pyarrow as pa
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.ndimage import binary_dilation

from ppray.calib.combine import combine_calibration, master_calibrations
from ppray.calib.defects import (
    DEFECT_SCHEMA,
    DefectKind,
    Defects,
    defects_to_mask,
    find_defects,
    large_scale_model,
)
from ppray.calib.quality import calibration_quality, defect_quality
from ppray.image import MaskBit, RawExposure
from ppray.instrument import detector_wcs, load_instrument
from ppray.science.isr import run_isr
from ppray.sim.calib_exposures import (
    DEFECT_TRUTH_SCHEMA,
    CalibSet,
    CalibTruth,
    DefectInjection,
    make_calib_truth,
    simulate_calib_set,
)
from ppray.sim.render import SimulatedObservation, make_calibrations, render_detector

from .simdata import BORESIGHT, sky_catalog

SYN = load_instrument("synthetic")
N_EACH = 8


@cache
def _found(detector: str, source: str = "injected") -> tuple[CalibSet, Defects, tuple]:
    """A calibration set, the defects found in its masters, and the masters (cached)."""
    det = SYN.detector(detector)
    truth = None
    if source == "render":  # make_calibrations' own defects: a truth this module did not make
        calibs = make_calibrations(SYN, det, seed=3)
        truth = CalibTruth(calibs=calibs, defects=DEFECT_TRUTH_SCHEMA.empty_table())
    elif source == "clean":
        none = DefectInjection(n_hot=0, n_cold=0, n_dead=0, n_hot_columns=0, n_low_columns=0)
        truth = make_calib_truth(SYN, det, seed=2, injection=none)
    cs = simulate_calib_set(
        SYN, det, n_bias=N_EACH, n_dark=N_EACH, n_flat=N_EACH, cosmic_rays=40, seed=1, truth=truth
    )
    bias = combine_calibration("bias", (e.raw for e in cs.biases), SYN, det)
    dark = combine_calibration(
        "dark", (e.raw for e in cs.darks), SYN, det, bias=bias.combined.image
    )
    flat = combine_calibration(
        "flat",
        (e.raw for e in cs.flats),
        SYN,
        det,
        bias=bias.combined.image,
        dark=dark.combined.image,
    )
    found = find_defects(dark.combined.image, flat.combined.image)
    return cs, found, (bias, dark, flat)


def _recovered(found: np.ndarray, truth: pa.Table) -> np.ndarray:
    """Per truth row: whether at least 95% of its pixels are in the found mask."""
    out = []
    for row in truth.to_pylist():
        box = found[row["y0"] : row["y0"] + row["height"], row["x0"] : row["x0"] + row["width"]]
        out.append(box.mean() >= 0.95)
    return np.asarray(out, dtype=bool)


@pytest.mark.parametrize("detector", ["R22_S00", "R22_S11"])
def test_injected_defects_are_recovered(detector: str) -> None:
    cs, found, _ = _found(detector)
    truth = cs.truth.defects
    kinds = np.asarray(truth["kind"].to_pylist())
    recovered = _recovered(found.mask, truth)
    for kind in ("hot", "cold", "dead", "bad_column"):
        assert (kinds == kind).sum() > 0
        assert recovered[kinds == kind].mean() >= 0.95, kind
    true_mask = cs.truth.calibs.defects
    assert (found.mask & true_mask).sum() >= 0.95 * true_mask.sum()
    # Few false positives: a column end off by a row or two, a rare noise peak.
    assert (found.mask & ~true_mask).sum() <= 20


@pytest.mark.parametrize("detector", ["R22_S00", "R22_S11"])
def test_found_kinds_and_columns_match_the_truth(detector: str) -> None:
    cs, found, _ = _found(detector)
    truth = cs.truth.defects
    counts = found.counts()
    for kind in ("hot", "cold", "dead"):
        n_true = sum(k == kind for k in truth["kind"].to_pylist())
        assert abs(counts[kind] - n_true) <= max(1, n_true // 20), kind
    true_cols = {
        r["x0"]: (r["y0"], r["y0"] + r["height"])
        for r in truth.to_pylist()
        if r["kind"] == "bad_column"
    }
    found_cols = {
        r["x0"]: (r["y0"], r["y0"] + r["height"])
        for r in found.table.to_pylist()
        if r["kind"] == "bad_column"
    }
    assert set(found_cols) == set(true_cols)
    for x, (y0, y1) in true_cols.items():
        assert abs(found_cols[x][0] - y0) <= 3 and abs(found_cols[x][1] - y1) <= 3


def test_a_low_column_is_found_though_no_pixel_of_it_is_cold() -> None:
    cs, found, (_, _, flat) = _found("R22_S11")
    (col,) = [r for r in cs.truth.defects.to_pylist() if r["kind"] == "bad_column" and r["y0"] == 0]
    assert col["value"] > 0.8  # above the cold-pixel threshold
    relative = flat.combined.image / large_scale_model(flat.combined.image)
    assert np.median(relative[:, col["x0"]]) > 0.8
    assert found.mask[:, col["x0"]].all()


def test_make_calibrations_defects_are_recovered() -> None:
    """An independent truth: the render module's own hot and dead pixels and hot column."""
    cs, found, _ = _found("R22_S00", "render")  # an even id: with a hot partial column
    true_mask = cs.truth.calibs.defects
    assert true_mask.sum(axis=0).max() > 100
    assert (found.mask & true_mask).sum() >= 0.95 * true_mask.sum()
    assert (found.mask & ~true_mask).sum() <= 20


def test_clean_detector_has_few_false_positives() -> None:
    cs, found, _ = _found("R22_S10", "clean")
    assert not cs.truth.calibs.defects.any()
    assert found.mask.sum() <= 10
    assert found.counts()["bad_column"] == 0


def test_table_and_mask_agree_and_fit_calibrations() -> None:
    _, found, (bias, dark, flat) = _found("R22_S11")
    assert found.table.schema.equals(DEFECT_SCHEMA)
    assert_array_equal(defects_to_mask(found.table, found.mask.shape), found.mask)
    assert found.mask.dtype == np.bool_
    assert set(found.table["kind"].to_pylist()) <= {k.value for k in DefectKind}
    calibs = master_calibrations(
        bias.combined.image, dark.combined.image, flat.combined.image, found.mask
    )
    assert_array_equal(calibs.defects, found.mask)
    assert_array_equal(calibs.defect_mask != 0, found.mask)
    quality = defect_quality(found.table, found.mask.shape)
    assert quality["n_hot"] == found.counts()["hot"]
    assert quality["n_defect_pixels"] == found.mask.sum()


def test_masters_calibrate_a_science_exposure() -> None:
    """End to end: masters and defects from calibration exposures drive ISR of a visit."""
    cs, found, (bias, dark, flat) = _found("R22_S11")
    det = SYN.detector("R22_S11")
    good = ~found.mask
    flat_image = flat.combined.image / flat.combined.image[good].mean(dtype=np.float64)
    calibs = master_calibrations(bias.combined.image, dark.combined.image, flat_image, found.mask)
    ra, dec, rot = BORESIGHT
    wcs = detector_wcs(SYN, det, ra, dec, rot)
    obs = SimulatedObservation(exptime_s=30.0, sky_e_per_px_per_s=30.0)
    segments, truth = render_detector(
        sky_catalog(), SYN, det, wcs, obs, cs.truth.calibs, seed=5, cosmic_rays=0
    )
    raw = RawExposure(segments=segments, header={"EXPTIME": 30.0, "DARKTIME": 30.0})
    exp = run_isr(raw, calibs, SYN, det)
    assert_array_equal((exp.mask & MaskBit.BAD) != 0, found.mask)
    use = (exp.mask == 0) & ~binary_dilation(truth.saturated, iterations=2)
    chi = ((exp.image - truth.image_e) / np.sqrt(exp.variance))[use].astype(np.float64)
    assert use.mean() > 0.99
    assert abs(chi.mean()) < 0.05
    assert_allclose(chi.std(), 1.0, atol=0.05)
    metrics = calibration_quality(
        bias=bias.combined,
        dark=dark.combined,
        flat=flat.combined,
        defects=found.table,
        defect_mask=found.mask,
    )
    assert metrics["defects_n_bad_column"] == 2
    assert metrics["bias_n_used_median"] == N_EACH
    assert all(np.isfinite(v) for v in metrics.values())


def test_find_defects_needs_an_input() -> None:
    with pytest.raises(ValueError, match="needs"):
        find_defects(None, None)
    with pytest.raises(ValueError, match="shape"):
        find_defects(np.zeros((8, 8)), np.ones((8, 9)))
