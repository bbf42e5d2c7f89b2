"""``VisitAggregator``: the gather of a visit's detector results."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from ppray.aggregate import summarize_visit
from ppray.config import DeploymentConfig
from ppray.kafka.sinks import JsonPublisher, metrics_records
from ppray.messages import DetectorResult, NextVisit, VisitSummary
from ppray.pipeline import visit_prefix
from ppray.storage import Storage

from .coordinator import COORDINATOR_NAME

__all__ = ["VisitAggregator"]

log = logging.getLogger(__name__)


class VisitAggregator:
    """Async actor: awaits detector result refs, reduces them, writes the visit summary."""

    def __init__(self, config: DeploymentConfig) -> None:
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

    async def ready(self) -> bool:
        return True

    async def _one(self, visit: NextVisit, detector: str, ref: Any) -> DetectorResult:
        attempt = 0
        while True:
            try:
                result: DetectorResult = await ref
                return result
            except ray.exceptions.RayActorError as exc:
                # The worker died under the visit; the coordinator (which holds the raws)
                # has Ray's restarted worker do the detector again, if retries are left.
                attempt += 1
                log.warning("%s %s: worker died: %s", visit.key, detector, exc)
                again = await self._coordinator().retry_detector.remote(
                    visit, detector, attempt, type(exc).__name__
                )
                if not again:
                    reason = f"worker died {attempt} times, retries exhausted or not possible"
                    return self._failed(visit, detector, exc, reason)
                ref = again[0]
            except ray.exceptions.RayError as exc:
                return self._failed(visit, detector, exc, "worker error")

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
            reason=f"{reason}: {type(exc).__name__}",
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
        key = f"{visit_prefix(visit)}/summary.json"
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

    def _publish_metrics(
        self, visit: NextVisit, summary: VisitSummary, results: list[DetectorResult]
    ) -> None:
        assert self.metrics is not None
        try:
            self.metrics.send(metrics_records(visit, summary, results))
        except Exception as exc:  # metrics are for operators: never fail the visit for them
            log.error("%s: metrics not published: %s", visit.key, exc)
