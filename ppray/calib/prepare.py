"""Prepare calibration exposures for combination: ISR with only what each kind needs.

:func:`ppray.science.isr.run_isr` does the overscan, trim, assembly and gain
for every input, with calibrations that subtract only what the kind calls for:
nothing for a bias, the master bias for a dark (then divided by its dark time,
giving e-/s), master bias and dark for a flat (then divided by its own median,
so flats of different lamp levels combine; the mean of those medians is kept
as the flat's level for focal-plane normalisation, :mod:`ppray.calib.flatnorm`).
The prepared inputs go to :class:`ppray.calib.combine.StreamingCombiner`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from ppray.errors import NonRetriableError
from ppray.image import Calibrations, Exposure, MaskBit, RawExposure
from ppray.instrument import Detector, Instrument
from ppray.science.isr import run_isr

__all__ = [
    "REJECT_BITS",
    "CalibKind",
    "InputPreparer",
    "PreparedInput",
    "input_preparer",
]

# Mask bits of a prepared input that keep a pixel out of the combination.
REJECT_BITS = MaskBit.SAT | MaskBit.NO_DATA


class CalibKind(enum.StrEnum):
    """The kinds of calibration exposure."""

    BIAS = "bias"
    DARK = "dark"
    FLAT = "flat"


def _finite_median(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(np.median(v)) if v.size else math.nan


@dataclass(frozen=True)
class PreparedInput:
    """One input ready to combine.

    Attributes
    ----------
    exposure
        ISR-processed (e-), then divided by ``scale``.
    scale
        What it was divided by: 1 (bias), the dark time in s (dark), its
        median in e- (flat).
    """

    exposure: Exposure
    scale: float


@dataclass(frozen=True)
class InputPreparer:
    """ISR for the inputs of one kind of calibration of one detector.

    Build with :func:`input_preparer`; ``calibs`` holds what ISR subtracts
    (the masters so far, a flat of 1, no defects) and is made once for all
    the inputs.
    """

    kind: CalibKind
    instrument: Instrument
    detector: Detector
    calibs: Calibrations = field(repr=False)

    def prepare(self, raw: RawExposure) -> PreparedInput:
        """Overscan, assemble, gain, subtract the masters and scale one raw.

        Raises
        ------
        NonRetriableError
            For a dark without a positive dark time, a flat without a
            positive median, or a raw that does not match the detector.
        """
        exp = run_isr(raw, self.calibs, self.instrument, self.detector)
        scale = 1.0
        if self.kind is CalibKind.DARK:
            scale = raw.darktime_s
            if not scale > 0:
                raise NonRetriableError(f"dark of {self.detector.name}: DARKTIME {scale!r} <= 0")
        elif self.kind is CalibKind.FLAT:
            good = (exp.mask & np.uint32(REJECT_BITS)) == 0
            scale = _finite_median(exp.image[good])
            if not scale > 0:
                raise NonRetriableError(f"flat of {self.detector.name}: median {scale!r} <= 0")
        if scale != 1.0:
            exp.image *= np.float32(1.0 / scale)
            exp.variance *= np.float32(1.0 / scale**2)
        exp.metadata["CALSCALE"] = scale
        return PreparedInput(exposure=exp, scale=scale)


def input_preparer(
    kind: CalibKind | str,
    instrument: Instrument,
    detector: Detector,
    *,
    bias: np.ndarray | None = None,
    dark: np.ndarray | None = None,
) -> InputPreparer:
    """The ISR of one kind of calibration input.

    Parameters
    ----------
    kind
        ``"bias"`` (overscan only), ``"dark"`` (and the master ``bias``, then
        per second of dark time) or ``"flat"`` (and ``bias`` and ``dark``
        (e-/s), then normalised by its median).
    instrument, detector
        The camera and the detector.
    bias, dark
        Masters, assembled, in e- and e-/s; required by the kinds that use them.

    Raises
    ------
    ValueError
        When a master the kind needs is missing or has the wrong shape.
    """
    kind = CalibKind(kind)
    shape = (instrument.layout.ny, instrument.layout.nx)
    if kind is not CalibKind.BIAS and bias is None:
        raise ValueError(f"{kind} inputs need the master bias")
    if kind is CalibKind.FLAT and dark is None:
        raise ValueError("flat inputs need the master dark")
    zeros = np.zeros(shape, dtype=np.float32)
    planes = []
    for name, plane in (("bias", bias), ("dark", dark)):
        if plane is None or (kind is CalibKind.DARK and name == "dark"):
            planes.append(zeros)
            continue
        plane = np.asarray(plane, dtype=np.float32)
        if plane.shape != shape:
            raise ValueError(f"master {name} shape {plane.shape} != detector shape {shape}")
        # A master's no-data pixels (NaN) would make every input NO_DATA there.
        planes.append(np.nan_to_num(plane, nan=0.0, posinf=0.0, neginf=0.0))
    calibs = Calibrations(
        bias=planes[0],
        dark=planes[1],
        flat=np.ones(shape, dtype=np.float32),
        defects=np.zeros(shape, dtype=bool),
        metadata={"CALIBSRC": f"ppray.calib {kind} inputs"},
    )
    return InputPreparer(kind=kind, instrument=instrument, detector=detector, calibs=calibs)
