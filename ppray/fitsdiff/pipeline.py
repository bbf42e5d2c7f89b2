"""Difference imaging of two calibrated FITS images from any camera (``ppray diff``).

:func:`difference_fits` reads a science and a template image
(:func:`~ppray.fitsdiff.reader.read_image`: electrons, variance, mask, WCS)
and runs the Alert Production steps of :mod:`ppray.visit.steps` on them, as
the per-detector pipeline does after ISR. The steps are the sequence
:data:`STEPS`, each a function of the run's :class:`DiffState`:

1. ``characterize`` — the science's background, cosmic rays, detection, PSF
   model and aperture corrections;
2. ``calibrate`` — astrometry and zero point against the reference catalogue
   if one is given (else the image's own WCS and no zero point, flag
   ``no_refcat``); the science sources get sky positions and magnitudes;
3. ``template`` — the template's own background and cosmic rays, then the
   warp onto the science's grid (skipped when both images share their
   pixel grid);
4. ``difference`` — PSF-matched subtraction, DIA detection with the
   science's PSF model and trail masking, as the pipeline does them
   (:func:`~ppray.visit.steps.difference_imaging`): the trails found are in
   :attr:`DiffState.streaks`;
5. ``dia_photometry`` — the DIA sources' AB magnitudes from the zero point.

The DIA sources carry the pipeline's reliability score (column
``reliability``, also :attr:`DiffProducts.reliability`). A step is a
``(name, function)`` of :data:`STEPS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS

from ppray.config import DetectionConfig
from ppray.errors import PprayError
from ppray.fitsdiff.catalog import read_reference_catalog
from ppray.fitsdiff.headers import FitsInputError, ImageOptions
from ppray.fitsdiff.reader import ImageInput, read_image
from ppray.image import Exposure
from ppray.science.background import estimate_background, subtract_background
from ppray.science.cosmicrays import find_cosmic_rays, mask_cosmic_rays
from ppray.science.psf import PsfModel
from ppray.science.reliability import load_model
from ppray.science.streaks import StreakResult
from ppray.science.warp import warp_to
from ppray.skyregion import angular_separation_deg
from ppray.visit.steps import (
    Calibrated,
    Characterized,
    Differenced,
    StepTimer,
    calibrate,
    characterize,
    difference_imaging,
    with_calibration,
)

__all__ = [
    "STEPS",
    "DiffOptions",
    "DiffProducts",
    "DiffState",
    "PsfSummary",
    "Step",
    "dia_kinds",
    "difference_exposures",
    "difference_fits",
    "grid_offset_px",
    "template_coverage",
]

# A shared pixel grid: the WCSs put the same sky within this of every pixel.
_SAME_GRID_PX = 1e-3
# Points per side of the net on which the WCSs are compared.
_NET = 17
_MAG_PER_LN = 2.5 / math.log(10.0)


@dataclass(frozen=True)
class DiffOptions:
    """What :func:`difference_fits` does beyond the defaults.

    Attributes
    ----------
    science, template
        How to read each image (HDUs, and values overriding the header's). The
        science's gain, saturation, read noise and seeing also serve the template
        where neither its own options nor its header give one.
    threshold_sigma
        DIA detection threshold on the matched filter's ``|S/N|``.
    refcat
        Reference catalogue (Parquet, CSV or FITS) for astrometry and the zero
        point; ``None``: the image's own WCS and no zero point.
    refcat_ra, refcat_dec, refcat_mag
        Its column names (degrees; AB magnitudes in the images' band).
    detection
        Single-frame detection parameters; ``None``: the defaults with an
        aperture of 1.5 seeing FWHM (at least 3 px). Its ``dia_threshold_sigma``
        is not used (``threshold_sigma`` is).
    template_cosmic_rays
        Find and repair the template's cosmic rays (a single-epoch template has
        them; a coadd's are gone, and the search then costs a second or so per
        4k CCD for nothing).
    """

    science: ImageOptions = field(default_factory=ImageOptions)
    template: ImageOptions = field(default_factory=ImageOptions)
    threshold_sigma: float = 5.0
    refcat: str | Path | None = None
    refcat_ra: str = "ra"
    refcat_dec: str = "dec"
    refcat_mag: str = "mag"
    detection: DetectionConfig | None = None
    template_cosmic_rays: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold_sigma) and self.threshold_sigma > 0):
            raise ValueError(f"threshold_sigma must be > 0, not {self.threshold_sigma!r}")


@dataclass(frozen=True)
class PsfSummary:
    """The science PSF model at the image's centre."""

    fwhm_px: float
    fwhm_arcsec: float
    ellipticity: float
    n_stars: int
    order: int
    measured: bool
    reason: str = ""

    @classmethod
    def of(cls, psf: PsfModel, pixel_scale_arcsec: float) -> PsfSummary:
        return cls(
            psf.fwhm_px,
            psf.fwhm_px * pixel_scale_arcsec,
            psf.ellipticity,
            psf.n_stars,
            psf.order,
            psf.ok,
            psf.reason,
        )


@dataclass
class DiffState:
    """What the steps of one run share; each step fills in its part.

    A step reads the earlier steps' fields and sets its own; flags go to
    :attr:`flags`, numbers to :attr:`metrics`, and its time to :attr:`timer`.
    """

    science: ImageInput
    template: ImageInput
    options: DiffOptions
    refcat: pa.Table | None
    timer: StepTimer
    flags: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    char: Characterized | None = None
    cal: Calibrated | None = None
    sources: pa.Table | None = None
    template_on_grid: Exposure | None = None
    diff: Differenced | None = None
    dia_sources: pa.Table | None = None
    streaks: StreakResult | None = None  # the trails on the difference
    reliability: np.ndarray | None = None  # one score per DIA source (0-1)


Step = Callable[[DiffState], None]


@dataclass
class DiffProducts:
    """Everything :func:`difference_fits` made.

    Attributes
    ----------
    dia_sources
        DIA sources (:data:`~ppray.science.dia.DIA_SOURCE_SCHEMA` with ``ra``,
        ``dec`` from the science's final WCS, plus ``psfMag``, ``psfMagErr``:
        AB, NaN without a zero point or for non-positive fluxes).
    difference
        The difference exposure (electrons, the science's PSF unless the
        template was the broader), with the science's WCS.
    science, template
        The calibrated science exposure and the template on its grid, both
        background-subtracted (the cutouts come from them).
    sources
        The science's sources (as the pipeline's ``sources.parquet``).
    psf, psf_model
        The science PSF's summary and model.
    calibration
        The WCS and zero point, or why there are none.
    science_input, template_input
        What was read: the header values used and their sources.
    flags, notes, metrics, timings_s
        What degraded, what was assumed, the numbers, and each step's time.
    streaks
        The satellite and aircraft trails found on the difference (masked ``STREAK``
        there, each one trailed DIA source at most).
    reliability
        One score per DIA source (0-1; :mod:`ppray.science.reliability`), or
        ``None`` with ``detection.reliability`` off.
    """

    dia_sources: pa.Table
    difference: Exposure
    science: Exposure
    template: Exposure
    sources: pa.Table
    psf: PsfSummary
    psf_model: PsfModel
    calibration: Calibrated
    science_input: ImageInput
    template_input: ImageInput
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    streaks: StreakResult | None = None
    reliability: np.ndarray | None = None

    @property
    def template_flux_scale(self) -> float:
        """Science electrons per template electron, from the matching kernel (1 if unknown)."""
        scale = self.metrics.get("template_flux_scale", math.nan)
        return scale if math.isfinite(scale) and scale > 0 else 1.0

    @property
    def zero_point_mag(self) -> float | None:
        """AB magnitude of 1 e-/s, or ``None`` without a photometric calibration."""
        photometry = self.calibration.photometry
        return photometry.zero_point_mag if photometry is not None and photometry.ok else None


def _net(shape: tuple[int, int], n: int = _NET) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))
    return gx.ravel(), gy.ravel()


def _centre_radius(wcs: WCS, shape: tuple[int, int]) -> tuple[float, float, float]:
    """RA, Dec of the image centre and the largest distance (deg) to a corner."""
    ny, nx = shape
    ra, dec = wcs.all_pix2world(
        [(nx - 1) / 2, 0, nx - 1, nx - 1, 0], [(ny - 1) / 2, 0, 0, ny - 1, ny - 1], 0
    )
    radius = float(np.max(angular_separation_deg(ra[1:], dec[1:], ra[0], dec[0])))
    return float(ra[0]), float(dec[0]), radius


def _map(source_wcs: WCS, target_wcs: WCS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    ra, dec = target_wcs.all_pix2world(x, y, 0)
    with np.errstate(invalid="ignore"):
        sx, sy = source_wcs.all_world2pix(ra, dec, 0, quiet=True)
    return np.asarray(sx, dtype=np.float64), np.asarray(sy, dtype=np.float64)


def grid_offset_px(source_wcs: WCS, target_wcs: WCS, target_shape: tuple[int, int]) -> float:
    """Largest distance (px) between a target pixel and where ``source_wcs`` puts its sky.

    Over a net of the target's pixels; 0 for two WCSs of one pixel grid,
    however their headers write it (CD or PC and CDELT).
    """
    x, y = _net(target_shape)
    sx, sy = _map(source_wcs, target_wcs, x, y)
    offset = np.hypot(sx - x, sy - y)
    return float(np.max(offset)) if np.isfinite(offset).all() else math.inf


def template_coverage(
    template_wcs: WCS,
    template_shape: tuple[int, int],
    science_wcs: WCS,
    science_shape: tuple[int, int],
) -> float:
    """The fraction of the science image (on a net of its pixels) the template covers."""
    ra_s, dec_s, r_s = _centre_radius(science_wcs, science_shape)
    ra_t, dec_t, r_t = _centre_radius(template_wcs, template_shape)
    if float(angular_separation_deg(ra_s, dec_s, ra_t, dec_t)) > r_s + r_t:
        return 0.0  # far apart: a projection of the other side of the sky is not to be trusted
    x, y = _net(science_shape, 33)
    tx, ty = _map(template_wcs, science_wcs, x, y)
    ny, nx = template_shape
    inside = (tx >= -0.5) & (tx <= nx - 0.5) & (ty >= -0.5) & (ty <= ny - 0.5)
    return float(np.mean(inside))


def _no_overlap(science: ImageInput, template: ImageInput) -> FitsInputError:
    ra_s, dec_s, r_s = _centre_radius(science.exposure.wcs, science.exposure.shape)
    ra_t, dec_t, r_t = _centre_radius(template.exposure.wcs, template.exposure.shape)
    apart = float(angular_separation_deg(ra_s, dec_s, ra_t, dec_t))
    return FitsInputError(
        f"{science.label} and {template.label} do not overlap: the science is centred at "
        f"RA, Dec = {ra_s:.5f}, {dec_s:+.5f} (radius {r_s:.3f} deg), the template at "
        f"{ra_t:.5f}, {dec_t:+.5f} (radius {r_t:.3f} deg), {apart:.3f} deg apart; check the "
        "files and their WCS"
    )


def _detection_config(options: DiffOptions, seeing_px: float) -> DetectionConfig:
    if options.detection is not None:
        return options.detection
    # The default 6 px aperture is 1.5 FWHM of Rubin's 0.8" seeing at 0.2"/px; keep the
    # ratio for any camera, so the aperture corrections stay small.
    return DetectionConfig(aperture_radius_px=float(np.clip(1.5 * seeing_px, 3.0, 30.0)))


def _characterize(state: DiffState) -> None:
    state.char = characterize(
        state.science.exposure,
        state.detection,
        seeing_guess_px=state.science.seeing_px.value,
        timer=state.timer,
    )
    state.flags.extend(state.char.flags)
    state.metrics.update(state.char.metrics)


def _calibrate(state: DiffState) -> None:
    char = state.char
    assert char is not None and state.science.exposure.wcs is not None
    exptime = state.science.exptime_s.value
    cal = calibrate(
        char,
        state.refcat,
        state.science.exposure.wcs,
        exptime_s=exptime,
        band=str(state.science.exposure.metadata.get("FILTER", "")),
        timer=state.timer,
    )
    if state.refcat is None:
        cal = replace(cal, flags=["no_refcat: the image's own WCS, no zero point"])
    char.exposure.wcs = cal.wcs
    state.cal = cal
    state.sources = with_calibration(
        char.sources,
        cal,
        aperture_correction=char.aperture_correction,
        exptime_s=exptime,
        detector_id=0,
        exposure_id=0,
    )
    state.flags.extend(cal.flags)
    state.metrics.update(cal.metrics)


def _prepare_template(state: DiffState) -> None:
    """The template's background and cosmic rays on its own grid, then onto the science's."""
    template = state.template.exposure
    timer = state.timer
    with timer("template_background"):
        background, stats = estimate_background(
            template, box_size=state.detection.background_box_px
        )
        template = subtract_background(template, background)
    state.metrics["template_bg_rms"] = stats["bg_rms"]
    if state.options.template_cosmic_rays:
        with timer("template_cosmic_rays"):
            cr = find_cosmic_rays(
                template,
                psf_fwhm_px=state.template.seeing_px.value,
                niter=state.detection.cosmic_ray_niter,
            )
            template = mask_cosmic_rays(template, cr)
        state.metrics["template_n_cosmic_ray_px"] = float(np.count_nonzero(cr))
    calexp = state.char.exposure if state.char is not None else state.science.exposure
    assert calexp.wcs is not None and template.wcs is not None
    # Judged on the headers' WCSs: a fitted science WCS differs from the header's by the
    # fit's noise, and images on one grid must not be resampled for that.
    science_wcs = state.science.exposure.wcs
    assert science_wcs is not None
    same = template.shape == calexp.shape and (
        grid_offset_px(template.wcs, science_wcs, calexp.shape) < _SAME_GRID_PX
    )
    if same:
        template = replace(template, wcs=calexp.wcs)
    else:
        with timer("warp"):
            template = warp_to(template, calexp.wcs, calexp.shape)
    state.metrics["template_warped"] = 0.0 if same else 1.0
    state.template_on_grid = template


def _difference(state: DiffState) -> None:
    assert state.char is not None and state.template_on_grid is not None
    diff = difference_imaging(
        state.char.exposure,
        (state.template_on_grid,),
        state.options.threshold_sigma,
        background_box_px=state.detection.background_box_px,
        psf=state.char.psf,
        on_grid=True,
        streaks=state.detection.streaks,
        reliability=(
            load_model(state.detection.reliability_model) if state.detection.reliability else None
        ),
        timer=state.timer,
    )
    state.flags.extend(diff.flags)
    state.metrics.update(diff.metrics)
    ksum = diff.metrics.get("kernel_sum", math.nan)
    if math.isfinite(ksum) and ksum > 0:
        # Science units per template unit (exposure times, gains, transparency differ).
        convolved_science = diff.metrics.get("kernel_convolved_science", 0.0) > 0
        state.metrics["template_flux_scale"] = 1.0 / ksum if convolved_science else ksum
    if diff.difference is None or diff.dia_sources is None:
        raise PprayError(f"difference imaging failed: {'; '.join(diff.flags)}")
    state.diff = diff
    state.dia_sources = diff.dia_sources
    state.streaks = diff.streaks
    if "reliability" in diff.dia_sources.column_names:
        state.reliability = diff.dia_sources["reliability"].to_numpy(zero_copy_only=False)


def _dia_photometry(state: DiffState) -> None:
    """``psfMag``, ``psfMagErr`` (AB) of the DIA sources from the zero point."""
    table = state.dia_sources
    assert table is not None and state.cal is not None
    flux = table["psfFlux"].to_numpy(zero_copy_only=False)
    flux_err = table["psfFluxErr"].to_numpy(zero_copy_only=False)
    mag = np.full(flux.size, np.nan)
    mag_err = np.full(flux.size, np.nan)
    photometry = state.cal.photometry
    if photometry is not None and photometry.ok:
        positive = flux > 0
        exptime = state.science.exptime_s.value
        mag[positive] = photometry.zero_point_mag - 2.5 * np.log10(flux[positive] / exptime)
        mag_err[positive] = _MAG_PER_LN * flux_err[positive] / flux[positive]
    state.dia_sources = table.append_column("psfMag", pa.array(mag)).append_column(
        "psfMagErr", pa.array(mag_err)
    )


STEPS: tuple[tuple[str, Step], ...] = (
    ("characterize", _characterize),
    ("calibrate", _calibrate),
    ("template", _prepare_template),
    ("difference", _difference),
    ("dia_photometry", _dia_photometry),
)
"""The steps of :func:`difference_exposures`, in order, by name."""


def dia_kinds(dia_sources: pa.Table) -> np.ndarray:
    """Each DIA source's kind: ``"dipole"``, ``"trailed"``, ``"negative"`` or ``"positive"``."""
    kinds = np.full(dia_sources.num_rows, "positive", dtype=object)
    if dia_sources.num_rows == 0:
        return kinds
    for column, kind in (
        ("isNegative", "negative"),
        ("isTrailed", "trailed"),
        ("isDipole", "dipole"),
    ):
        kinds[dia_sources[column].to_numpy(zero_copy_only=False).astype(bool)] = kind
    return kinds


def difference_exposures(
    science: ImageInput,
    template: ImageInput,
    options: DiffOptions | None = None,
    *,
    refcat: pa.Table | None = None,
    steps: Sequence[tuple[str, Step]] = STEPS,
    timings_s: dict[str, float] | None = None,
) -> DiffProducts:
    """Run the steps on a science and a template image already read.

    Parameters
    ----------
    science, template
        From :func:`~ppray.fitsdiff.reader.read_image`.
    options
        Threshold, detection parameters, template cosmic rays (the reading
        options and ``refcat`` path are not used here).
    refcat
        Reference catalogue (``id``, ``ra``, ``dec``, ``mag``), e.g. from
        :func:`~ppray.fitsdiff.catalog.read_reference_catalog`; ``None``: none.
    steps
        The sequence run (:data:`STEPS`).
    timings_s
        Times already measured (reading), added to.

    Raises
    ------
    FitsInputError
        If the template does not cover any of the science.
    """
    options = options or DiffOptions()
    sci_wcs, tmp_wcs = science.exposure.wcs, template.exposure.wcs
    assert sci_wcs is not None and tmp_wcs is not None  # read_image insists on them
    coverage = template_coverage(tmp_wcs, template.exposure.shape, sci_wcs, science.exposure.shape)
    if coverage == 0.0:
        raise _no_overlap(science, template)
    timings = timings_s if timings_s is not None else {}
    state = DiffState(science, template, options, refcat, StepTimer(timings))
    state.detection = _detection_config(options, science.seeing_px.value)
    state.flags.extend([*science.flags, *template.flags])
    if coverage < 1.0:
        state.flags.append(
            f"template_partial: the template covers {100 * coverage:.0f}% of the science; "
            "no DIA elsewhere"
        )
    state.metrics.update(
        template_coverage=coverage,
        science_noise_ratio=science.noise_ratio,
        template_noise_ratio=template.noise_ratio,
    )
    for _name, step in steps:
        step(state)
    char, cal, diff = state.char, state.cal, state.diff
    assert char is not None and cal is not None and diff is not None
    assert diff.difference is not None and state.dia_sources is not None
    assert state.sources is not None and state.template_on_grid is not None
    psf = PsfSummary.of(char.psf, science.pixel_scale_arcsec)
    state.metrics["psf_fwhm_arcsec"] = psf.fwhm_arcsec
    return DiffProducts(
        dia_sources=state.dia_sources,
        difference=diff.difference,
        science=char.exposure,
        template=state.template_on_grid,
        sources=state.sources,
        psf=psf,
        psf_model=char.psf,
        calibration=cal,
        science_input=science,
        template_input=template,
        flags=state.flags,
        notes=[
            *(f"{science.label}: {n}" for n in science.notes),
            *(f"{template.label}: {n}" for n in template.notes),
        ],
        metrics=state.metrics,
        timings_s=timings,
        streaks=state.streaks,
        reliability=state.reliability,
    )


def difference_fits(
    science: str | Path,
    template: str | Path,
    options: DiffOptions | None = None,
) -> DiffProducts:
    """Subtract a template from a science image, both calibrated FITS with a WCS.

    Parameters
    ----------
    science, template
        The FITS files; any camera (see :mod:`ppray.fitsdiff.reader` for the
        header keywords read and the variance made without a variance plane).
    options
        HDUs, header overrides, the DIA threshold, the reference catalogue.

    Returns
    -------
    DiffProducts
        The DIA sources, the difference, the science sources, the PSF, the
        calibration, flags, metrics and each step's time.

    Raises
    ------
    FitsInputError
        Saying which file and HDU and what to pass: a missing file, HDU, WCS
        or gain; data that are not 2-D; planes of another shape; images that
        do not overlap; an unreadable reference catalogue.
    """
    options = options or DiffOptions()
    timings: dict[str, float] = {}
    timer = StepTimer(timings)
    with timer("read"):
        sci = read_image(science, options.science, role="science")
        tmp = read_image(template, options.template, role="template", defaults=options.science)
        refcat = None
        if options.refcat is not None:
            refcat = read_reference_catalog(
                options.refcat, ra=options.refcat_ra, dec=options.refcat_dec, mag=options.refcat_mag
            )
    return difference_exposures(sci, tmp, options, refcat=refcat, timings_s=timings)
