"""``DetectorWorker``: one long-lived actor per detector, calibrations resident."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ppray.calib.results import CalibResult
from ppray.config import DeploymentConfig
from ppray.errors import PprayError, RetriableError
from ppray.image import Calibrations
from ppray.kafka.sinks import make_alert_sink
from ppray.messages import DetectorResult, NextVisit, RawArrival, VisitKey
from ppray.visit.processor import DetectorProcessor, PreparedVisit

from .apdb import RayAssociation
from .calib_worker import CalibSequences
from .metrics import WorkerMetrics

__all__ = ["DetectorWorker"]

log = logging.getLogger(__name__)

# Finished results kept for a repeated ``result`` call (each holds its source tables).
_KEPT_RESULTS = 4


@dataclass
class _Slot:
    """One visit on this detector: its preload, and the raws as they arrive."""

    created: float = field(default_factory=time.monotonic)
    prepared: asyncio.Future[PreparedVisit] | None = None
    raws: dict[int, RawArrival] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


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
        self.config = config
        self.detector = detector
        self.proc: DetectorProcessor | None = None
        self.load_error = ""
        self.load_s = 0.0
        self._slots: dict[VisitKey, _Slot] = {}
        self.metrics = WorkerMetrics(config.namespace, detector)
        self._busy: asyncio.Semaphore | None = None
        self._processing = 0
        # One computation per visit, whoever asks: a restarted coordinator asks again.
        self._results: OrderedDict[VisitKey, asyncio.Task[DetectorResult]] = OrderedDict()
        # Raws that straggle in after their visit finished must not open a new slot.
        self._finished: OrderedDict[VisitKey, None] = OrderedDict()
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
        slot = self._slots.pop(key, None)
        self.metrics.set_queue_depth(len(self._slots))
        return list(slot.raws.values()) if slot is not None else []

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

    def _slot(self, key: VisitKey) -> _Slot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
            self.metrics.set_queue_depth(len(self._slots))
        return slot

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
        slot = self._slot(visit.key)
        if slot.prepared is None:
            slot.prepared = asyncio.get_running_loop().create_future()
        if self.proc is None:
            await asyncio.to_thread(self._load)
        self._attach_apdb()
        proc = self.proc
        if proc is None:
            if not slot.prepared.done():
                slot.prepared.set_exception(RuntimeError(self.load_error))
            return 0.0
        prepared = await asyncio.to_thread(proc.prepare, visit)
        self.metrics.preload(prepared.prepare_s)
        if not slot.prepared.done():
            slot.prepared.set_result(prepared)
        slot.changed.set()
        return prepared.prepare_s

    async def raw_arrived(self, raw: RawArrival) -> None:
        """A raw for this detector landed (possibly before ``prepare``)."""
        if self.calib.owns(raw.key):
            self.calib.raw_arrived(raw)
            return
        if raw.key in self._finished:
            log.warning("detector %s: raw for finished visit %s ignored", self.detector, raw.key)
            return
        slot = self._slot(raw.key)
        slot.raws[raw.snap] = raw
        slot.changed.set()

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
        task = self._results.get(visit.key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._measured(visit))
            self._results[visit.key] = task
            while len(self._results) > _KEPT_RESULTS:
                oldest = next(iter(self._results))
                if not self._results[oldest].done():
                    break
                del self._results[oldest]
        # Shielded: a cancelled caller must not cancel the work another caller awaits.
        return await asyncio.shield(task)

    async def certify_flat(self, visit: NextVisit, factor: float) -> CalibResult:
        """A flat sequence's second step: take the focal-plane ``factor``, certify."""
        return await self.calib.certify_flat(visit, factor)

    async def _measured(self, visit: NextVisit) -> DetectorResult:
        result = await self._result(visit)
        self.metrics.result(result)
        return result

    async def _result(self, visit: NextVisit) -> DetectorResult:
        key = visit.key
        slot = self._slot(key)
        if slot.prepared is None:
            slot.prepared = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + visit.timeout_s(self.config.image_timeout_s)
        expected = max(visit.nimages, 1)
        try:
            try:
                prepared = await asyncio.wait_for(
                    asyncio.shield(slot.prepared), max(deadline - time.monotonic(), 0)
                )
            except RuntimeError as exc:
                return self._failed(visit, str(exc))
            while len(slot.raws) < expected:
                slot.changed.clear()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(slot.changed.wait(), remaining)
            assert self.proc is not None  # prepared implies loaded
            if self._busy is None:
                self._busy = asyncio.Semaphore(1)
            # One visit at a time per detector: pipelined visits queue here, not in memory.
            async with self._busy:
                raws = [slot.raws[s] for s in sorted(slot.raws)]
                self._processing += 1
                try:
                    return await asyncio.to_thread(self.proc.process, prepared, raws)
                finally:
                    self._processing -= 1
        except TimeoutError:
            if slot.prepared.done() and not slot.prepared.exception() and self.proc is not None:
                return self.proc.timed_out(slot.prepared.result(), len(slot.raws), expected)
            return self._failed(visit, "timed out before prepare finished", status="timed_out")
        finally:
            self._slots.pop(key, None)
            self.metrics.set_queue_depth(len(self._slots))
            self._finished[key] = None
            while len(self._finished) > self.config.remembered_visits:
                self._finished.popitem(last=False)

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
