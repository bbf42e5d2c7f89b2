"""``DetectorWorker``: one long-lived actor per detector, calibrations resident."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ppray.calib.results import CalibResult
from ppray.config import DeploymentConfig
from ppray.errors import PprayError, RetriableError
from ppray.image import Calibrations
from ppray.kafka.sinks import make_alert_sink
from ppray.messages import DetectorResult, NextVisit, RawArrival, VisitKey
from ppray.visit.processor import DetectorProcessor, PreparedVisit
from ppray.visit.slots import Deadline, OnceCache, PrepareFailed, SlotTimedOut, VisitSlots

from .apdb import RayAssociation
from .calib_worker import CalibSequences
from .metrics import WorkerMetrics

__all__ = ["DetectorWorker"]

log = logging.getLogger(__name__)

# Finished results kept for a repeated ``result`` call (each holds its source tables).
_KEPT_RESULTS = 4


class DetectorWorker:
    """Async actor: ``prepare`` on next_visit, ``raw_arrived`` per raw, ``result`` to await.

    Calibrations are loaded in ``__init__`` (so again after a restart); if they
    are not there yet, loading is retried on each ``prepare``. Each ``prepare``
    also picks the certified calibrations valid for the visit and swaps them in
    if they changed (:meth:`~ppray.visit.processor.DetectorProcessor.resolve_calibrations`);
    a visit keeps the set it was prepared with.

    Calibration sequences (a ``next_visit`` whose ``survey`` is one of
    ``calibration.surveys``) take the same ``prepare``/``raw_arrived``/``result``
    calls and are handed to :class:`~ppray.actors.calib_worker.CalibSequences`;
    a flat's second step is :meth:`certify_flat`.
    """

    def __init__(self, config: DeploymentConfig, detector: str) -> None:
        config.s3.configure()  # how s3:// roots are reached, in this process
        self.config = config
        self.detector = detector
        self.proc: DetectorProcessor | None = None
        self.load_error = ""
        self.load_s = 0.0
        self._slots: VisitSlots[PreparedVisit] = VisitSlots(config.remembered_visits)
        self.metrics = WorkerMetrics(config.namespace, detector)
        self._busy: asyncio.Semaphore | None = None
        self._processing = 0
        # One computation per visit, whoever asks: a restarted coordinator asks again.
        self._results: OnceCache[VisitKey, DetectorResult] = OnceCache(_KEPT_RESULTS)
        self.calib = CalibSequences(
            config, detector, self.metrics, self._semaphore, self._legacy_calibs
        )
        self._load()

    def _semaphore(self) -> asyncio.Semaphore:
        """One computation at a time on this detector (made in the event loop)."""
        if self._busy is None:
            self._busy = asyncio.Semaphore(1)
        return self._busy

    def _legacy_calibs(self) -> Calibrations | None:
        """The legacy ``calib.fits`` planes, for calibration inputs nothing certified."""
        if self.proc is None:
            return None
        return self.proc.resolver.legacy if self.proc.resolver is not None else self.proc.calibs

    def _adopt(self, key: VisitKey) -> list[RawArrival]:
        """Raws of a calibration sequence that came before it was known as one."""
        raws = self._slots.take_raws(key)
        self.metrics.set_queue_depth(len(self._slots))
        return raws

    def _load(self) -> None:
        start = time.perf_counter()
        try:
            # The sink is made here, in the worker's own process: a producer is never pickled.
            self.proc = DetectorProcessor.load(
                self.config, self.detector, alert_sink=make_alert_sink(self.config)
            )
            self.load_error = ""
        except RetriableError as exc:
            # Nothing in the store yet (a new camera before its first afternoon): normal
            # for calibration sequences, which need no science calibrations.
            self.load_error = f"calibrations not loaded: {exc}"
            log.warning(
                "detector %s: %s; science visits fail until calibrations are there "
                "(legacy calib.fits or certified), calibration sequences run",
                self.detector,
                self.load_error,
            )
        except PprayError as exc:
            self.load_error = f"calibrations not loaded: {exc}"
            log.error("detector %s: %s", self.detector, self.load_error)
        self._attach_apdb()
        self.load_s = time.perf_counter() - start

    def _attach_apdb(self) -> None:
        """Reach the APDB shard actors (they are deployed before the workers)."""
        if self.proc is None or self.proc.association is not None:
            return
        if not self.config.apdb.enabled:
            return
        try:
            self.proc.association = RayAssociation(self.config)
        except ValueError as exc:  # not there (yet): prepare tries again
            log.warning("detector %s: APDB shards not found: %s", self.detector, exc)

    async def ready(self) -> dict[str, object]:
        """Health and load status."""
        return {
            "detector": self.detector,
            "loaded": self.proc is not None,
            "error": self.load_error,
            "load_s": self.load_s,
            "visits": len(self._slots),
            "processing": self._processing,
            "pid": os.getpid(),
            # Calibrations in use (those of the latest prepared visit), kind -> calib_id.
            "calib_ids": self.proc.calib_ids if self.proc is not None else {},
            "calibration": self.calib.status(),
        }

    async def prepare(self, visit: NextVisit) -> float:
        """Preload everything the visit needs; returns the preload time in seconds."""
        if self.calib.kind_of(visit) is not None:
            return await self.calib.prepare(visit, self._adopt(visit.key))
        if self._slots.is_finished(visit.key):  # a restarted coordinator's late prepare
            return 0.0
        self._slots.open(visit.key)
        self.metrics.set_queue_depth(len(self._slots))
        if self.proc is None:
            await asyncio.to_thread(self._load)
        self._attach_apdb()
        proc = self.proc
        if proc is None:
            self._slots.set_failed(visit.key, self.load_error)
            return 0.0
        prepared = await asyncio.to_thread(proc.prepare, visit)
        self.metrics.preload(prepared.prepare_s)
        self._slots.set_prepared(visit.key, prepared)
        return prepared.prepare_s

    async def raw_arrived(self, raw: RawArrival) -> None:
        """A raw for this detector landed (possibly before ``prepare``)."""
        if self.calib.owns(raw.key):
            self.calib.raw_arrived(raw)
            return
        if not self._slots.add_raw(raw):
            log.warning("detector %s: raw for finished visit %s ignored", self.detector, raw.key)
        self.metrics.set_queue_depth(len(self._slots))

    async def result(self, visit: NextVisit) -> DetectorResult | CalibResult:
        """Wait for the visit's raws, process them, and return the result.

        Gives up ``2 * duration + image_timeout_s`` after the first call, with a
        ``timed_out`` result. Idempotent: a second call for the same visit (from a
        coordinator that restarted) awaits the same computation, or returns its result
        if it is one of the last few finished here. A calibration sequence returns a
        :class:`~ppray.calib.results.CalibResult`.
        """
        if self.calib.kind_of(visit) is not None:
            return await self.calib.result(visit, self._adopt(visit.key))
        return await self._results.run(visit.key, lambda: self._measured(visit))

    async def certify_flat(self, visit: NextVisit, factor: float) -> CalibResult:
        """A flat sequence's second step: take the focal-plane ``factor``, certify."""
        return await self.calib.certify_flat(visit, factor)

    async def _measured(self, visit: NextVisit) -> DetectorResult:
        result = await self._result(visit)
        self.metrics.result(result)
        return result

    async def _result(self, visit: NextVisit) -> DetectorResult:
        key = visit.key
        deadline = Deadline.after(visit.timeout_s(self.config.image_timeout_s))
        try:
            outcome = await self._slots.wait(key, max(visit.nimages, 1), deadline)
            if isinstance(outcome, PrepareFailed):
                return self._failed(visit, outcome.reason)
            if isinstance(outcome, SlotTimedOut):
                if outcome.prepared is not None and self.proc is not None:
                    return self.proc.timed_out(outcome.prepared, outcome.got, outcome.expected)
                return self._failed(visit, "timed out before prepare finished", "timed_out")
            assert self.proc is not None  # prepared implies loaded
            # One visit at a time per detector: pipelined visits queue here, not in memory.
            async with self._semaphore():
                self._processing += 1
                try:
                    return await asyncio.to_thread(
                        self.proc.process, outcome.prepared, list(outcome.raws)
                    )
                finally:
                    self._processing -= 1
        finally:
            self._slots.finish(key)
            self.metrics.set_queue_depth(len(self._slots))

    def _failed(self, visit: NextVisit, reason: str, status: str = "failed") -> DetectorResult:
        det_id = self.proc.detector.id if self.proc is not None else -1
        return DetectorResult(
            instrument=visit.instrument,
            group_id=visit.groupId,
            detector=self.detector,
            detector_id=det_id,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            retriable=True,
        )
