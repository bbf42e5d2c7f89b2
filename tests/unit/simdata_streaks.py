"""Synthetic difference images with streaks and look-alikes, for the streak tests.

Noise is Gaussian with a known variance plane (a difference of two sky-limited
exposures); a streak is a segment convolved with a Gaussian PSF: across it a
Gaussian of ``sigma``, along it a step blurred by the same Gaussian at each end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from ppray.image import Exposure, MaskBit

__all__ = [
    "NOISE_E",
    "PSF_SIGMA_PX",
    "TruthStreak",
    "add_cosmic_ray",
    "add_dipole",
    "add_four_lobes",
    "add_point_source",
    "add_streak",
    "clip_to_image",
    "noise_exposure",
]

PSF_SIGMA_PX = 1.7  # 4 px FWHM: 0.8" seeing on 0.2" pixels
NOISE_E = 40.0  # pixel noise of the difference (e-): 800 e- of sky in each exposure


@dataclass(frozen=True)
class TruthStreak:
    x0: float
    y0: float
    x1: float
    y1: float
    peak_sigma: float  # peak per pixel, in units of the pixel noise
    sigma_px: float

    @property
    def angle_deg(self) -> float:
        a = math.degrees(math.atan2(self.y1 - self.y0, self.x1 - self.x0))
        return (a + 90.0) % 180.0 - 90.0

    @property
    def flux_per_px(self) -> float:
        return self.peak_sigma * NOISE_E * math.sqrt(2.0 * math.pi) * self.sigma_px


def noise_exposure(shape: tuple[int, int], seed: int, noise_e: float = NOISE_E) -> Exposure:
    """Gaussian noise whose variance varies by +-20% across the image, as its plane says."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    gx = np.linspace(-1.0, 1.0, nx, dtype=np.float32)[None, :]
    gy = np.linspace(-1.0, 1.0, ny, dtype=np.float32)[:, None]
    variance = (noise_e**2 * (1.0 + 0.2 * gx * gy)).astype(np.float32)
    image = rng.standard_normal(shape, dtype=np.float32) * np.sqrt(variance)
    return Exposure(image=image, variance=variance, mask=np.zeros(shape, dtype=np.uint32))


def add_streak(exposure: Exposure, truth: TruthStreak, noise_e: float = NOISE_E) -> np.ndarray:
    """Add a streak's noiseless model to the image (and its own shot noise nowhere:
    faint streaks are sky-limited); returns the model."""
    ny, nx = exposure.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    dx, dy = truth.x1 - truth.x0, truth.y1 - truth.y0
    length = math.hypot(dx, dy)
    tx, ty = dx / length, dy / length
    s = (x - truth.x0) * tx + (y - truth.y0) * ty
    d = -(x - truth.x0) * ty + (y - truth.y0) * tx
    root2s = math.sqrt(2.0) * truth.sigma_px
    along = 0.5 * (erf(s / root2s) - erf((s - length) / root2s))
    model = (truth.peak_sigma * noise_e) * np.exp(-0.5 * (d / truth.sigma_px) ** 2) * along
    model = model.astype(np.float32)
    exposure.image += model
    return model


def _gaussian(shape: tuple[int, int], x: float, y: float, sx: float, sy: float) -> np.ndarray:
    ny, nx = shape
    yy, xx = np.ogrid[0:ny, 0:nx]
    g = np.exp(-0.5 * (((xx - x) / sx) ** 2 + ((yy - y) / sy) ** 2))
    return (g / (2.0 * math.pi * sx * sy)).astype(np.float32)


def add_point_source(exposure: Exposure, x: float, y: float, flux_e: float) -> None:
    exposure.image += flux_e * _gaussian(exposure.shape, x, y, PSF_SIGMA_PX, PSF_SIGMA_PX)


def add_dipole(
    exposure: Exposure, x: float, y: float, flux_e: float, shift_px: float, angle_deg: float
) -> None:
    """A bright star's residual when science and template are misregistered by ``shift_px``."""
    a = math.radians(angle_deg)
    ox, oy = 0.5 * shift_px * math.cos(a), 0.5 * shift_px * math.sin(a)
    s = PSF_SIGMA_PX
    exposure.image += flux_e * (
        _gaussian(exposure.shape, x + ox, y + oy, s, s)
        - _gaussian(exposure.shape, x - ox, y - oy, s, s)
    )


def add_four_lobes(exposure: Exposure, x: float, y: float, flux_e: float, ratio: float) -> None:
    """A bright star's residual when the PSFs' ellipticities differ: two positive lobes
    along x, two negative along y."""
    s = PSF_SIGMA_PX
    exposure.image += flux_e * (
        _gaussian(exposure.shape, x, y, s * ratio, s / ratio)
        - _gaussian(exposure.shape, x, y, s / ratio, s * ratio)
    )


def add_cosmic_ray(
    exposure: Exposure, x: float, y: float, length_px: float, angle_deg: float, peak_e: float
) -> None:
    """A sharp track (about a pixel wide), unmasked: the hardest case."""
    a = math.radians(angle_deg)
    n = max(int(length_px * 2), 2)
    t = np.linspace(-0.5, 0.5, n) * length_px
    xs = np.rint(x + t * math.cos(a)).astype(int)
    ys = np.rint(y + t * math.sin(a)).astype(int)
    ny, nx = exposure.shape
    ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    exposure.image[ys[ok], xs[ok]] = peak_e


def clip_to_image(truth: TruthStreak, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """The streak's ends clipped to the box of pixel centres (Liang-Barsky)."""
    ny, nx = shape
    x0, y0, x1, y1 = truth.x0, truth.y0, truth.x1, truth.y1
    dx, dy = x1 - x0, y1 - y0
    lo, hi = 0.0, 1.0
    for p, q in ((-dx, x0), (dx, nx - 1 - x0), (-dy, y0), (dy, ny - 1 - y0)):
        if p == 0:
            continue
        r = q / p
        if p < 0:
            lo = max(lo, r)
        else:
            hi = min(hi, r)
    return x0 + lo * dx, y0 + lo * dy, x0 + hi * dx, y0 + hi * dy


def mask_columns(exposure: Exposure, columns: list[int], bit: MaskBit = MaskBit.BAD) -> None:
    """Mark whole columns bad and fill them with garbage the finder must ignore."""
    for c in columns:
        exposure.mask[:, c] |= np.uint32(bit)
        exposure.image[:, c] = 1e6
