"""A detector worker's calibration sequences: the actor side of :mod:`ppray.calib.sequence`.

:class:`CalibSequences` is composed by :class:`~ppray.actors.worker.DetectorWorker`,
which hands it every ``prepare``, raw and ``result`` of a calibration sequence
(a ``next_visit`` whose ``survey`` is one of ``calibration.surveys``):

- ``prepare`` loads the masters the kind needs, valid at the sequence's start;
- each raw is fed to the detector's streaming combiner as it arrives, by a
  feeder task (in snap order, one input at a time, in a thread, taking the
  worker's one-computation-at-a-time lock so that a science visit waits for
  at most one calibration input);
- ``result`` waits for the sequence (``2 x duration + image_timeout_s``, as a
  visit), combines and certifies a bias or dark; a flat is combined, its
  defects found and its statistics returned, and it waits in memory (one
  image) for :meth:`CalibSequences.certify_flat` with its focal-plane factor.

Every entry point is idempotent per sequence, so a restarted coordinator or a
retried detector asks again without harm; certification ids are deterministic.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ppray.calib.prepare import CalibKind
from ppray.calib.registry import CalibRegistry
from ppray.calib.results import CalibResult
from ppray.calib.sequence import (
    DetectorSequence,
    SequenceProduct,
    certify_product,
    finish_sequence,
    input_masters,
    needed_masters,
    sequence_kind,
)
from ppray.config import DeploymentConfig
from ppray.errors import PprayError, RetriableError
from ppray.image import Calibrations
from ppray.instrument import load_instrument
from ppray.messages import DetectorStatus, NextVisit, RawArrival, VisitKey
from ppray.storage import Storage
from ppray.visit.slots import BoundedLRU, Deadline, OnceCache

from .metrics import WorkerMetrics

__all__ = ["CalibSequences"]

log = logging.getLogger(__name__)

# Finished results kept for a repeated ``result`` or ``certify_flat`` call.
_KEPT_RESULTS = 4
# Combined flats waiting for their focal-plane factor (one image each).
_KEPT_FLATS = 2


@dataclass
class _Sequence:
    """One calibration sequence on this detector."""

    visit: NextVisit
    kind: CalibKind
    early: list[RawArrival] = field(default_factory=list)  # before the masters are loaded
    state: DetectorSequence | None = None
    error: PprayError | None = None
    loading: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stop: bool = False
    feeder: asyncio.Task[None] | None = None
    prepare_s: float = 0.0


class CalibSequences:
    """The calibration sequences of one detector worker.

    Parameters
    ----------
    config
        The deployment (``calibration``, ``calib_root``, ``image_timeout_s``).
    detector
        The worker's detector.
    metrics
        The worker's metrics recorder.
    busy
        The worker's lock of one computation at a time (made in the event loop).
    legacy
        The detector's legacy ``calib.fits`` planes, or None: the fallback of
        masters that nothing certified.
    """

    def __init__(
        self,
        config: DeploymentConfig,
        detector: str,
        metrics: WorkerMetrics,
        busy: Callable[[], asyncio.Semaphore],
        legacy: Callable[[], Calibrations | None],
    ) -> None:
        self.config = config
        self.instrument = load_instrument(config.instrument)
        self.detector = self.instrument.detector(detector)
        self.shape = (self.instrument.layout.ny, self.instrument.layout.nx)
        self.registry = CalibRegistry(Storage(config.calib_root), self.instrument.name)
        self.metrics = metrics
        self._busy = busy
        self._legacy = legacy
        self._sequences: dict[VisitKey, _Sequence] = {}
        self._results: OnceCache[VisitKey, CalibResult] = OnceCache(_KEPT_RESULTS)
        self._certified: OnceCache[VisitKey, CalibResult] = OnceCache(_KEPT_RESULTS)
        self._flats: BoundedLRU[VisitKey, tuple[SequenceProduct, CalibResult]] = BoundedLRU(
            _KEPT_FLATS,
            on_evict=lambda key, _: log.warning(
                "%s: combined flat dropped, its factor never came", key
            ),
        )
        self._finished: BoundedLRU[VisitKey, None] = BoundedLRU(config.remembered_visits)

    # --- dispatch --------------------------------------------------------------------

    def kind_of(self, visit: NextVisit) -> CalibKind | None:
        """The sequence's kind, or None for a science visit."""
        return sequence_kind(visit, self.config.calibration.surveys)

    def owns(self, key: VisitKey) -> bool:
        """Whether raws of ``key`` belong to a calibration sequence (running or finished)."""
        return key in self._sequences or key in self._finished

    def _sequence(self, visit: NextVisit, early: Iterable[RawArrival] = ()) -> _Sequence | None:
        """The sequence of ``visit``, made on first sight; None once it finished here."""
        if visit.key in self._finished:
            return None
        seq = self._sequences.get(visit.key)
        if seq is None:
            kind = self.kind_of(visit)
            assert kind is not None  # the worker dispatches calibration sequences only
            seq = self._sequences[visit.key] = _Sequence(visit, kind)
        for raw in early:
            self._offer(seq, raw)
        return seq

    def status(self) -> dict[str, Any]:
        """Sequences in progress (their progress, no pixels) and flats awaiting a factor."""
        return {
            "sequences": {
                str(k): s.state.snapshot() if s.state is not None else {"loading": s.loading}
                for k, s in self._sequences.items()
            },
            "pending_flats": [str(k) for k in self._flats],
            "combiner_nbytes": self.combiner_nbytes(),
        }

    def combiner_nbytes(self) -> int:
        """Bytes the streaming combiners of running sequences hold now."""
        return sum(s.state.combiner.nbytes for s in self._sequences.values() if s.state)

    # --- prepare and raws ------------------------------------------------------------

    async def prepare(self, visit: NextVisit, early: Iterable[RawArrival] = ()) -> float:
        """Load the masters the sequence's inputs need; returns the time it took (s)."""
        seq = self._sequence(visit, early)
        if seq is None:  # a late prepare (a restarted coordinator) of a finished sequence
            return 0.0
        if seq.loading or seq.ready.is_set():
            await seq.ready.wait()
            return seq.prepare_s
        seq.loading = True
        start = time.perf_counter()
        try:
            seq.state = await asyncio.to_thread(self._load, visit, seq.kind)
        except PprayError as exc:
            seq.error = exc
        except Exception as exc:  # storage trouble: a retry may cure it
            seq.error = RetriableError(f"masters not loaded: {type(exc).__name__}: {exc}")
        if seq.error is not None:
            log.error("%s %s: %s", visit.key, self.detector.name, seq.error)
        else:
            assert seq.state is not None
            for raw in seq.early:
                seq.state.offer(raw)
            seq.early.clear()
            seq.feeder = asyncio.get_running_loop().create_task(self._feed(seq))
        seq.prepare_s = time.perf_counter() - start
        self.metrics.preload(seq.prepare_s)
        seq.ready.set()
        return seq.prepare_s

    def _load(self, visit: NextVisit, kind: CalibKind) -> DetectorSequence:
        masters = input_masters(
            needed_masters(kind),
            self.registry,
            self.detector.name,
            visit.startTime,
            self.shape,
            self._legacy(),
        )
        return DetectorSequence(
            kind,
            self.instrument,
            self.detector,
            expected=visit.nimages,
            masters=masters,
            options=self.config.calibration.combine,
        )

    def raw_arrived(self, raw: RawArrival) -> None:
        """A raw of a calibration sequence: queued for the feeder."""
        seq = self._sequences.get(raw.key)
        if seq is None:
            log.warning(
                "detector %s: raw for finished sequence %s ignored", self.detector.name, raw.key
            )
            return
        self._offer(seq, raw)

    def _offer(self, seq: _Sequence, raw: RawArrival) -> None:
        if seq.state is None:
            if all(r.snap != raw.snap for r in seq.early):
                seq.early.append(raw)
        elif not seq.state.offer(raw):
            log.warning("%s %s: duplicate snap %d ignored", raw.key, self.detector.name, raw.snap)
        seq.changed.set()

    async def _feed(self, seq: _Sequence) -> None:
        """Combine the sequence's raws as they come, in snap order, until all are in."""
        state = seq.state
        assert state is not None
        while not state.complete and not seq.stop:
            seq.changed.clear()
            # In snap order; once as many raws came as expected, gaps will not fill.
            due = state.due() or (state.rest() if state.n_seen >= state.expected else [])
            for raw in due:
                if seq.stop:
                    break
                async with self._busy():
                    added = await asyncio.to_thread(state.add_raw, raw)
                if not added:
                    log.warning(
                        "%s %s: snap %d rejected: %s",
                        raw.key,
                        self.detector.name,
                        raw.snap,
                        state.rejected[raw.snap],
                    )
                self.metrics.set_combiner_bytes(self.combiner_nbytes())
            if not due:
                await seq.changed.wait()

    # --- results ---------------------------------------------------------------------

    async def result(self, visit: NextVisit, early: Iterable[RawArrival] = ()) -> CalibResult:
        """Wait for the sequence, combine and (bias, dark) certify; a flat comes back
        ``pending`` with its statistics. Idempotent per sequence."""
        self._sequence(visit, early)
        return await self._results.run(visit.key, lambda: self._result(visit))

    async def _result(self, visit: NextVisit) -> CalibResult:
        key = visit.key
        seq = self._sequences.get(key)
        if seq is None:
            return self._make(visit, "failed", reason="sequence already finished here")
        deadline = Deadline.after(visit.timeout_s(self.config.image_timeout_s))
        try:
            return await self._run(seq, deadline)
        except Exception as exc:  # a science bug must not kill the worker
            log.error("%s %s: %s", key, self.detector.name, traceback.format_exc())
            return self._make(
                visit, "failed", reason=f"internal error: {type(exc).__name__}: {exc}"
            )
        finally:
            seq.stop = True
            seq.changed.set()
            self._sequences.pop(key, None)
            self._finished.put(key, None)
            self.metrics.set_combiner_bytes(self.combiner_nbytes())

    async def _run(self, seq: _Sequence, deadline: Deadline) -> CalibResult:
        visit = seq.visit
        try:
            await asyncio.wait_for(seq.ready.wait(), deadline.remaining())
        except TimeoutError:
            return self._make(
                visit, "timed_out", reason="timed out before prepare finished", retriable=True
            )
        if seq.error is not None or seq.state is None or seq.feeder is None:
            error = seq.error or RetriableError("not prepared")
            return self._make(visit, "failed", reason=str(error), retriable=error.retriable)
        state = seq.state

        def failed(exc: PprayError) -> CalibResult:
            return self._make(
                visit,
                "failed",
                state=state,
                prepare_s=seq.prepare_s,
                reason=str(exc),
                retriable=exc.retriable,
            )

        try:
            await asyncio.wait_for(asyncio.shield(seq.feeder), deadline.remaining())
        except TimeoutError:
            seq.stop = True
            seq.changed.set()
            await asyncio.gather(seq.feeder, return_exceptions=True)
            got = state.n_seen
            return self._make(
                visit,
                "timed_out",
                state=state,
                prepare_s=seq.prepare_s,
                reason=f"{got} of {state.expected} raws arrived before the timeout",
            )
        except PprayError as exc:
            return failed(exc)
        try:
            async with self._busy():
                product = await asyncio.to_thread(finish_sequence, state, self.config.calibration)
        except PprayError as exc:
            return failed(exc)
        pending = self._make(visit, "ok", state=state, prepare_s=seq.prepare_s, product=product)
        if product.kind is CalibKind.FLAT:
            self._flats.put(visit.key, (product, pending))
            return pending.model_copy(update={"pending": True})
        return await self._certify(visit, product, pending, None)

    async def certify_flat(self, visit: NextVisit, factor: float) -> CalibResult:
        """Apply the focal-plane ``factor`` to the sequence's combined flat and certify it
        (and the defects found with it). Idempotent per sequence."""
        return await self._certified.run(visit.key, lambda: self._certify_flat(visit, factor))

    async def _certify_flat(self, visit: NextVisit, factor: float) -> CalibResult:
        held = self._flats.pop(visit.key)
        if held is None:
            return self._make(
                visit,
                "failed",
                retriable=True,
                reason="no combined flat waiting here (worker restarted?)",
            )
        product, pending = held
        return await self._certify(visit, product, pending, factor)

    async def _certify(
        self,
        visit: NextVisit,
        product: SequenceProduct,
        result: CalibResult,
        factor: float | None,
    ) -> CalibResult:
        start = time.perf_counter()
        try:
            records = await asyncio.to_thread(
                certify_product,
                self.registry,
                product,
                visit,
                self.detector.name,
                self.config.calibration,
                flat_factor=factor,
            )
        except PprayError as exc:
            final = result.model_copy(
                update={
                    "status": "failed",
                    "reason": f"not certified: {exc}",
                    "retriable": exc.retriable,
                }
            )
        else:
            quality = {r.kind: dict(r.quality) for r in records}
            timings = {**result.timings_s, "certify": time.perf_counter() - start}
            final = result.model_copy(
                update={
                    "records": tuple(records),
                    "quality": quality,
                    "timings_s": timings,
                    "finished_at": time.time(),
                }
            )
            log.info(
                "%s %s: certified %s",
                visit.key,
                self.detector.name,
                {r.kind: r.calib_id for r in records},
            )
        self.metrics.calib_result(final)
        return final

    def _make(
        self,
        visit: NextVisit,
        status: DetectorStatus,
        *,
        state: DetectorSequence | None = None,
        prepare_s: float = 0.0,
        product: SequenceProduct | None = None,
        reason: str = "",
        retriable: bool = False,
    ) -> CalibResult:
        kind = self.kind_of(visit)
        assert kind is not None
        timings = {"prepare": prepare_s}
        extra: dict[str, Any] = {}
        if state is not None:
            timings |= state.timings_s
            extra = {
                "n_inputs": len(state.added),
                "rejected": dict(state.rejected),
                "inputs": dict(state.masters.calib_ids),
                "combiner_peak_bytes": state.peak_nbytes,
                "last_raw_at": state.last_raw_at,
            }
        if product is not None:
            extra["quality"] = {k: dict(v) for k, v in product.quality.items()}
            extra["flat_statistics"] = product.flat_statistics
        result = CalibResult(
            instrument=visit.instrument,
            group_id=visit.groupId,
            detector=self.detector.name,
            detector_id=self.detector.id,
            kind=kind.value,
            band=visit.filter_band if kind is CalibKind.FLAT else None,
            status=status,
            reason=reason,
            retriable=retriable,
            n_expected=visit.nimages,
            timings_s=timings,
            **extra,
        )
        if status != "ok":
            self.metrics.calib_result(result)
        return result
