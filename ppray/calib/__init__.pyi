"""The public API of :mod:`ppray.calib`, for type checkers and for the lazy loader
(:func:`lazy_loader.attach_stub` reads what to load, and from where, here)."""

from .prepare import CalibKind, InputPreparer, PreparedInput, input_preparer
from .registry import (
    CALIB_KINDS,
    CalibError,
    CalibKindName,
    CalibRecord,
    CalibRegistry,
    decode_product,
    encode_product,
)
from .resolve import LEGACY_CALIB_ID, CalibResolver, ResolvedCalibs, build_calibrations

__all__ = [
    "CALIB_KINDS",
    "LEGACY_CALIB_ID",
    "CalibError",
    "CalibKind",
    "CalibKindName",
    "CalibRecord",
    "CalibRegistry",
    "CalibResolver",
    "InputPreparer",
    "PreparedInput",
    "ResolvedCalibs",
    "build_calibrations",
    "decode_product",
    "encode_product",
    "input_preparer",
]
