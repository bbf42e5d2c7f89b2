"""The hot path of one visit, without Ray, in call order.

1. :mod:`.coordinator` — :class:`CoordinatorState` decides: dedup a
   ``next_visit``, broadcast ``prepare``, route each raw to its detector,
   queue visits beyond the in-flight bound, decide detector retries.
2. :mod:`.slots` — one detector's visits as they come: a raw may land before
   or after ``prepare``; a result is computed once per visit, whoever asks,
   with a deadline.
3. :mod:`.processor` — :class:`DetectorProcessor`: ``prepare`` from
   ``next_visit`` alone, ``process`` on the raws.
4. :mod:`.steps` — the science of ``process``: characterize, calibrate,
   difference imaging.
5. :mod:`.alert_production` — association, forced photometry, alerts and
   APDB rows of one detector.
6. :mod:`.aggregate` — the visit summary from the detectors' results.

The Ray actors in ``ppray.actors`` only wrap these.
"""

from ppray.visit.aggregate import summarize_visit
from ppray.visit.alert_production import AlertOptions, AlertProduction, produce_alerts
from ppray.visit.coordinator import CoordinatorState, Decision, PrepareVisit, RouteRaw, VisitState
from ppray.visit.processor import DetectorProcessor, PreparedVisit, combine_snaps
from ppray.visit.steps import (
    Calibrated,
    Characterized,
    Differenced,
    StepTimer,
    calibrate,
    characterize,
    difference_imaging,
    with_calibration,
    with_ids,
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
]
