"""Master calibrations from calibration exposures: combine, find defects, normalise flats.

Pure, stateless science (no Ray): :mod:`.prepare` runs ISR on the inputs,
:mod:`.combine` combines them in bounded memory, :mod:`.defects` finds defects, :mod:`.flatnorm`
normalises flats over the focal plane and :mod:`.quality` measures the products.
:mod:`.registry` certifies products with their validity (time range, band) into
the calibration store; :mod:`.resolve` picks, per visit, the products valid at
its time and band (falling back to the legacy ``calib.fits``).
:mod:`.sequence` is one detector's calibration sequence (inputs fed as they
arrive, products certified) and :mod:`.results` what it sends to the gather.
"""

from ppray.calib.prepare import CalibKind, InputPreparer, PreparedInput, input_preparer
from ppray.calib.registry import (
    CALIB_KINDS,
    CalibError,
    CalibKindName,
    CalibRecord,
    CalibRegistry,
    decode_product,
    encode_product,
)
from ppray.calib.resolve import LEGACY_CALIB_ID, CalibResolver, ResolvedCalibs, build_calibrations

__all__: list[str] = [
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
