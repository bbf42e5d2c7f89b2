"""``VisitAggregator``: the gather of a visit's detector results.

It gathers calibration sequences too (:meth:`VisitAggregator.gather_calib`):
for a flat, the reduction of the detectors' statistics to focal-plane factors,
sent back to each worker, which applies its own and certifies; the flats
themselves never leave their workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from ppray.calib.registry import SequenceKindName
from ppray.calib.results import CalibResult, CalibSummary, flat_factors, summarize_calibration
from ppray.config import DeploymentConfig
from ppray.kafka.sinks import JsonPublisher, metrics_records
from ppray.layout import summary_key
from ppray.messages import DetectorResult, NextVisit, VisitSummary
from ppray.storage import Storage
from ppray.visit.aggregate import summarize_visit

from .calls import ActorCallFailed, ActorDied, resolve
from .coordinator import COORDINATOR_NAME, worker_name

__all__ = ["VisitAggregator"]

log = logging.getLogger(__name__)


class VisitAggregator:
    """Async actor: awaits detector result refs, reduces them, writes the visit summary."""

    def __init__(self, config: DeploymentConfig) -> None:
        config.s3.configure()  # how s3:// roots are reached, in this process
        self.config = config
        self.output = Storage(config.output_root)
        kafka = config.kafka
        # The producer is made on first use, in this actor's process.
        self.metrics = (
            JsonPublisher(kafka, kafka.topics.metrics)
            if kafka is not None and kafka.publish_metrics
            else None
        )
        self._coordinator_handle: Any = None
        self._workers: dict[str, Any] = {}

    async def ready(self) -> bool:
        return True

    async def _one(
        self,
        visit: NextVisit,
        detector: str,
        ref: Any,
        failed: Callable[[NextVisit, str, Exception, str], Any] | None = None,
    ) -> Any:
        """The detector's result (a ``DetectorResult``, or a ``CalibResult`` with
        ``failed`` making the calibration kind of failure).

        A worker that died under the visit is reported to the coordinator, which
        decides whether it is redone; the redone result is awaited in turn.
        """
        fail = failed or self._failed
        deaths = 0  # for the report only: the coordinator counts the attempts and decides
        while True:
            try:
                return await resolve(ref)
            except ActorDied as exc:
                deaths += 1
                again = await self._redo(visit, detector, exc)
                if again is None:
                    reason = f"worker died {deaths} times, retries exhausted or not possible"
                    return fail(visit, detector, exc, reason)
                ref = again
            except ActorCallFailed as exc:
                return fail(visit, detector, exc, "worker error")

    async def _redo(self, visit: NextVisit, detector: str, died: ActorDied) -> Any | None:
        """Report a worker's death to the coordinator (which holds the raws and decides);
        the ref of the redone detector's result, or None if it is not redone."""
        log.warning("%s %s: worker died: %s", visit.key, detector, died)
        again = await self._coordinator().retry_detector.remote(visit, detector, str(died))
        return again[0] if again else None

    def _coordinator(self) -> Any:
        # Looked up when needed: the coordinator is created after the aggregator.
        if self._coordinator_handle is None:
            self._coordinator_handle = ray.get_actor(
                COORDINATOR_NAME, namespace=self.config.namespace
            )
        return self._coordinator_handle

    @staticmethod
    def _failed(visit: NextVisit, detector: str, exc: Exception, reason: str) -> DetectorResult:
        log.error("%s %s: %s: %s", visit.key, detector, reason, exc)
        return DetectorResult(
            instrument=visit.instrument,
            group_id=visit.groupId,
            detector=detector,
            detector_id=-1,
            status="failed",
            # The Ray exception behind the call's failure names what happened.
            reason=f"{reason}: {type(exc.__cause__ or exc).__name__}",
            retriable=True,
        )

    async def gather(
        self, visit: NextVisit, expected: list[str], refs: dict[str, Any]
    ) -> VisitSummary:
        """Gather ``refs`` (detector -> ObjectRef of a DetectorResult) into a summary.

        The refs arrive unresolved (they sit inside a dict), so each detector's
        result is awaited as it completes; order does not change the result.
        """
        results = await asyncio.gather(*(self._one(visit, d, r) for d, r in refs.items()))
        key = summary_key(visit)
        summary = summarize_visit(
            visit.instrument,
            visit.groupId,
            expected,
            results,
            done_at=time.time(),
            summary_uri=self.output.uri(key),
        )
        await asyncio.to_thread(self.output.write_json, key, summary.model_dump(mode="json"))
        if self.metrics is not None:
            await asyncio.to_thread(self._publish_metrics, visit, summary, results)
        return summary

    async def gather_calib(
        self, visit: NextVisit, kind: SequenceKindName, expected: list[str], refs: dict[str, Any]
    ) -> CalibSummary:
        """Gather a calibration sequence: ``refs`` (detector -> ObjectRef of a CalibResult).

        A flat's results wait for their focal-plane factor: this reduces their
        statistics to the factors (:func:`~ppray.calib.results.flat_factors`) and
        has each worker certify its flat with its own (``certify_flat``). The
        summary goes to ``summary.json`` under the sequence's output prefix.
        """

        def failed(visit: NextVisit, detector: str, exc: Exception, reason: str) -> CalibResult:
            return self._calib_failed(kind, visit, detector, exc, reason)

        results: list[CalibResult] = list(
            await asyncio.gather(*(self._one(visit, d, r, failed) for d, r in refs.items()))
        )
        factors: dict[str, float] = {}
        waiting = [r for r in results if r.status == "ok" and r.pending]
        if waiting:
            factors = flat_factors(waiting)
            finals = await asyncio.gather(
                *(
                    self._certify_flat(visit, r.detector, factors[r.detector], failed)
                    for r in waiting
                )
            )
            by_det = {r.detector: r for r in results} | {r.detector: r for r in finals}
            results = list(by_det.values())
        key = summary_key(visit)
        summary = summarize_calibration(
            visit.instrument,
            visit.groupId,
            kind,
            expected,
            results,
            band=visit.filter_band if kind == "flat" else None,
            factors=factors,
            done_at=time.time(),
            summary_uri=self.output.uri(key),
        )
        await asyncio.to_thread(self.output.write_json, key, summary.model_dump(mode="json"))
        return summary

    async def _certify_flat(
        self,
        visit: NextVisit,
        detector: str,
        factor: float,
        failed: Callable[[NextVisit, str, Exception, str], CalibResult],
    ) -> CalibResult:
        while True:
            try:
                result: CalibResult = await resolve(
                    self._worker(detector).certify_flat.remote(visit, factor)
                )
                return result
            except ActorDied as exc:
                # The worker died holding its combined flat: it does the sequence again
                # (the coordinator re-sends its raws; the same inputs combine to the same
                # flat), then takes the same factor.
                again = await self._redo(visit, detector, exc)
                if again is None:
                    return failed(visit, detector, exc, "worker died before certifying its flat")
                redone: CalibResult = await self._one(visit, detector, again, failed)
                if redone.status != "ok" or not redone.pending:
                    return redone
            except ActorCallFailed as exc:
                return failed(visit, detector, exc, "worker error")

    def _worker(self, detector: str) -> Any:
        if detector not in self._workers:
            self._workers[detector] = ray.get_actor(
                worker_name(detector), namespace=self.config.namespace
            )
        return self._workers[detector]

    @staticmethod
    def _calib_failed(
        kind: SequenceKindName, visit: NextVisit, detector: str, exc: Exception, reason: str
    ) -> CalibResult:
        log.error("%s %s: %s: %s", visit.key, detector, reason, exc)
        return CalibResult(
            instrument=visit.instrument,
            group_id=visit.groupId,
            detector=detector,
            detector_id=-1,
            kind=kind,
            status="failed",
            # The Ray exception behind the call's failure names what happened.
            reason=f"{reason}: {type(exc.__cause__ or exc).__name__}",
            retriable=True,
            n_expected=visit.nimages,
        )

    def _publish_metrics(
        self, visit: NextVisit, summary: VisitSummary, results: list[DetectorResult]
    ) -> None:
        assert self.metrics is not None
        try:
            self.metrics.send(metrics_records(visit, summary, results))
        except Exception as exc:  # metrics are for operators: never fail the visit for them
            log.error("%s: metrics not published: %s", visit.key, exc)
