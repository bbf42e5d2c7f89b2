"""Which calibrations a visit uses: certified products valid at its time, else the legacy file.

A :class:`CalibResolver` belongs to one detector. For each visit it looks up
the bias, dark, flat (of the visit's band) and defects valid at the visit's
start time; a kind with no certified product falls back to the plane of the
legacy ``calib.fits``. When the selection differs from the one in use it
builds a *new* :class:`~ppray.image.Calibrations` (reusing planes that did not
change, reading only those that did) and makes it current; a
:class:`~ppray.image.Calibrations` already handed to a visit is never changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ppray.calib.registry import CALIB_KINDS, CalibKindName, CalibRecord, CalibRegistry, select
from ppray.errors import NonRetriableError
from ppray.image import Calibrations

__all__ = ["LEGACY_CALIB_ID", "CalibResolver", "ResolvedCalibs", "build_calibrations"]

log = logging.getLogger(__name__)

LEGACY_CALIB_ID = "legacy"
"""The calib id reported for a plane taken from the legacy ``calib.fits``."""


@dataclass(frozen=True)
class ResolvedCalibs:
    """A detector's calibrations for a visit and where each plane came from.

    Attributes
    ----------
    calibs
        The planes; never changed once made (build a new one instead).
    calib_ids
        ``kind -> calib_id`` for each of bias, dark, flat and defects, or
        :data:`LEGACY_CALIB_ID` for a plane from the legacy file.
    """

    calibs: Calibrations
    calib_ids: Mapping[str, str]


def build_calibrations(
    planes: Mapping[CalibKindName, np.ndarray], calib_ids: Mapping[str, str]
) -> Calibrations:
    """A new :class:`~ppray.image.Calibrations` of the four planes, with their ids in
    ``metadata["calib_ids"]``.

    Raises
    ------
    NonRetriableError
        If a plane is missing or the planes differ in shape.
    """
    missing = [k for k in CALIB_KINDS if k not in planes]
    if missing:
        raise NonRetriableError(f"no {', '.join(missing)} calibration")
    shapes = {k: planes[k].shape for k in CALIB_KINDS}
    if len(set(shapes.values())) != 1:
        raise NonRetriableError(f"calibration planes differ in shape: {shapes}")
    return Calibrations(
        bias=planes["bias"],
        dark=planes["dark"],
        flat=planes["flat"],
        defects=planes["defects"],
        metadata={"calib_ids": dict(calib_ids)},
    )


def _legacy_planes(legacy: Calibrations) -> dict[CalibKindName, np.ndarray]:
    return {
        "bias": legacy.bias,
        "dark": legacy.dark,
        "flat": legacy.flat,
        "defects": legacy.defects,
    }


class CalibResolver:
    """One detector's calibrations, resolved per visit and swapped when certifications change.

    Parameters
    ----------
    registry
        The instrument's certified calibrations.
    detector
        Detector name.
    shape
        ``(ny, nx)`` of the detector's images; every product must have it.
    legacy
        The planes of the legacy ``calib.fits`` (fallback for each kind that has
        no certified product), or None if there is no such file.

    Notes
    -----
    The registry's records are re-read only when its :meth:`~CalibRegistry.version`
    for this detector changes (one listing per visit); selecting by time and band
    is done in memory on every visit, so a validity range that starts or ends
    between two visits takes effect without a new certification. Thread-safe:
    two visits prepared at once build at most one new set; a visit being
    processed keeps the :class:`ResolvedCalibs` it was given.
    """

    def __init__(
        self,
        registry: CalibRegistry,
        detector: str,
        shape: tuple[int, int],
        legacy: Calibrations | None,
    ) -> None:
        if legacy is not None and legacy.shape != tuple(shape):
            raise NonRetriableError(
                f"legacy calibrations of {detector} have shape {legacy.shape}, expected {shape}"
            )
        self.registry = registry
        self.detector = detector
        self.shape = (int(shape[0]), int(shape[1]))
        self.legacy = legacy
        self._lock = threading.Lock()
        self._version: str | None = None
        self._records: list[CalibRecord] = []
        self._current: ResolvedCalibs | None = None
        if legacy is not None:
            ids: dict[str, str] = dict.fromkeys(CALIB_KINDS, LEGACY_CALIB_ID)
            self._current = ResolvedCalibs(legacy, ids)

    @property
    def current(self) -> ResolvedCalibs | None:
        """The set handed to the latest visit (the legacy set before any visit)."""
        return self._current

    def refresh(self) -> bool:
        """Re-read this detector's records if anything was certified; True if so."""
        version = self.registry.version(self.detector)
        if version == self._version:
            return False
        self._records = self.registry.records(detector=self.detector)
        self._version = version
        return True

    def select(self, band: str | None, when: float) -> dict[CalibKindName, CalibRecord | None]:
        """For each kind, the certified record valid at ``when`` (flats: for ``band``), or None."""
        return {kind: select(self._records, kind, band, when) for kind in CALIB_KINDS}

    def for_visit(self, band: str | None, when: float) -> ResolvedCalibs:
        """The calibrations for a visit in ``band`` starting at ``when`` (unix seconds).

        Returns the current set if nothing changed, else a new one that becomes
        current. Planes whose id is unchanged are shared with the current set;
        only changed products are read.

        Raises
        ------
        NonRetriableError
            If a kind has neither a certified product nor a legacy plane, or a
            product is corrupt or of the wrong shape.
        RetriableError
            If a product file is missing (still landing).
        """
        with self._lock:
            self.refresh()
            chosen = self.select(band, when)
            ids: dict[str, str] = {
                kind: rec.calib_id if rec is not None else LEGACY_CALIB_ID
                for kind, rec in chosen.items()
            }
            current = self._current
            if current is not None and dict(current.calib_ids) == ids:
                return current
            planes = self._planes(chosen, current)
            calibs = build_calibrations(planes, ids)
            # Derived planes now, in the preparing thread, not in the first visit's ISR.
            _ = calibs.inverse_flat, calibs.defect_mask, calibs.all_finite
            resolved = self._current = ResolvedCalibs(calibs, ids)
            log.info("detector %s: calibrations now %s", self.detector, ids)
            return resolved

    def _planes(
        self,
        chosen: Mapping[CalibKindName, CalibRecord | None],
        current: ResolvedCalibs | None,
    ) -> dict[CalibKindName, np.ndarray]:
        have = _legacy_planes(current.calibs) if current is not None else {}
        legacy = _legacy_planes(self.legacy) if self.legacy is not None else {}
        planes: dict[CalibKindName, np.ndarray] = {}
        for kind, record in chosen.items():
            if record is None:
                if kind not in legacy:
                    raise NonRetriableError(
                        f"detector {self.detector}: no {kind} certified for this visit "
                        "and no legacy calib.fits"
                    )
                planes[kind] = legacy[kind]
            elif current is not None and current.calib_ids.get(kind) == record.calib_id:
                planes[kind] = have[kind]
            else:
                planes[kind] = self.registry.read(record, self.shape)
        return planes
