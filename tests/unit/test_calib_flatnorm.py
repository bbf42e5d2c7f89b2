"""Focal-plane flat normalisation: camera median 1, relative gains between detectors kept."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from numpy.testing import assert_allclose
from pydantic import ValidationError

from ppray.calib.combine import MasterResult, combine_calibration
from ppray.calib.flatnorm import (
    FlatStatistics,
    apply_flat_scale,
    flat_statistics,
    focal_plane_median,
    focal_plane_scales,
)
from ppray.instrument import load_instrument
from ppray.sim.calib_exposures import CalibTruth, make_calib_truth, simulate_flat

SYN = load_instrument("synthetic")
FLUX_E = 20_000.0
# Relative response (QE times gain error) of each detector: what normalisation must keep.
RELATIVE_GAIN = {"R22_S00": 1.00, "R22_S01": 0.92, "R22_S10": 1.07, "R22_S11": 0.97}
# Lamp level of each flat exposure, shared by all detectors (it drifts through the night).
LAMP = (1.0, 0.93, 1.08, 1.02, 0.97, 1.05)


@cache
def _camera_flats() -> dict[str, tuple[CalibTruth, MasterResult]]:
    """Every detector's flats combined from the same lamp exposures (cached)."""
    out = {}
    for det in SYN.detectors:
        truth = make_calib_truth(SYN, det, seed=4)
        gain = RELATIVE_GAIN[det.name]
        raws = (
            simulate_flat(SYN, det, truth, FLUX_E * gain * lamp, "r", seed=k, cosmic_rays=20).raw
            for k, lamp in enumerate(LAMP)
        )
        master = combine_calibration(
            "flat", raws, SYN, det, bias=truth.calibs.bias, dark=truth.calibs.dark
        )
        out[det.name] = (truth, master)
    return out


def _normalised() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Normalised flats and good-pixel masks per detector."""
    flats = _camera_flats()
    good = {name: ~truth.calibs.defects for name, (truth, _) in flats.items()}
    stats = [
        flat_statistics(m.combined.image, name, good=good[name], scale=m.mean_scale)
        for name, (_, m) in flats.items()
    ]
    factors = focal_plane_scales(stats)
    out = {
        name: apply_flat_scale(m.combined.image, factors[name]) for name, (_, m) in flats.items()
    }
    return out, good


def test_focal_plane_median_is_one() -> None:
    flats, good = _normalised()
    every = np.concatenate([flats[name][good[name]] for name in flats])
    assert_allclose(np.median(every), 1.0, atol=2e-4)


def test_relative_gains_between_detectors_are_kept() -> None:
    flats, good = _normalised()
    camera = _camera_flats()
    truth_level = {
        name: RELATIVE_GAIN[name] * float(np.median(truth.calibs.flat[good[name]]))
        for name, (truth, _) in camera.items()
    }
    ref = "R22_S00"
    for name in flats:
        measured = np.median(flats[name][good[name]]) / np.median(flats[ref][good[ref]])
        assert_allclose(measured, truth_level[name] / truth_level[ref], rtol=1e-3)
    # Without the levels every detector would sit at 1 and the gains would be lost.
    spread = [np.median(m.combined.image[good[n]]) for n, (_, m) in camera.items()]
    assert_allclose(spread, 1.0, atol=2e-3)


def test_each_detector_keeps_its_pixel_response() -> None:
    flats, good = _normalised()
    for name, (truth, _) in _camera_flats().items():
        g = good[name]
        ratio = flats[name][g] / truth.calibs.flat[g]
        # One number per detector: the flat's shape is untouched.
        assert np.std(ratio) / np.mean(ratio) < 0.01


def test_focal_plane_median_matches_the_pixel_median() -> None:
    """Detectors of different sizes and spreads: a median of medians would be wrong."""
    rng = np.random.default_rng(0)
    parts = [
        rng.normal(1.00, 0.02, 300_000),
        rng.normal(1.10, 0.05, 40_000),
        rng.normal(0.90, 0.01, 250_000),
    ]
    stats = [flat_statistics(p, f"D{k}") for k, p in enumerate(parts)]
    exact = float(np.median(np.concatenate(parts)))
    assert_allclose(focal_plane_median(stats), exact, rtol=2e-4)
    median_of_medians = float(np.median([s.median for s in stats]))
    assert abs(median_of_medians - exact) > 0.01
    factors = focal_plane_scales(stats)
    rescaled = np.concatenate([apply_flat_scale(p, factors[f"D{k}"]) for k, p in enumerate(parts)])
    assert_allclose(np.median(rescaled), 1.0, rtol=2e-4)


def test_statistics_are_small_and_json_safe() -> None:
    _, master = _camera_flats()["R22_S11"]
    stats = flat_statistics(master.combined.image, "R22_S11", scale=master.mean_scale)
    text = stats.model_dump_json()
    assert len(text) < 10_000
    assert FlatStatistics.model_validate_json(text) == stats
    # Dead pixels (response 0) are left out.
    assert stats.n_good == int((master.combined.image > 0).sum())
    assert stats.n_good > 0.999 * master.combined.image.size
    assert_allclose(stats.median, master.mean_scale * np.median(master.combined.image), rtol=1e-6)


def test_bad_statistics_are_refused() -> None:
    stats = flat_statistics(np.full((4, 4), 2.0), "A")
    assert_allclose(focal_plane_scales([stats])["A"], 0.5)
    with pytest.raises(ValueError, match="more than once"):
        focal_plane_scales([stats, stats])
    with pytest.raises(ValueError, match="no detector"):
        focal_plane_median([])
    with pytest.raises(ValueError, match="no good pixels"):
        flat_statistics(np.zeros((4, 4)), "B")
    with pytest.raises(ValidationError):
        FlatStatistics(detector="C", scale=1.0, n_good=3, median=1.0, quantiles=(1.0, 0.5))
