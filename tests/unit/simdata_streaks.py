"""Synthetic difference images with streaks and look-alikes, for the streak tests.

Noise is Gaussian with a known variance plane (a difference of two sky-limited
exposures). A streak is a segment convolved with a Gaussian PSF: across it a
Gaussian of ``sigma_px``, along it a step blurred by the same Gaussian at each end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from ppray.image import Exposure

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
    "segment",
]

PSF_SIGMA_PX = 1.7  # 4 px FWHM: 0.8" seeing on 0.2" pixels
NOISE_E = 40.0  # pixel noise of the difference (e-): 800 e- of sky in each exposure


@dataclass(frozen=True)
class TruthStreak:
    x0: float
    y0: float
    x1: float
    y1: float
    peak_sigma: float  # peak per pixel, in units of the pixel noise (negative: in the template)
    sigma_px: float = PSF_SIGMA_PX

    @property
    def angle_deg(self) -> float:
        """Direction from +x towards +y, in [-90, 90)."""
        a = math.degrees(math.atan2(self.y1 - self.y0, self.x1 - self.x0))
        return (a + 90.0) % 180.0 - 90.0

    @property
    def flux_per_px(self) -> float:
        return self.peak_sigma * NOISE_E * math.sqrt(2.0 * math.pi) * self.sigma_px


def segment(
    cx: float, cy: float, length: float, angle_deg: float, peak_sigma: float,
    sigma_px: float = PSF_SIGMA_PX,
) -> TruthStreak:  # fmt: skip
    """A streak centred on ``(cx, cy)``; it may run off the image."""
    a = math.radians(angle_deg)
    dx, dy = 0.5 * length * math.cos(a), 0.5 * length * math.sin(a)
    return TruthStreak(cx - dx, cy - dy, cx + dx, cy + dy, peak_sigma, sigma_px)


def noise_exposure(shape: tuple[int, int], seed: int, noise_e: float = NOISE_E) -> Exposure:
    """Gaussian noise whose variance varies by +-20% across the image, as its plane says."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    gx = np.linspace(-1.0, 1.0, nx, dtype=np.float32)[None, :]
    gy = np.linspace(-1.0, 1.0, ny, dtype=np.float32)[:, None]
    variance = (noise_e**2 * (1.0 + 0.2 * gx * gy)).astype(np.float32)
    image = rng.standard_normal(shape, dtype=np.float32) * np.sqrt(variance)
    return Exposure(image=image, variance=variance, mask=np.zeros(shape, dtype=np.uint32))


def add_streak(exposure: Exposure, truth: TruthStreak) -> np.ndarray:
    """Add a streak's noiseless model to the image (no shot noise of its own: a faint
    streak is sky-limited); returns the model over the whole image."""
    ny, nx = exposure.shape
    reach = 8.0 * truth.sigma_px
    x_lo = max(int(min(truth.x0, truth.x1) - reach), 0)
    x_hi = min(int(max(truth.x0, truth.x1) + reach) + 1, nx)
    y_lo = max(int(min(truth.y0, truth.y1) - reach), 0)
    y_hi = min(int(max(truth.y0, truth.y1) + reach) + 1, ny)
    model = np.zeros(exposure.shape, dtype=np.float32)
    if x_lo >= x_hi or y_lo >= y_hi:
        return model
    y, x = np.mgrid[y_lo:y_hi, x_lo:x_hi].astype(np.float64)
    length = math.hypot(truth.x1 - truth.x0, truth.y1 - truth.y0)
    tx, ty = (truth.x1 - truth.x0) / length, (truth.y1 - truth.y0) / length
    s = (x - truth.x0) * tx + (y - truth.y0) * ty
    d = (y - truth.y0) * tx - (x - truth.x0) * ty
    root2s = math.sqrt(2.0) * truth.sigma_px
    along = 0.5 * (erf(s / root2s) - erf((s - length) / root2s))
    peak = truth.peak_sigma * NOISE_E
    model[y_lo:y_hi, x_lo:x_hi] = peak * np.exp(-0.5 * (d / truth.sigma_px) ** 2) * along
    exposure.image += model
    return model


def _add_stamp(exposure: Exposure, x: float, y: float, stamp: np.ndarray) -> None:
    """Add a stamp (odd size) centred on the pixel nearest ``(x, y)``, clipped to the image."""
    half = stamp.shape[0] // 2
    cx, cy = round(x), round(y)
    ny, nx = exposure.shape
    y0, y1, x0, x1 = cy - half, cy + half + 1, cx - half, cx + half + 1
    sy0, sx0 = max(-y0, 0), max(-x0, 0)
    sy1, sx1 = stamp.shape[0] - max(y1 - ny, 0), stamp.shape[1] - max(x1 - nx, 0)
    exposure.image[max(y0, 0) : min(y1, ny), max(x0, 0) : min(x1, nx)] += stamp[sy0:sy1, sx0:sx1]


def _gaussian(dx: float, dy: float, sx: float, sy: float, half: int = 20) -> np.ndarray:
    """A unit-flux Gaussian stamp centred ``(dx, dy)`` from its central pixel."""
    off = np.arange(-half, half + 1, dtype=np.float64)
    gx = np.exp(-0.5 * ((off - dx) / sx) ** 2)
    gy = np.exp(-0.5 * ((off - dy) / sy) ** 2)
    return (np.outer(gy, gx) / (2.0 * math.pi * sx * sy)).astype(np.float32)


def add_point_source(exposure: Exposure, x: float, y: float, flux_e: float) -> None:
    dx, dy = x - round(x), y - round(y)
    _add_stamp(exposure, x, y, flux_e * _gaussian(dx, dy, PSF_SIGMA_PX, PSF_SIGMA_PX))


def add_dipole(
    exposure: Exposure, x: float, y: float, flux_e: float, shift_px: float, angle_deg: float
) -> None:
    """A bright star's residual when science and template are misregistered by ``shift_px``."""
    a = math.radians(angle_deg)
    ox, oy = 0.5 * shift_px * math.cos(a), 0.5 * shift_px * math.sin(a)
    dx, dy, s = x - round(x), y - round(y), PSF_SIGMA_PX
    stamp = _gaussian(dx + ox, dy + oy, s, s) - _gaussian(dx - ox, dy - oy, s, s)
    _add_stamp(exposure, x, y, flux_e * stamp)


def add_four_lobes(exposure: Exposure, x: float, y: float, flux_e: float, ratio: float) -> None:
    """A bright star's residual when the PSFs' ellipticities differ: two positive lobes
    along x, two negative along y."""
    s = PSF_SIGMA_PX
    stamp = _gaussian(0.0, 0.0, s * ratio, s / ratio) - _gaussian(0.0, 0.0, s / ratio, s * ratio)
    _add_stamp(exposure, x, y, flux_e * stamp)


def add_cosmic_ray(
    exposure: Exposure, x: float, y: float, length_px: float, angle_deg: float, peak_e: float
) -> None:
    """A sharp track, a pixel wide, left unmasked: the hardest case."""
    a = math.radians(angle_deg)
    t = np.linspace(-0.5, 0.5, max(int(length_px * 2), 2)) * length_px
    xs = np.rint(x + t * math.cos(a)).astype(int)
    ys = np.rint(y + t * math.sin(a)).astype(int)
    ny, nx = exposure.shape
    ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    exposure.image[ys[ok], xs[ok]] = peak_e


def clip_to_image(truth: TruthStreak, shape: tuple[int, int]) -> np.ndarray:
    """The streak's ends clipped to the box of pixel centres (Liang-Barsky), ``[2, 2]``."""
    ny, nx = shape
    x0, y0, x1, y1 = truth.x0, truth.y0, truth.x1, truth.y1
    dx, dy = x1 - x0, y1 - y0
    lo, hi = 0.0, 1.0
    for p, q in ((-dx, x0), (dx, nx - 1 - x0), (-dy, y0), (dy, ny - 1 - y0)):
        if p != 0:
            lo, hi = (max(lo, q / p), hi) if p < 0 else (lo, min(hi, q / p))
    return np.array([[x0 + lo * dx, y0 + lo * dy], [x0 + hi * dx, y0 + hi * dy]])
