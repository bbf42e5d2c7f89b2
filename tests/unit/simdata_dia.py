"""Synthetic difference images with known sources, for the DIA tests.

A difference image of two sky-limited exposures is, to a good approximation,
Gaussian noise of twice the sky variance plus the sources' own shot noise; the
variance plane carries exactly that, so weighted fits on it are unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ppray.image import Exposure
from ppray.sim.render import _render_objects

__all__ = ["PSF_SIGMA_PX", "SKY_E", "DiffSim", "flux_for_snr", "make_difference", "trail_points"]

PSF_SIGMA_PX = 0.8 / 0.2 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # 0.8" seeing, 0.2" px
SKY_E = 900.0  # e-/px in each exposure: the difference has twice its variance


@dataclass(frozen=True)
class DiffSim:
    """A synthetic difference exposure and the expected (noiseless) signal in it."""

    exposure: Exposure
    model: np.ndarray


def flux_for_snr(snr: np.ndarray | float, variance: float = 2.0 * SKY_E) -> np.ndarray:
    """Flux (e-) of a point source of PSF-optimal S/N ``snr`` on a background of ``variance``.

    For a Gaussian PSF of sigma ``s`` and background-limited noise,
    ``S/N = F / sqrt(4 pi s² V)``; the sources' own shot noise lowers it a little.
    """
    return np.asarray(snr, dtype=np.float64) * math.sqrt(4.0 * math.pi * PSF_SIGMA_PX**2 * variance)


def trail_points(
    x0: float, y0: float, length_px: float, angle_deg: float, flux: float, step_px: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-points (x, y, flux) of a trail centred on (x0, y0) that share ``flux``."""
    n = max(math.ceil(length_px / step_px), 1)
    t = (np.arange(n) + 0.5) / n - 0.5
    a = math.radians(angle_deg)
    return x0 + t * length_px * math.cos(a), y0 + t * length_px * math.sin(a), np.full(n, flux / n)


def make_difference(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    *,
    seed: int = 0,
    sky_e: float = SKY_E,
) -> DiffSim:
    """A difference exposure: point sources of signed ``flux`` at ``(x, y)`` plus noise."""
    rng = np.random.default_rng(seed)
    x, y, flux = (np.asarray(a, dtype=np.float64) for a in (x, y, flux))
    background = 2.0 * sky_e
    model, _, _ = _render_objects(shape, x, y, flux, np.full(x.size, PSF_SIGMA_PX), background)
    variance = (background + np.abs(model)).astype(np.float32)
    image = rng.standard_normal(shape, dtype=np.float32)
    image *= np.sqrt(variance)
    image += model.astype(np.float32)
    exposure = Exposure(image=image, variance=variance, mask=np.zeros(shape, dtype=np.uint32))
    return DiffSim(exposure=exposure, model=model)
