"""One detector's visits as their pieces arrive, without Ray.

A detector worker is told three things about a visit, in any order and
possibly more than once (a restarted coordinator says them again):
``prepare`` (from ``next_visit``), each raw, and "give me the result".
This module is the book-keeping behind that, so that the Ray actors only
wrap it:

- :class:`VisitSlots` holds, per visit, the preload as it becomes known and
  the raws as they land (before or after ``prepare``), and waits for both
  with a deadline (:meth:`VisitSlots.wait`). A raw of a visit that already
  finished is refused, so a straggler does not open a slot that nobody
  would ever close.
- :class:`OnceCache` computes one result per key, whoever asks and however
  often; the last few finished results stay for a repeated ask.
- :class:`BoundedLRU` is the bounded mapping under both (and under the
  coordinator's memory of finished visits): the oldest entries go first.
- :class:`Deadline` is "this much time from now", asked for what is left.

All of it runs in one asyncio event loop (an async actor's); nothing here is
thread-safe, and nothing needs to be.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ppray.messages import RawArrival, VisitKey

__all__ = [
    "BoundedLRU",
    "Deadline",
    "OnceCache",
    "PrepareFailed",
    "SlotReady",
    "SlotTimedOut",
    "VisitSlots",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")
P = TypeVar("P")


class BoundedLRU(Generic[K, V]):
    """A mapping that keeps at most ``maxsize`` entries, dropping the oldest first.

    Parameters
    ----------
    maxsize
        Entries kept (at least 0).
    evictable
        Whether an entry may be dropped (default: every entry). Eviction stops at
        the oldest entry that may not, so the mapping can exceed ``maxsize``
        while its oldest entries are still in use (results being computed).
    on_evict
        Called with each ``(key, value)`` dropped for room.
    """

    def __init__(
        self,
        maxsize: int,
        *,
        evictable: Callable[[V], bool] | None = None,
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, not {maxsize}")
        self.maxsize = maxsize
        self._evictable = evictable
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def get(self, key: K) -> V | None:
        """The value of ``key``, or None (its age is left as it is)."""
        return self._items.get(key)

    def pop(self, key: K) -> V | None:
        """Remove ``key`` and return its value, or None if absent."""
        return self._items.pop(key, None)

    def put(self, key: K, value: V) -> None:
        """Set ``key`` (as the newest entry), then drop the oldest beyond ``maxsize``."""
        self._items.pop(key, None)
        self._items[key] = value
        self._trim()

    def items(self) -> list[tuple[K, V]]:
        """The entries, oldest first."""
        return list(self._items.items())

    def _trim(self) -> None:
        while len(self._items) > self.maxsize:
            key, value = next(iter(self._items.items()))
            if self._evictable is not None and not self._evictable(value):
                return
            del self._items[key]
            if self._on_evict is not None:
                self._on_evict(key, value)


class OnceCache(Generic[K, T]):
    """One computation per key, whoever asks; the last ``keep`` finished ones are kept.

    The first :meth:`run` for a key starts ``make()`` as a task; every later
    one (a restarted coordinator asking again, a retry) awaits the same task,
    or gets its result if it finished recently. A cancelled caller does not
    cancel the work that others await.
    """

    def __init__(self, keep: int) -> None:
        self._tasks: BoundedLRU[K, asyncio.Task[T]] = BoundedLRU(
            keep, evictable=lambda task: task.done()
        )

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, key: K, make: Callable[[], Awaitable[T]]) -> T:
        """The result for ``key``: computed by ``make()`` the first time only."""
        task = self._tasks.get(key)
        if task is None:

            async def compute() -> T:
                return await make()

            task = asyncio.get_running_loop().create_task(compute())
            self._tasks.put(key, task)
        return await asyncio.shield(task)


@dataclass(frozen=True)
class Deadline:
    """A point in time (``time.monotonic``), asked for the seconds left."""

    at: float

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(clock() + seconds)

    def remaining(self, clock: Callable[[], float] = time.monotonic) -> float:
        """Seconds left, never below 0."""
        return max(self.at - clock(), 0.0)


@dataclass(frozen=True)
class SlotReady(Generic[P]):
    """Everything is there: the preload and the expected raws, in snap order."""

    prepared: P
    raws: tuple[RawArrival, ...]


@dataclass(frozen=True)
class PrepareFailed:
    """``prepare`` could not be done (e.g. no calibrations): why."""

    reason: str


@dataclass(frozen=True)
class SlotTimedOut(Generic[P]):
    """The deadline passed: the preload if it was done, and how many raws came."""

    prepared: P | None
    got: int
    expected: int


@dataclass
class _Slot(Generic[P]):
    prepared: asyncio.Future[P] | None = None
    raws: dict[int, RawArrival] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def future(self) -> asyncio.Future[P]:
        if self.prepared is None:
            self.prepared = asyncio.get_running_loop().create_future()
        return self.prepared


class VisitSlots(Generic[P]):
    """The visits of one detector: preloads and raws as they come, and the wait for both.

    Parameters
    ----------
    remembered
        How many finished visits are remembered, so that a raw straggling in
        after its visit finished is refused instead of opening a new slot.
    """

    def __init__(self, remembered: int) -> None:
        self._slots: dict[VisitKey, _Slot[P]] = {}
        self._finished: BoundedLRU[VisitKey, None] = BoundedLRU(remembered)

    def __len__(self) -> int:
        """Visits open (prepared or with raws, not finished)."""
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def is_finished(self, key: VisitKey) -> bool:
        """Whether ``key`` finished here (among the last ``remembered``)."""
        return key in self._finished

    def _slot(self, key: VisitKey) -> _Slot[P]:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        return slot

    def open(self, key: VisitKey) -> None:
        """Open the visit's slot (``prepare`` started); nothing if it is open already."""
        self._slot(key).future()

    def is_prepared(self, key: VisitKey) -> bool:
        """Whether the visit's preload is done (successfully or not)."""
        slot = self._slots.get(key)
        return slot is not None and slot.prepared is not None and slot.prepared.done()

    def set_prepared(self, key: VisitKey, prepared: P) -> None:
        """The preload is done; a second one for the same visit is ignored."""
        future = self._slot(key).future()
        if not future.done():
            future.set_result(prepared)
        self._slots[key].changed.set()

    def set_failed(self, key: VisitKey, reason: str) -> None:
        """``prepare`` failed: a waiting result gets :class:`PrepareFailed`."""
        future = self._slot(key).future()
        if not future.done():
            future.set_exception(_PrepareError(reason))
        self._slots[key].changed.set()

    def add_raw(self, raw: RawArrival) -> bool:
        """A raw landed (before or after ``prepare``); False if its visit already finished.

        A second raw for the same snap replaces the first.
        """
        if raw.key in self._finished:
            return False
        slot = self._slot(raw.key)
        slot.raws[raw.snap] = raw
        slot.changed.set()
        return True

    def take_raws(self, key: VisitKey) -> list[RawArrival]:
        """Close the slot without finishing the visit and return its raws (a visit
        that turned out to be handled elsewhere, e.g. a calibration sequence)."""
        slot = self._slots.pop(key, None)
        return [slot.raws[s] for s in sorted(slot.raws)] if slot is not None else []

    async def wait(
        self, key: VisitKey, expected: int, deadline: Deadline
    ) -> SlotReady[P] | PrepareFailed | SlotTimedOut[P]:
        """Wait until the visit is prepared and ``expected`` raws are in, or the deadline.

        The slot stays open: call :meth:`finish` once the visit is done with.
        """
        slot = self._slot(key)
        future = slot.future()
        try:
            prepared = await asyncio.wait_for(asyncio.shield(future), deadline.remaining())
        except _PrepareError as exc:
            return PrepareFailed(str(exc))
        except TimeoutError:
            return SlotTimedOut(None, len(slot.raws), expected)
        while len(slot.raws) < expected:
            slot.changed.clear()
            try:
                await asyncio.wait_for(slot.changed.wait(), deadline.remaining())
            except TimeoutError:
                if len(slot.raws) >= expected:  # the raw that came as time ran out
                    break
                return SlotTimedOut(prepared, len(slot.raws), expected)
        return SlotReady(prepared, tuple(slot.raws[s] for s in sorted(slot.raws)))

    def finish(self, key: VisitKey) -> None:
        """The visit is done here: close its slot and remember it as finished."""
        self._slots.pop(key, None)
        self._finished.put(key, None)


class _PrepareError(Exception):
    """Carries a failed ``prepare``'s reason through the slot's future."""
