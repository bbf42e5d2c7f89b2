"""Render raws of one detector: sky, stars, calibration signatures, noise, cosmic rays.

The simulator's model of a CCD, in the order light and charge meet it:

1. Expected electrons ``truth`` = sky + objects, each object a circular
   Gaussian PSF (FWHM = seeing; galaxies add their intrinsic sigma in
   quadrature) integrated exactly over every pixel with the error function,
   so that centroids and fluxes measured on the image are unbiased.
2. The flat-field response multiplies ``truth``; dark current (``dark *
   exptime``) adds; the total is Poisson-sampled.
3. Cosmic rays deposit short tracks of charge; the bias structure (e-) adds.
4. Each amplifier divides by its gain, adds its bias level and a slow per-row
   bias drift that the prescan, serial overscan and parallel overscan see too,
   adds Gaussian read noise everywhere, trails a little charge from the last
   data column into the first overscan columns (CTI), rounds to integer ADU
   and clips at saturation.

:class:`SimTruth` keeps what the pipeline must recover: ``image_e`` is the
expected image in flat-fielded electrons, which is what ISR returns up to noise.

This is the simple sky. The realistic one (:mod:`ppray.sim.realistic`) draws
step 1 differently and shares steps 2-4, with charge bleeding between 2 and 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS
from scipy.special import erf

from ppray.image import Calibrations
from ppray.instrument import Detector, Instrument
from ppray.science.stats import FWHM_PER_SIGMA
from ppray.sim.artifacts import bleed_columns
from ppray.sim.sky import catalog_mag

__all__ = [
    "SimTruth",
    "SimulatedObservation",
    "electrons_to_segments",
    "fwhm_to_sigma",
    "make_calibrations",
    "render_detector",
]

# Stamps reach 6 sigma: a Gaussian there is 1.5e-8 of its peak, far below any noise.
_STAMP_SIGMAS = 6.0
# Fractions of the last data column's charge trailing into the first overscan columns
# (CTI); ISR skips these columns when it measures the bias.
_CTI_TRAIL = (2e-3, 3e-4)


def fwhm_to_sigma(fwhm_arcsec: float, pixel_scale_arcsec: float) -> float:
    """Gaussian sigma in pixels for a FWHM in arcseconds."""
    return fwhm_arcsec / FWHM_PER_SIGMA / pixel_scale_arcsec


@dataclass(frozen=True)
class SimulatedObservation:
    """Conditions of one simulated exposure.

    Attributes
    ----------
    exptime_s
        Exposure time (s); also the dark time.
    seeing_fwhm_arcsec
        FWHM of the Gaussian PSF (arcsec).
    sky_e_per_px_per_s
        Sky level in electrons per pixel per second (before the flat).
    zero_point_mag
        AB magnitude that gives 1 e-/s in total over the PSF.
    band
        Filter; selects the catalog's ``mag_{band}`` column (``mag`` if absent).
    seed
        Extra seed mixed with :func:`render_detector`'s ``seed``, so two
        observations that differ only here get independent noise.
    """

    exptime_s: float = 30.0
    seeing_fwhm_arcsec: float = 0.8
    sky_e_per_px_per_s: float = 30.0
    zero_point_mag: float = 28.0
    band: str = "r"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.exptime_s > 0:
            raise ValueError(f"exptime_s must be > 0, not {self.exptime_s!r}")
        if not self.seeing_fwhm_arcsec > 0:
            raise ValueError(f"seeing_fwhm_arcsec must be > 0, not {self.seeing_fwhm_arcsec!r}")
        if not self.sky_e_per_px_per_s >= 0:
            raise ValueError(f"sky_e_per_px_per_s must be >= 0, not {self.sky_e_per_px_per_s!r}")


@dataclass(frozen=True)
class SimTruth:
    """What the simulator knows, for tests and for scoring the pipeline.

    Attributes
    ----------
    image_e
        Noiseless expected electrons per pixel in flat-fielded units (sky +
        objects), ``float32``: what ISR should return, up to noise.
    stars
        Objects whose centre falls on the detector: ``id``, ``ra``, ``dec``,
        ``x``, ``y`` (0-based numpy pixel coordinates), ``mag`` (in the
        observation's band), ``flux_e`` (total electrons), ``snr``, ``peak_e``
        (expected electrons in the brightest pixel, above sky), ``saturated``
        (the raw saturated at the centre pixel) and ``size_arcsec``. ``snr`` is
        the PSF-optimal S/N: ``sqrt(sum_p (F P_p)^2 / (F P_p + B + RN^2))`` over
        the pixel-integrated profile ``P``, with ``B`` the sky plus mean dark
        per pixel; it ignores neighbours and the flat.
    cosmic_ray_mask
        ``True`` where a cosmic ray deposited charge.
    saturated
        ``True`` where the raw data reached the amplifier's saturation level.
    psf_sigma_px
        Sigma of the Gaussian PSF (pixels).
    sky_e
        Expected sky per pixel (electrons, flat-fielded units).
    """

    image_e: np.ndarray
    stars: pa.Table
    cosmic_ray_mask: np.ndarray
    saturated: np.ndarray
    psf_sigma_px: float
    sky_e: float


def make_calibrations(
    instrument: Instrument, detector: Detector, *, seed: int = 0, defects: bool = True
) -> Calibrations:
    """The true master calibrations of a simulated detector.

    Parameters
    ----------
    instrument, detector
        The camera and the detector.
    seed
        Random seed, combined with ``detector.id``: the same pair gives
        identical calibrations, different detectors differ.
    defects
        Add the hot and dead pixels and the hot column described below (the
        default). Without them ``defects`` is all ``False``, for callers that
        inject defects of their own with a truth table
        (:mod:`ppray.sim.calib_exposures`); bias, dark and flat are otherwise
        identical.

    Returns
    -------
    Calibrations
        ``bias``: a per-amplifier offset (±1 e-), a gradient of a few e- and a
        0.3 e- column pattern. ``dark``: the layout's dark current ±10% per pixel,
        plus hot pixels at 2-50 e-/s. ``flat``: a smooth pattern of about ±5%
        times a 0.5% per-pixel response, normalised to mean 1 over good pixels,
        with nearly dead pixels at 0.02. ``defects``: the hot and dead pixels
        and, on detectors with an even id, one hot partial column.
    """
    layout = instrument.layout
    ny, nx = layout.ny, layout.nx
    rng = np.random.default_rng([seed, detector.id, 0xCA1B])
    u = ((np.arange(nx, dtype=np.float32) + 0.5) / nx - 0.5)[None, :]
    v = ((np.arange(ny, dtype=np.float32) + 0.5) / ny - 0.5)[:, None]

    gx, gy = rng.uniform(-3.0, 3.0, 2)
    bias = np.empty((ny, nx), dtype=np.float32)
    bias[:] = gx * u + gy * v + rng.normal(0.0, 0.3, nx).astype(np.float32)[None, :]
    for amp in detector.amplifiers:
        bias[amp.slices] += np.float32(rng.normal(0.0, 1.0))

    dark = rng.standard_normal((ny, nx), dtype=np.float32)
    dark *= 0.1 * layout.dark_current_e_per_s
    dark += layout.dark_current_e_per_s
    np.maximum(dark, 0.0, out=dark)

    # A vignetting-like radial fall-off, a tilt and a gentle ripple: about ±5% overall.
    ax, ay, phase = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0, 2 * np.pi)
    flat = rng.standard_normal((ny, nx), dtype=np.float32)
    flat *= 0.005
    flat += 1.0
    flat *= (1.0 - 0.12 * (u * u + v * v)) + ax * u + ay * v
    flat *= 1.0 + 0.015 * np.sin(2 * np.pi * (1.5 * u + v) + phase).astype(np.float32)

    defect_mask = np.zeros((ny, nx), dtype=bool)
    if defects:
        _add_defects(dark, flat, defect_mask, detector, rng)
    flat /= np.float32(flat[~defect_mask].mean(dtype=np.float64))
    return Calibrations(
        bias=bias,
        dark=dark,
        flat=flat,
        defects=defect_mask,
        metadata={"CALIBSRC": "ppray.sim", "DETNAME": detector.name, "SIMSEED": seed},
    )


def _add_defects(
    dark: np.ndarray,
    flat: np.ndarray,
    defects: np.ndarray,
    detector: Detector,
    rng: np.random.Generator,
) -> None:
    """:func:`make_calibrations`' own hot and dead pixels and hot partial column, in place."""
    ny, nx = defects.shape
    n_pix = nx * ny
    hot = rng.choice(n_pix, max(3, n_pix // 20000), replace=False)
    dark.flat[hot] = rng.uniform(2.0, 50.0, hot.size)
    defects.flat[hot] = True
    dead = rng.choice(n_pix, max(3, n_pix // 50000), replace=False)
    flat.flat[dead] = 0.02
    defects.flat[dead] = True
    if detector.id % 2 == 0:
        col = int(rng.integers(nx // 8, nx - nx // 8))
        y0 = int(rng.integers(0, ny // 2))
        dark[y0:, col] += np.float32(rng.uniform(0.5, 2.0))
        defects[y0:, col] = True


def _pixel_profile(
    center: np.ndarray, sigma: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray]:
    """First pixel and per-axis Gaussian fractions integrated over pixels.

    Pixel ``i`` spans ``[i - 0.5, i + 0.5]``; the fractions are
    differences of the error function at the pixel edges, so they sum to the
    enclosed flux exactly and their centroid is ``center``.
    """
    start = np.floor(center + 0.5).astype(np.int64) - half
    edges = start[:, None] + np.arange(2 * half + 2)[None, :] - 0.5
    cdf = erf((edges - center[:, None]) / (math.sqrt(2.0) * sigma[:, None]))
    return start, 0.5 * np.diff(cdf, axis=1)


def _render_objects(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    sigma: np.ndarray,
    noise_e2: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Objects' expected electrons on the detector, with each one's optimal S/N and peak.

    Objects are grouped by stamp size so that each group is one vectorised
    outer product; all groups land with a single ``bincount``.
    """
    ny, nx = shape
    image = np.zeros(ny * nx, dtype=np.float64)
    snr = np.zeros(x.size)
    peak = np.zeros(x.size)
    if x.size == 0:
        return image.reshape(shape), snr, peak
    halves = np.maximum(np.ceil(_STAMP_SIGMAS * sigma).astype(np.int64), 2)
    all_index, all_weight = [], []
    for half in np.unique(halves):
        sel = np.flatnonzero(halves == half)
        x0, wx = _pixel_profile(x[sel], sigma[sel], int(half))
        y0, wy = _pixel_profile(y[sel], sigma[sel], int(half))
        profile = wy[:, :, None] * wx[:, None, :]
        star_e = flux[sel, None, None] * profile
        snr[sel] = np.sqrt((star_e**2 / (star_e + noise_e2)).sum(axis=(1, 2)))
        peak[sel] = star_e.max(axis=(1, 2))
        size = 2 * int(half) + 1
        cols = x0[:, None] + np.arange(size)[None, :]
        rows = y0[:, None] + np.arange(size)[None, :]
        inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        index = rows[:, :, None] * nx + cols[:, None, :]
        all_index.append(index[inside])
        all_weight.append(star_e[inside])
    index = np.concatenate(all_index)
    image += np.bincount(index, weights=np.concatenate(all_weight), minlength=ny * nx)
    return image.reshape(shape), snr, peak


def _cosmic_rays(
    shape: tuple[int, int], n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flat pixel indices and electrons of ``n`` short straight cosmic-ray tracks."""
    ny, nx = shape
    indices, charges = [], []
    for _ in range(n):
        length = rng.uniform(1.0, 10.0)
        angle = rng.uniform(0.0, math.pi)
        x_start, y_start = rng.uniform(0, nx), rng.uniform(0, ny)
        # Sample the track every half pixel so that it covers every pixel it crosses.
        step = np.arange(0.0, length + 0.5, 0.5)
        px = np.floor(x_start + step * math.cos(angle)).astype(np.int64)
        py = np.floor(y_start + step * math.sin(angle)).astype(np.int64)
        ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        pix = np.unique(py[ok] * nx + px[ok])
        indices.append(pix)
        charges.append(rng.uniform(1000.0, 8000.0, pix.size))
    if not indices:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(indices), np.concatenate(charges)


def _bias_drift(rows: int, rng: np.random.Generator) -> np.ndarray:
    """A slow per-row bias drift (ADU): an offset and two long-period ripples."""
    r = np.arange(rows, dtype=np.float64)
    drift = np.full(rows, rng.normal(0.0, 3.0))
    for amp_lo, amp_hi, per_lo, per_hi in ((1.0, 4.0, 0.7, 2.0), (0.5, 1.5, 0.2, 0.4)):
        amplitude = rng.uniform(amp_lo, amp_hi)
        period = rng.uniform(per_lo, per_hi) * rows
        drift += amplitude * np.sin(2 * math.pi * r / period + rng.uniform(0, 2 * math.pi))
    return drift.astype(np.float32)


def electrons_to_segments(
    electrons: np.ndarray,
    instrument: Instrument,
    detector: Detector,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read an assembled plane of electrons out through the amplifiers (step 4 above).

    Parameters
    ----------
    electrons
        Assembled ``[y, x]`` electrons per pixel, bias structure included.
    instrument, detector
        The layout and the amplifiers' gain, read noise, bias level and saturation.
    rng
        Source of the read noise and bias drift.

    Returns
    -------
    segments
        Amplifier name -> raw segment (integer-valued ``float32`` ADU).
    saturated
        ``True`` where the data reached the amplifier's saturation level.
    """
    layout = instrument.layout
    segments: dict[str, np.ndarray] = {}
    saturated = np.zeros(electrons.shape, dtype=bool)
    pre = layout.serial_prescan
    rows_total, cols_total = layout.raw_amp_shape
    for amp in detector.amplifiers:
        gain = amp.gain_e_per_adu
        seg = rng.standard_normal((rows_total, cols_total), dtype=np.float32)
        seg *= np.float32(amp.read_noise_e / gain)
        seg += (amp.bias_level_adu + _bias_drift(rows_total, rng))[:, None]
        data = seg[: amp.ny, pre : pre + amp.nx]
        data += electrons[amp.slices] * np.float32(1.0 / gain)
        last = electrons[amp.slices][:, -1] * np.float32(1.0 / gain)
        for k, frac in enumerate(_CTI_TRAIL):
            if k < layout.serial_overscan:
                seg[: amp.ny, pre + amp.nx + k] += np.float32(frac) * last
        np.rint(seg, out=seg)
        np.clip(seg, 0.0, amp.saturation_adu, out=seg)
        saturated[amp.slices] = data >= amp.saturation_adu
        segments[amp.name] = seg
    return segments, saturated


def _expose(
    truth_image: np.ndarray,
    instrument: Instrument,
    detector: Detector,
    calibs: Calibrations,
    exptime_s: float,
    rng: np.random.Generator,
    cosmic_rays: int,
    full_well_e: float | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray | None]:
    """Steps 2-4 of the module docstring: from expected light to raw segments.

    With ``full_well_e``, charge above it bleeds along columns
    (:func:`ppray.sim.artifacts.bleed_columns`) before the cosmic rays land; the
    bleed mask is then the last value returned, else ``None``.
    """
    shape = truth_image.shape
    # What the silicon collects: flat response times light, plus dark current, Poisson.
    expected = truth_image * calibs.flat
    expected += calibs.dark * np.float32(exptime_s)
    electrons = rng.poisson(expected).astype(np.float32)
    del expected
    bleed_mask = None
    if full_well_e is not None:
        bleed_mask, _ = bleed_columns(electrons, full_well_e)
    cr_index, cr_charge = _cosmic_rays(shape, cosmic_rays, rng)
    np.add.at(electrons.reshape(-1), cr_index, cr_charge.astype(np.float32))
    cr_mask = np.zeros(shape, dtype=bool)
    cr_mask.reshape(-1)[cr_index] = True
    electrons += calibs.bias
    segments, saturated = electrons_to_segments(electrons, instrument, detector, rng)
    return segments, saturated, cr_mask, bleed_mask


def _near_detector(
    catalog: pa.Table, wcs: WCS, shape: tuple[int, int], margin_px: float
) -> np.ndarray:
    """Indices of catalog rows within a circle around the detector (a cheap pre-cut)."""
    ny, nx = shape
    ra = np.radians(catalog["ra"].to_numpy(zero_copy_only=False))
    dec = np.radians(catalog["dec"].to_numpy(zero_copy_only=False))
    ((ra_c, dec_c),) = wcs.all_pix2world([[(nx - 1) / 2.0, (ny - 1) / 2.0]], 0)
    scale_deg = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))))
    radius = math.radians((0.5 * math.hypot(nx, ny) + margin_px) * scale_deg * 1.05)
    ra_c, dec_c = math.radians(ra_c), math.radians(dec_c)
    cos_d = np.sin(dec) * math.sin(dec_c) + np.cos(dec) * math.cos(dec_c) * np.cos(ra - ra_c)
    return np.flatnonzero(cos_d >= math.cos(radius))


def render_detector(
    catalog: pa.Table,
    instrument: Instrument,
    detector: Detector,
    wcs: WCS,
    obs: SimulatedObservation,
    calibs: Calibrations,
    *,
    seed: int,
    cosmic_rays: int = 20,
) -> tuple[dict[str, np.ndarray], SimTruth]:
    """Render one detector's raw amplifier segments and the truth behind them.

    Parameters
    ----------
    catalog
        Objects with ``id``, ``ra``, ``dec`` (deg) and ``mag`` or
        ``mag_{band}`` (AB), optionally ``size_arcsec``, as from
        :func:`ppray.sim.sky.make_star_catalog`. Objects off the detector
        (beyond the reach of their PSF) are skipped.
    instrument, detector
        The camera and the detector.
    wcs
        The detector's WCS for this pointing (0-based pixels).
    obs
        Exposure time, seeing, sky, zero point and band.
    calibs
        The detector's true calibrations (:func:`make_calibrations`).
    seed
        Noise seed (>= 0); with ``obs.seed``, the same inputs give identical raws.
    cosmic_rays
        Number of cosmic-ray tracks.

    Returns
    -------
    segments
        Amplifier name -> raw segment (integer-valued ``float32`` ADU) in the
        layout of :mod:`ppray.instrument`.
    truth
        The noiseless image, the objects on the detector with their S/N, and masks.
    """
    layout = instrument.layout
    ny, nx = layout.ny, layout.nx
    shape = (ny, nx)
    rng = np.random.default_rng([seed, obs.seed])
    t = float(obs.exptime_s)
    scale = instrument.pixel_scale_arcsec
    sigma_psf = fwhm_to_sigma(obs.seeing_fwhm_arcsec, scale)
    sky_e = float(obs.sky_e_per_px_per_s) * t

    # Cut the catalog with trigonometry before the (slower) WCS projection.
    max_size = 0.0
    if "size_arcsec" in catalog.column_names and catalog.num_rows:
        max_size = float(np.max(catalog["size_arcsec"].to_numpy(zero_copy_only=False)))
    reach_px = _STAMP_SIGMAS * math.hypot(sigma_psf, max_size / scale) + 2.0
    cat = catalog
    if catalog.num_rows:
        cat = catalog.take(_near_detector(catalog, wcs, shape, reach_px))
    n = cat.num_rows
    if n:
        x, y = (
            np.asarray(c, dtype=np.float64)
            for c in wcs.all_world2pix(
                cat["ra"].to_numpy(zero_copy_only=False),
                cat["dec"].to_numpy(zero_copy_only=False),
                0,
            )
        )
    else:
        x = y = np.zeros(0)
    size = (
        cat["size_arcsec"].to_numpy(zero_copy_only=False)
        if "size_arcsec" in cat.column_names
        else np.zeros(n)
    )
    sigma = np.hypot(sigma_psf, np.asarray(size, dtype=np.float64) / scale)
    reach = _STAMP_SIGMAS * sigma + 1.0
    near = (x > -reach) & (x < nx - 1 + reach) & (y > -reach) & (y < ny - 1 + reach)
    idx = np.flatnonzero(near)
    mag = catalog_mag(cat, obs.band)[idx] if n else np.zeros(0)
    flux = 10.0 ** (-0.4 * (mag - obs.zero_point_mag)) * t
    noise_e2 = sky_e + float(calibs.dark.mean()) * t + layout.read_noise_e**2
    stars_e, snr, peak = _render_objects(shape, x[idx], y[idx], flux, sigma[idx], noise_e2)

    truth_image = stars_e.astype(np.float32)
    truth_image += np.float32(sky_e)
    del stars_e

    segments, saturated, cr_mask, _ = _expose(
        truth_image, instrument, detector, calibs, t, rng, cosmic_rays
    )

    on_chip = (x[idx] >= -0.5) & (x[idx] < nx - 0.5) & (y[idx] >= -0.5) & (y[idx] < ny - 0.5)
    keep = idx[on_chip]
    cx = np.clip(np.floor(x[keep] + 0.5).astype(np.int64), 0, nx - 1)
    cy = np.clip(np.floor(y[keep] + 0.5).astype(np.int64), 0, ny - 1)
    stars = pa.table(
        {
            "id": pa.array(cat["id"].to_numpy(zero_copy_only=False)[keep], pa.int64()),
            "ra": pa.array(cat["ra"].to_numpy(zero_copy_only=False)[keep], pa.float64()),
            "dec": pa.array(cat["dec"].to_numpy(zero_copy_only=False)[keep], pa.float64()),
            "x": pa.array(x[keep], pa.float64()),
            "y": pa.array(y[keep], pa.float64()),
            "mag": pa.array(mag[on_chip], pa.float64()),
            "flux_e": pa.array(flux[on_chip], pa.float64()),
            "snr": pa.array(snr[on_chip], pa.float64()),
            "peak_e": pa.array(peak[on_chip], pa.float64()),
            "saturated": pa.array(saturated[cy, cx], pa.bool_()),
            "size_arcsec": pa.array(np.asarray(size, dtype=np.float64)[keep], pa.float64()),
        }
    )
    truth = SimTruth(
        image_e=truth_image,
        stars=stars,
        cosmic_ray_mask=cr_mask,
        saturated=saturated,
        psf_sigma_px=sigma_psf,
        sky_e=sky_e,
    )
    return segments, truth
