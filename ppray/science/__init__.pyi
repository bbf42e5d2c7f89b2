"""The public API of :mod:`ppray.science`, for type checkers and for the lazy loader
(:func:`lazy_loader.attach_stub` reads what to load, and from where, here)."""

from .astrometry import AstrometryResult, fit_astrometry, sky_residuals_arcsec
from .background import BACKGROUND_IGNORE, estimate_background, subtract_background
from .cosmicrays import find_cosmic_rays, mask_cosmic_rays
from .detection import (
    FLAG_BAD,
    FLAG_CENTROID,
    FLAG_EDGE,
    FLAG_SATURATED,
    SOURCE_SCHEMA,
    detect_sources,
)
from .dia import (
    DIA_SOURCE_SCHEMA,
    FLAG_NO_DATA,
    FLAG_SHAPE,
    SNR_SCALE_KEY,
    detect_dia_sources,
    psf_snr_image,
    snr_noise_scale,
)
from .isr import OVERSCAN_SKIP_COLUMNS, overscan_levels, run_isr
from .photometry import PhotoCalibResult, fit_zero_point
from .psf import (
    PsfLike,
    PsfModel,
    PsfShape,
    adaptive_moments,
    as_psf_model,
    gaussian_psf_image,
    normalized_psf_image,
    pixel_gaussian,
    poly_terms,
    poly_values,
    shift_images,
)
from .psfmeasure import PSF_UNUSABLE_BITS, cut_stamps, measure_psf
from .psfphot import ApertureCorrection, GroupFit, aperture_corrections, fit_psf_fluxes, psf_flux
from .reliability import (
    DEFAULT_MODEL,
    FEATURES,
    RELIABILITY_COLUMN,
    ReliabilityModel,
    load_model,
    reliability_features,
    score_dia_sources,
)
from .stats import FWHM_PER_SIGMA, MAD_TO_SIGMA, robust_sigma
from .streaks import (
    STREAK_UNTRUSTED,
    Streak,
    StreakResult,
    TrailedRows,
    find_streaks,
    replace_streak_fragments,
    streak_dia_rows,
)
from .subtraction import SubtractionResult, subtract_images
from .warp import PixelMap, warp_templates, warp_to

__all__ = [
    "BACKGROUND_IGNORE",
    "DEFAULT_MODEL",
    "DIA_SOURCE_SCHEMA",
    "FEATURES",
    "FLAG_BAD",
    "FLAG_CENTROID",
    "FLAG_EDGE",
    "FLAG_NO_DATA",
    "FLAG_SATURATED",
    "FLAG_SHAPE",
    "FWHM_PER_SIGMA",
    "MAD_TO_SIGMA",
    "OVERSCAN_SKIP_COLUMNS",
    "PSF_UNUSABLE_BITS",
    "RELIABILITY_COLUMN",
    "SNR_SCALE_KEY",
    "SOURCE_SCHEMA",
    "STREAK_UNTRUSTED",
    "ApertureCorrection",
    "AstrometryResult",
    "GroupFit",
    "PhotoCalibResult",
    "PixelMap",
    "PsfLike",
    "PsfModel",
    "PsfShape",
    "ReliabilityModel",
    "Streak",
    "StreakResult",
    "SubtractionResult",
    "TrailedRows",
    "adaptive_moments",
    "aperture_corrections",
    "as_psf_model",
    "cut_stamps",
    "detect_dia_sources",
    "detect_sources",
    "estimate_background",
    "find_cosmic_rays",
    "find_streaks",
    "fit_astrometry",
    "fit_psf_fluxes",
    "fit_zero_point",
    "gaussian_psf_image",
    "load_model",
    "mask_cosmic_rays",
    "measure_psf",
    "normalized_psf_image",
    "overscan_levels",
    "pixel_gaussian",
    "poly_terms",
    "poly_values",
    "psf_flux",
    "psf_snr_image",
    "reliability_features",
    "replace_streak_fragments",
    "robust_sigma",
    "run_isr",
    "score_dia_sources",
    "shift_images",
    "sky_residuals_arcsec",
    "snr_noise_scale",
    "streak_dia_rows",
    "subtract_background",
    "subtract_images",
    "warp_templates",
    "warp_to",
]
