"""Alert Production steps above the science functions: each with its fallback and its flags.

Every step returns its products together with ``flags`` (short strings saying
what was degraded and why) and ``metrics``; a missing or unusable input
degrades the visit, it never raises. The pipeline strings them together:
characterize -> calibrate -> (template) subtract -> DIA detect.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS

from ppray.config import DetectionConfig
from ppray.image import Exposure, MaskBit
from ppray.refcat import catalog_mag
from ppray.science.astrometry import AstrometryResult, fit_astrometry
from ppray.science.background import estimate_background, subtract_background
from ppray.science.cosmicrays import find_cosmic_rays, mask_cosmic_rays
from ppray.science.detection import FLAG_BAD, FLAG_EDGE, FLAG_SATURATED, detect_sources
from ppray.science.dia import SNR_SCALE_KEY, detect_dia_sources
from ppray.science.photometry import PhotoCalibResult, fit_zero_point
from ppray.science.psf import PsfModel
from ppray.science.psfmeasure import measure_psf
from ppray.science.psfphot import (
    ApertureCorrection,
    aperture_corrections,
    fit_psf_fluxes,
    psf_flux,
)
from ppray.science.reliability import ReliabilityModel, score_dia_sources
from ppray.science.streaks import (
    StreakResult,
    TrailedRows,
    find_streaks,
    replace_streak_fragments,
)
from ppray.science.subtraction import subtract_images
from ppray.science.warp import warp_templates

__all__ = [
    "Calibrated",
    "Characterized",
    "Differenced",
    "StepTimer",
    "calibrate",
    "characterize",
    "difference_imaging",
    "with_calibration",
    "with_ids",
    "with_psf_fluxes",
]

log = logging.getLogger(__name__)

# Neighbours closer than this many PSF FWHM share one PSF fit; closer than the
# second, their positions are refined by it too (blends' pieces).
_BLEND_FWHM = 3.0
_REFINE_FWHM = 2.5

# Difference pixels that say nothing about a new source: EDGE is where the matching
# convolution ran off the image and SAT where neither image measured the flux; both
# left bright-star residuals that passed for sources. CR pixels are repaired, and a
# transient's core wrongly taken for a CR must stay detectable.
_DIA_UNTRUSTED = int(MaskBit.BAD | MaskBit.SAT | MaskBit.EDGE | MaskBit.NO_DATA)


class StepTimer:
    """Adds the wall time of each ``with timer(step):`` block to ``timings[step]``."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self._step = ""
        self._start = 0.0

    def __call__(self, step: str) -> StepTimer:
        self._step = step
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._start
        self.timings[self._step] = self.timings.get(self._step, 0.0) + elapsed


_NO_TIMER = StepTimer({})


@dataclass
class Characterized:
    """A background-subtracted, cosmic-ray-masked exposure, its sources and PSF.

    ``psf`` is normalised to total flux; ``aperture_correction`` turns the
    sources' aperture fluxes into total fluxes, wherever they are.
    """

    exposure: Exposure
    sources: pa.Table
    psf: PsfModel
    aperture_correction: ApertureCorrection
    flags: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Calibrated:
    """The fitted WCS and zero point (or why they could not be fitted)."""

    wcs: WCS
    astrometry: AstrometryResult | None
    photometry: PhotoCalibResult | None
    flags: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Differenced:
    """The difference image and its DIA sources (None without a template)."""

    difference: Exposure | None
    dia_sources: pa.Table | None
    flags: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    template: Exposure | None = None  # warped to the science grid (alert cutouts)
    psf: PsfModel | None = None  # the difference image's PSF
    streaks: StreakResult | None = None  # the trails found (None: not looked for)


def characterize(
    exposure: Exposure,
    config: DetectionConfig,
    *,
    seeing_guess_px: float,
    timer: StepTimer = _NO_TIMER,
) -> Characterized:
    """Background, cosmic rays, detection and PSF of a post-ISR exposure.

    Parameters
    ----------
    exposure
        Post-ISR exposure (electrons).
    config
        Detection parameters.
    seeing_guess_px
        FWHM to assume before the PSF is measured (cosmic-ray finding and the
        fallback PSF when there are too few stars, e.g. under clouds).
    timer
        Records the time of each sub-step (background, cosmic_rays, detect, psf).
    """
    with timer("background"):
        background, bg_stats = estimate_background(exposure, box_size=config.background_box_px)
        exposure = subtract_background(exposure, background)
    with timer("cosmic_rays"):
        cr = find_cosmic_rays(exposure, psf_fwhm_px=seeing_guess_px, niter=config.cosmic_ray_niter)
        exposure = mask_cosmic_rays(exposure, cr)
    with timer("detect"):
        sources = detect_sources(
            exposure,
            threshold_sigma=config.threshold_sigma,
            min_area=config.min_area_px,
            aperture_radius_px=config.aperture_radius_px,
        )
    with timer("psf"):
        psf = measure_psf(exposure, sources, default_fwhm_px=seeing_guess_px)
        psf, apcorr = aperture_corrections(exposure, sources, psf, config.aperture_radius_px)
    with timer("psf_photometry"):
        sources = with_psf_fluxes(exposure, sources, psf)
    flags = [] if psf.ok else [f"psf_fallback: {psf.reason}"]
    if not (math.isfinite(apcorr.centre) and apcorr.centre > 0):
        flags.append("no_aperture_correction")
        apcorr = ApertureCorrection.constant(1.0, exposure.shape)
    metrics = {
        **bg_stats,
        "n_cosmic_ray_px": float(np.count_nonzero(cr)),
        "psf_fwhm_px": psf.fwhm_px,
        "psf_ellipticity": psf.ellipticity,
        "psf_n_stars": float(psf.n_stars),
        "psf_order": float(psf.order),
        "psf_flux_scale": float(psf.flux_scale[0]),
        "aperture_correction": apcorr.centre,
        "aperture_correction_stars": float(apcorr.n_stars),
    }
    return Characterized(exposure, sources, psf, apcorr, flags, metrics)


def with_psf_fluxes(exposure: Exposure, sources: pa.Table, psf: PsfModel) -> pa.Table:
    """Sources with their (total) PSF fluxes; the pieces of blends fitted together.

    Neighbours within ``_BLEND_FWHM`` PSF FWHM are fitted jointly, so the
    pieces of a blend share its light; those within ``_REFINE_FWHM`` also get
    their positions refined by the joint fit (the detection's centres of
    touching pieces lean towards each other), and ``x``, ``y`` are the refined ones.
    """
    if sources.num_rows == 0:
        return sources
    x = sources["x"].to_numpy(zero_copy_only=False)
    y = sources["y"].to_numpy(zero_copy_only=False)
    fit = fit_psf_fluxes(
        exposure, x, y, psf, group_within_fwhm=_BLEND_FWHM, refine_within_fwhm=_REFINE_FWHM
    )
    table = sources
    for name, values in (
        ("x", fit.x),
        ("y", fit.y),
        ("psf_flux", fit.flux),
        ("psf_flux_err", fit.flux_err),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    return table


def calibrate(
    char: Characterized,
    refcat: pa.Table | None,
    initial_wcs: WCS,
    *,
    exptime_s: float,
    band: str,
    timer: StepTimer = _NO_TIMER,
) -> Calibrated:
    """Astrometric and photometric calibration against the preloaded reference catalog.

    Falls back to the nominal WCS and no zero point, with a flag, when the
    reference catalog is missing, does not overlap, or too few stars match.
    """
    if refcat is None or refcat.num_rows == 0:
        return Calibrated(initial_wcs, None, None, ["no_refcat: uncalibrated"])
    with timer("astrometry"):
        astrometry = fit_astrometry(char.sources, refcat, initial_wcs)
    metrics = {"astrom_n_matches": float(astrometry.n_matches)}
    if not astrometry.ok:
        return Calibrated(
            initial_wcs, astrometry, None, [f"astrometry_failed: {astrometry.reason}"], metrics
        )
    metrics["astrom_rms_arcsec"] = astrometry.rms_arcsec
    src = astrometry.source_index
    sources = char.sources
    x = sources["x"].to_numpy(zero_copy_only=False)[src]
    y = sources["y"].to_numpy(zero_copy_only=False)[src]
    with timer("photometry"):
        flux, flux_err = psf_flux(char.exposure, x, y, char.psf)
        bad = FLAG_BAD | FLAG_EDGE | FLAG_SATURATED
        good = (sources["flags"].to_numpy(zero_copy_only=False)[src] & bad) == 0
        ref_mag = catalog_mag(refcat, band)[astrometry.ref_index]
        photometry = fit_zero_point(flux, flux_err, ref_mag, exptime_s, good=good)
    flags = [] if photometry.ok else [f"photometry_failed: {photometry.reason}"]
    if photometry.ok:
        metrics["zero_point_mag"] = photometry.zero_point_mag
        metrics["zero_point_err_mag"] = photometry.zero_point_err_mag
    return Calibrated(astrometry.wcs, astrometry, photometry, flags, metrics)


def with_calibration(
    sources: pa.Table,
    cal: Calibrated,
    *,
    aperture_correction: ApertureCorrection,
    exptime_s: float,
    detector_id: int,
    exposure_id: int,
) -> pa.Table:
    """Sources with sky positions from the fitted WCS, calibrated magnitudes and ids.

    ``mag`` and ``mag_err`` (AB) come from the aperture flux times the aperture
    correction where the source is and the zero point; they are NaN when there is
    no zero point.
    """
    n = sources.num_rows
    x = sources["x"].to_numpy(zero_copy_only=False)
    y = sources["y"].to_numpy(zero_copy_only=False)
    ra, dec = cal.wcs.all_pix2world(x, y, 0) if n else (np.zeros(0), np.zeros(0))
    correction = aperture_correction.at(x, y) if n else np.zeros(0)
    flux = sources["flux"].to_numpy(zero_copy_only=False) * correction
    flux_err = sources["flux_err"].to_numpy(zero_copy_only=False) * correction
    mag = np.full(n, np.nan)
    mag_err = np.full(n, np.nan)
    if cal.photometry is not None and cal.photometry.ok and exptime_s > 0:
        positive = flux > 0
        mag[positive] = cal.photometry.zero_point_mag - 2.5 * np.log10(flux[positive] / exptime_s)
        mag_err[positive] = 2.5 / math.log(10) * flux_err[positive] / flux[positive]
    table = sources.set_column(sources.schema.get_field_index("ra"), "ra", pa.array(ra))
    table = table.set_column(table.schema.get_field_index("dec"), "dec", pa.array(dec))
    table = table.append_column("mag", pa.array(mag)).append_column("mag_err", pa.array(mag_err))
    return with_ids(table, detector_id, exposure_id)


def difference_imaging(
    calexp: Exposure,
    templates: tuple[Exposure, ...],
    threshold_sigma: float,
    *,
    background_box_px: int | None = 128,
    psf: PsfModel | None = None,
    on_grid: bool = False,
    streaks: TrailedRows | Literal["off"] = "one_per_streak",
    reliability: ReliabilityModel | None = None,
    timer: StepTimer = _NO_TIMER,
) -> Differenced:
    """Warp the templates onto the calexp, subtract with PSF matching, detect DIA sources.

    With ``on_grid``, ``templates`` is one exposure already on the calexp's
    pixel grid (its shape and WCS; e.g. warped by the caller, or taken on the
    same grid) and is used as it is: resampling it again would blur it and
    grow its masks.

    The difference image's own background (boxes of ``background_box_px``;
    ``None``: none) is subtracted before detection: the science's background
    map and the template's coadd sky differ by more than the kernel fit's
    low-order polynomial can follow, and a matched filter turns a residual of
    a twentieth of the pixel noise into several sigma of false sources.

    The difference's PSF follows from the calexp's ``psf`` model and the
    subtraction (:meth:`~ppray.science.subtraction.SubtractionResult.difference_psf`):
    DIA's filter, fits and trail test use it where each source is. Without a
    measured calexp PSF (too few stars) it is a Gaussian of the width the
    subtraction's stamps show, and failing that the calexp's fallback PSF, with
    the ``dia_psf_fallback`` flag.

    Satellite and aircraft trails (``streaks`` not ``"off"``) are found on the
    difference (:func:`~ppray.science.streaks.find_streaks`), masked ``STREAK``,
    and the DIA sources on them replaced by one trailed source per trail
    (``"one_per_streak"``) or by none (``"none"``), never by a string of fragments.

    With a ``reliability`` model each DIA source gets its score (column
    ``reliability``, :func:`~ppray.science.reliability.score_dia_sources`).

    Without a template, returns no difference and the ``no_template`` flag: the
    visit is processed single-frame only.
    """
    if not templates or calexp.wcs is None:
        return Differenced(None, None, ["no_template: single-frame processing only"])
    if on_grid:
        if len(templates) != 1 or templates[0].shape != calexp.shape:
            raise ValueError("on_grid needs one template of the calexp's shape")
        warped = templates[0]
    else:
        with timer("warp"):
            warped = warp_templates(templates, calexp.wcs, calexp.shape)
    with timer("subtract"):
        sub = subtract_images(calexp, warped)
        difference = sub.difference
        if background_box_px is not None:
            background, _ = estimate_background(difference, box_size=background_box_px)
            difference = subtract_background(difference, background)
    flags = [] if sub.ok else [f"subtraction_degraded: {sub.reason}"]
    if psf is not None and psf.ok:
        diff_psf = sub.difference_psf(psf)
    elif math.isfinite(sub.psf_fwhm_px):
        diff_psf = PsfModel.gaussian(sub.psf_fwhm_px, ok=False, reason="from the stamps")
        flags.append("dia_psf_fallback: no calexp PSF, a Gaussian of the stamps' width used")
    elif psf is not None:
        diff_psf = psf
        flags.append("dia_psf_fallback: no stamps to measure it, the calexp's fallback PSF used")
    else:
        return Differenced(None, None, [*flags, "no_dia: no PSF for the difference image"])
    with timer("dia"):
        dia = detect_dia_sources(
            difference,
            diff_psf,
            threshold_sigma=threshold_sigma,
            bad_mask_bits=_DIA_UNTRUSTED,
        )
    found = None
    if streaks != "off":
        with timer("streaks"):
            found = find_streaks(difference, diff_psf.sigma_px)
            if found.streaks:
                difference.mask[found.mask] |= np.uint32(MaskBit.STREAK)
                dia = replace_streak_fragments(dia, found, trailed=streaks, wcs=difference.wcs)
    if reliability is not None:
        with timer("reliability"):
            dia = score_dia_sources(dia, difference, calexp, warped, diff_psf, reliability)
    metrics = {
        "n_dia_sources": float(dia.num_rows),
        "n_streaks": float(len(found.streaks)) if found is not None else math.nan,
        "bright_star_residual": sub.bright_star_residual(difference),
        "n_dia_negative": float(np.count_nonzero(dia["isNegative"].to_numpy(zero_copy_only=False))),
        "kernel_fwhm_px": sub.kernel_fwhm_px,
        "kernel_sum": sub.kernel_sum,
        # Which image the kernel blurred: the kernel sum is science/template flux when
        # it is the template, template/science when it is the science.
        "kernel_convolved_science": float(sub.convolved == "science"),
        "subtraction_stamps": float(sub.n_stamps),
        # The order to which the kernel varies across the detector (chosen by the stamps).
        "kernel_spatial_order": float(sub.kernel_order),
        "template_no_data_fraction": float(np.mean((warped.mask & MaskBit.NO_DATA) != 0)),
        "dia_snr_scale": float((dia.schema.metadata or {}).get(SNR_SCALE_KEY, b"nan")),
    }
    return Differenced(difference, dia, flags, metrics, warped, diff_psf, found)


def with_ids(table: pa.Table, detector_id: int, exposure_id: int) -> pa.Table:
    """A source table with ``detector`` and ``exposure_id`` columns added."""
    n = table.num_rows
    return table.append_column(
        "detector", pa.array(np.full(n, detector_id, dtype=np.int32))
    ).append_column("exposure_id", pa.array(np.full(n, exposure_id, dtype=np.int64)))
