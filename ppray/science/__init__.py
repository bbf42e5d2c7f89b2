"""Science steps: stateless functions on images and catalogs.

The public API of every module is importable from here (``from ppray.science
import measure_psf``); the modules stay importable on their own.
"""

from ppray.science.astrometry import AstrometryResult, fit_astrometry, sky_residuals_arcsec
from ppray.science.background import BACKGROUND_IGNORE, estimate_background, subtract_background
from ppray.science.cosmicrays import find_cosmic_rays, mask_cosmic_rays
from ppray.science.detection import (
    FLAG_BAD,
    FLAG_CENTROID,
    FLAG_EDGE,
    FLAG_SATURATED,
    SOURCE_SCHEMA,
    detect_sources,
)
from ppray.science.dia import (
    DIA_SOURCE_SCHEMA,
    FLAG_NO_DATA,
    FLAG_SHAPE,
    SNR_SCALE_KEY,
    detect_dia_sources,
    psf_snr_image,
    snr_noise_scale,
)
from ppray.science.isr import OVERSCAN_SKIP_COLUMNS, overscan_levels, run_isr
from ppray.science.photometry import PhotoCalibResult, fit_zero_point
from ppray.science.psf import (
    PsfModel,
    aperture_correction,
    gaussian_psf_image,
    measure_psf,
    normalized_psf_image,
    pixel_gaussian,
    psf_flux,
)
from ppray.science.stats import FWHM_PER_SIGMA, MAD_TO_SIGMA, robust_sigma
from ppray.science.subtraction import SubtractionResult, subtract_images
from ppray.science.warp import PixelMap, warp_templates, warp_to

__all__ = [
    "BACKGROUND_IGNORE",
    "DIA_SOURCE_SCHEMA",
    "FLAG_BAD",
    "FLAG_CENTROID",
    "FLAG_EDGE",
    "FLAG_NO_DATA",
    "FLAG_SATURATED",
    "FLAG_SHAPE",
    "FWHM_PER_SIGMA",
    "MAD_TO_SIGMA",
    "OVERSCAN_SKIP_COLUMNS",
    "SNR_SCALE_KEY",
    "SOURCE_SCHEMA",
    "AstrometryResult",
    "PhotoCalibResult",
    "PixelMap",
    "PsfModel",
    "SubtractionResult",
    "aperture_correction",
    "detect_dia_sources",
    "detect_sources",
    "estimate_background",
    "find_cosmic_rays",
    "fit_astrometry",
    "fit_zero_point",
    "gaussian_psf_image",
    "mask_cosmic_rays",
    "measure_psf",
    "normalized_psf_image",
    "overscan_levels",
    "pixel_gaussian",
    "psf_flux",
    "psf_snr_image",
    "robust_sigma",
    "run_isr",
    "sky_residuals_arcsec",
    "snr_noise_scale",
    "subtract_background",
    "subtract_images",
    "warp_templates",
    "warp_to",
]
