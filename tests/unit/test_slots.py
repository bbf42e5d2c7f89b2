"""The worker's per-visit book-keeping without Ray: slots, the once-per-key cache, the LRU."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ppray.messages import RawArrival, VisitKey
from ppray.visit.slots import (
    BoundedLRU,
    Deadline,
    OnceCache,
    PrepareFailed,
    SlotReady,
    SlotTimedOut,
    VisitSlots,
)

KEY = VisitKey(instrument="Synthetic", group_id="g1")
# Long enough never to pass on a loaded machine where a test expects no timeout.
LONG_S = 60.0


def raw(snap: int, group: str = "g1") -> RawArrival:
    return RawArrival(
        instrument="Synthetic",
        group_id=group,
        detector="R22_S11",
        snap=snap,
        exposure_id=100 + snap,
        uri=f"file:///raw/{group}_{snap}.fits",
        arrived_at=1.0 + snap,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- VisitSlots ------------------------------------------------------------------------


def test_raws_before_prepare_are_kept_and_come_back_in_snap_order() -> None:
    async def main() -> Any:
        slots: VisitSlots[str] = VisitSlots(remembered=10)
        assert slots.add_raw(raw(1)) and slots.add_raw(raw(0))
        slots.open(KEY)
        slots.set_prepared(KEY, "prepared")
        return await slots.wait(KEY, 2, Deadline.after(LONG_S))

    outcome = run(main())
    assert isinstance(outcome, SlotReady)
    assert outcome.prepared == "prepared"
    assert [r.snap for r in outcome.raws] == [0, 1]


def test_a_waiting_result_wakes_for_the_raws_after_prepare() -> None:
    async def main() -> Any:
        slots: VisitSlots[str] = VisitSlots(remembered=10)
        waiting = asyncio.create_task(slots.wait(KEY, 2, Deadline.after(LONG_S)))
        await asyncio.sleep(0)
        slots.set_prepared(KEY, "p")
        slots.add_raw(raw(0))
        await asyncio.sleep(0)
        assert not waiting.done()  # one raw of two: still waiting
        slots.add_raw(raw(1))
        return await waiting

    outcome = run(main())
    assert isinstance(outcome, SlotReady)
    assert [r.snap for r in outcome.raws] == [0, 1]


def test_a_repeated_snap_replaces_the_first_and_counts_once() -> None:
    async def main() -> Any:
        slots: VisitSlots[str] = VisitSlots(remembered=10)
        slots.set_prepared(KEY, "p")
        slots.add_raw(raw(0))
        again = raw(0).model_copy(update={"uri": "file:///raw/again.fits"})
        slots.add_raw(again)
        return await slots.wait(KEY, 2, Deadline.after(0.05))

    outcome = run(main())
    assert isinstance(outcome, SlotTimedOut)
    assert (outcome.prepared, outcome.got, outcome.expected) == ("p", 1, 2)


def test_timeout_before_prepare_has_no_preload() -> None:
    async def main() -> Any:
        slots: VisitSlots[str] = VisitSlots(remembered=10)
        slots.add_raw(raw(0))
        return await slots.wait(KEY, 1, Deadline.after(0.05))

    outcome = run(main())
    assert isinstance(outcome, SlotTimedOut)
    assert outcome.prepared is None and outcome.got == 1


def test_a_failed_prepare_says_why() -> None:
    async def main() -> Any:
        slots: VisitSlots[str] = VisitSlots(remembered=10)
        waiting = asyncio.create_task(slots.wait(KEY, 1, Deadline.after(LONG_S)))
        await asyncio.sleep(0)
        slots.set_failed(KEY, "calibrations not loaded")
        return await waiting

    assert run(main()) == PrepareFailed("calibrations not loaded")


def test_a_second_prepare_keeps_the_first() -> None:
    async def main() -> Any:
        slots: VisitSlots[str] = VisitSlots(remembered=10)
        slots.set_prepared(KEY, "first")
        slots.set_prepared(KEY, "second")
        slots.add_raw(raw(0))
        return await slots.wait(KEY, 1, Deadline.after(LONG_S))

    outcome = run(main())
    assert isinstance(outcome, SlotReady) and outcome.prepared == "first"


def test_raws_of_a_finished_visit_are_refused_and_open_no_slot() -> None:
    async def main() -> VisitSlots[str]:
        slots: VisitSlots[str] = VisitSlots(remembered=10)
        slots.set_prepared(KEY, "p")
        slots.add_raw(raw(0))
        await slots.wait(KEY, 1, Deadline.after(LONG_S))
        slots.finish(KEY)
        assert not slots.add_raw(raw(1))
        return slots

    slots = run(main())
    assert len(slots) == 0 and KEY not in slots and slots.is_finished(KEY)


def test_finished_visits_are_remembered_up_to_the_bound() -> None:
    slots: VisitSlots[str] = VisitSlots(remembered=2)
    keys = [VisitKey(instrument="Synthetic", group_id=f"g{i}") for i in range(3)]
    for key in keys:
        slots.finish(key)
    assert [slots.is_finished(k) for k in keys] == [False, True, True]
    assert slots.add_raw(raw(0, group="g0"))  # forgotten: a new slot again


def test_take_raws_closes_the_slot_without_finishing() -> None:
    slots: VisitSlots[str] = VisitSlots(remembered=10)
    slots.add_raw(raw(1))
    slots.add_raw(raw(0))
    assert [r.snap for r in slots.take_raws(KEY)] == [0, 1]
    assert KEY not in slots and not slots.is_finished(KEY)
    assert slots.take_raws(KEY) == []


# --- OnceCache ---------------------------------------------------------------------------


def test_duplicate_result_requests_share_one_computation() -> None:
    calls: list[str] = []

    async def main() -> list[str]:
        cache: OnceCache[str, str] = OnceCache(keep=4)
        gate = asyncio.Event()

        async def compute() -> str:
            calls.append("computed")
            await gate.wait()
            return "result"

        first = asyncio.create_task(cache.run("v1", compute))
        second = asyncio.create_task(cache.run("v1", compute))
        await asyncio.sleep(0)
        gate.set()
        results = list(await asyncio.gather(first, second))
        results.append(await cache.run("v1", compute))  # finished: the kept result
        return results

    assert run(main()) == ["result"] * 3
    assert calls == ["computed"]


def test_a_cancelled_caller_does_not_cancel_the_shared_work() -> None:
    async def main() -> str:
        cache: OnceCache[str, str] = OnceCache(keep=4)
        gate = asyncio.Event()

        async def compute() -> str:
            await gate.wait()
            return "done"

        impatient = asyncio.create_task(cache.run("v", compute))
        await asyncio.sleep(0)
        impatient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await impatient
        gate.set()
        return await cache.run("v", compute)

    assert run(main()) == "done"


def test_only_the_last_finished_results_are_kept_never_running_ones() -> None:
    async def main() -> tuple[int, int]:
        cache: OnceCache[int, int] = OnceCache(keep=2)
        gate = asyncio.Event()

        async def slow() -> int:
            await gate.wait()
            return -1

        running = asyncio.create_task(cache.run(0, slow))
        await asyncio.sleep(0)
        for k in range(1, 5):

            async def value(k: int = k) -> int:
                return k

            await cache.run(k, value)
        kept_while_running = len(cache)
        gate.set()
        await running

        async def quick() -> int:
            return 9

        await cache.run(5, quick)
        return kept_while_running, len(cache)

    while_running, after = run(main())
    # The running computation is never dropped, so the finished ones behind it wait too.
    assert while_running == 5
    assert after == 2


# --- BoundedLRU and Deadline -----------------------------------------------------------------


def test_bounded_lru_drops_the_oldest_and_reports_it() -> None:
    dropped: list[tuple[str, int]] = []
    lru: BoundedLRU[str, int] = BoundedLRU(2, on_evict=lambda k, v: dropped.append((k, v)))
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("a", 3)  # a is the newest again
    lru.put("c", 4)
    assert list(lru) == ["a", "c"] and dropped == [("b", 2)]
    assert lru.get("a") == 3 and lru.pop("a") == 3 and lru.pop("a") is None


def test_bounded_lru_rejects_a_negative_size() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        BoundedLRU(-1)


def test_deadline_remaining_never_below_zero() -> None:
    now = [100.0]
    deadline = Deadline.after(5.0, clock=lambda: now[0])
    assert deadline.remaining(clock=lambda: now[0]) == 5.0
    now[0] = 200.0
    assert deadline.remaining(clock=lambda: now[0]) == 0.0
