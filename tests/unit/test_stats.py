"""The shared constants and robust sigma of ppray.science.stats."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from astropy.stats import mad_std
from scipy.special import ndtri

import ppray.science
from ppray.science.stats import FWHM_PER_SIGMA, MAD_TO_SIGMA, robust_sigma


def test_fwhm_per_sigma_is_the_gaussian_width_at_half_maximum() -> None:
    half_width = FWHM_PER_SIGMA / 2.0
    assert math.exp(-0.5 * half_width**2) == pytest.approx(0.5, rel=1e-15)


def test_mad_to_sigma_is_astropys() -> None:
    assert abs(MAD_TO_SIGMA * ndtri(0.75) - 1.0) < 1e-15
    values = np.random.default_rng(0).normal(3.0, 2.0, 1001)
    assert robust_sigma(values) == mad_std(values)


def test_robust_sigma_leaves_out_non_finite_values_and_takes_a_centre() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0, np.nan, np.inf, -np.inf])
    assert robust_sigma(values) == pytest.approx(MAD_TO_SIGMA * 1.0)
    # About 0 the absolute deviations are the values themselves: median 3.
    assert robust_sigma(values, center=0.0) == pytest.approx(MAD_TO_SIGMA * 3.0)
    assert math.isnan(robust_sigma(np.array([np.nan, np.inf])))
    assert math.isnan(robust_sigma(np.array([])))


def test_the_package_re_exports_every_modules_public_api() -> None:
    modules = [
        "astrometry", "background", "cosmicrays", "detection", "dia", "isr", "photometry",
        "psf", "psfmeasure", "psfphot", "reliability", "stats", "streaks", "subtraction", "warp",
    ]  # fmt: skip
    for name in modules:
        module = importlib.import_module(f"ppray.science.{name}")
        for public in module.__all__:
            assert public in ppray.science.__all__, (name, public)
            assert getattr(ppray.science, public) is getattr(module, public)
