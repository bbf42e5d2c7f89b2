"""The public API of :mod:`ppray.visit`, for type checkers and for the lazy loader
(:func:`lazy_loader.attach_stub` reads what to load, and from where, here)."""

from .aggregate import summarize_visit
from .alert_production import AlertOptions, AlertProduction, produce_alerts
from .coordinator import CoordinatorState, Decision, PrepareVisit, RouteRaw, VisitState
from .processor import DetectorProcessor, PreparedVisit, combine_snaps
from .steps import (
    Calibrated,
    Characterized,
    Differenced,
    StepTimer,
    calibrate,
    characterize,
    difference_imaging,
    with_calibration,
    with_ids,
    with_psf_fluxes,
)

__all__ = [
    "AlertOptions",
    "AlertProduction",
    "Calibrated",
    "Characterized",
    "CoordinatorState",
    "Decision",
    "DetectorProcessor",
    "Differenced",
    "PrepareVisit",
    "PreparedVisit",
    "RouteRaw",
    "StepTimer",
    "VisitState",
    "calibrate",
    "characterize",
    "combine_snaps",
    "difference_imaging",
    "produce_alerts",
    "summarize_visit",
    "with_calibration",
    "with_ids",
    "with_psf_fluxes",
]
