"""The public API of :mod:`ppray.fitsdiff`, for type checkers and for the lazy loader
(:func:`lazy_loader.attach_stub` reads what to load, and from where, here)."""

from .catalog import read_reference_catalog
from .headers import (
    EXPTIME_KEYS,
    GAIN_KEYS,
    READ_NOISE_KEYS,
    SATURATION_KEYS,
    SEEING_KEYS,
    FitsInputError,
    ImageOptions,
    Resolved,
    estimate_fwhm_px,
)
from .outputs import format_summary, summary_dict, write_products
from .pipeline import (
    STEPS,
    DiffOptions,
    DiffProducts,
    DiffState,
    PsfSummary,
    Step,
    dia_kinds,
    difference_exposures,
    difference_fits,
    grid_offset_px,
    template_coverage,
)
from .plot import KIND_STYLES, diagnostic_figure, write_diagnostic_png
from .reader import ImageInput, read_image

__all__ = [
    "EXPTIME_KEYS",
    "GAIN_KEYS",
    "KIND_STYLES",
    "READ_NOISE_KEYS",
    "SATURATION_KEYS",
    "SEEING_KEYS",
    "STEPS",
    "DiffOptions",
    "DiffProducts",
    "DiffState",
    "FitsInputError",
    "ImageInput",
    "ImageOptions",
    "PsfSummary",
    "Resolved",
    "Step",
    "dia_kinds",
    "diagnostic_figure",
    "difference_exposures",
    "difference_fits",
    "estimate_fwhm_px",
    "format_summary",
    "grid_offset_px",
    "read_image",
    "read_reference_catalog",
    "summary_dict",
    "template_coverage",
    "write_diagnostic_png",
    "write_products",
]
