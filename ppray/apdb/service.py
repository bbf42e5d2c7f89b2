"""The sky-sharded APDB as a service: routing to shards, and an in-process twin.

The sky is cut into NESTED HEALPix pixels at ``shard_nside``; pixel ``p``
belongs to shard ``p % n_shards`` (neighbouring pixels to different shards,
so a visit's load is spread). A DIA source goes to the shard that owns its
position and is associated there against that shard's DiaObjects; forced
photometry goes to the shard that owns the object's position.

:class:`ShardedAssociation` does the routing and merging over any way of
calling the shards: :class:`LocalAssociation` calls :class:`ApdbShard` objects
in this process (tests, single-process runs); the Ray layer calls shard
actors (``ppray.actors.apdb``). Each shard is called by one caller at a time,
so concurrent detectors and pipelined visits see a consistent state.

Limitation: an object is held by the shard where it was created. A source
within the association radius of a shard boundary whose object lies across it
is not matched and starts a new object; at ``shard_nside`` 8 (7.3 deg pixels)
that concerns ~1.5e-4 of the sources near an object, and none with one shard.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ppray.apdb.backend import ApdbStore
from ppray.apdb.shard import ApdbShard, AssociationResult
from ppray.apdb.store import ApdbTables
from ppray.skyregion import Footprint, healpix_pixels

__all__ = [
    "AssociationService",
    "LocalAssociation",
    "ShardRouter",
    "ShardedAssociation",
    "load_shard",
    "merge_results",
    "merge_tables",
]


class AssociationService(Protocol):
    """What a detector pipeline needs of the APDB."""

    def preload(self, footprint: Footprint, mjd_tai: float) -> ApdbTables:
        """DiaObjects in the footprint and their last 12 months of history."""
        ...

    def associate(self, dia_sources: pa.Table) -> AssociationResult:
        """Associate one detector's (or visit's) DiaSources with DiaObjects."""
        ...

    def record_forced(self, dia_forced_sources: pa.Table) -> pa.Table:
        """Record forced photometry; returns the DiaObjects it updated."""
        ...


class ShardRouter:
    """Which shard owns a position: HEALPix pixel (NESTED, ``nside``) modulo ``n_shards``."""

    def __init__(self, n_shards: int, nside: int = 8) -> None:
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, not {n_shards}")
        if nside < 1 or nside & (nside - 1):
            raise ValueError(f"shard nside must be a power of two, not {nside}")
        self.n_shards = n_shards
        self.nside = nside

    def shard_of(self, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
        """The shard index of each position."""
        if self.n_shards == 1:
            return np.zeros(np.shape(ra_deg), dtype=np.int64)
        return healpix_pixels(np.asarray(ra_deg), np.asarray(dec_deg), self.nside) % self.n_shards

    def region(self, shard: int) -> Footprint | None:
        """The sky shard ``shard`` owns (None: all of it, when there is one shard)."""
        if not 0 <= shard < self.n_shards:
            raise ValueError(f"shard {shard} not in 0..{self.n_shards - 1}")
        if self.n_shards == 1:
            return None
        pixels = np.arange(shard, 12 * self.nside**2, self.n_shards)
        return Footprint.pixels(self.nside, pixels)

    def shards_for(self, footprint: Footprint) -> list[int]:
        """The shards whose regions overlap ``footprint``."""
        if self.n_shards == 1:
            return [0]
        pix = footprint.healpix(self.nside)
        return sorted({int(p) % self.n_shards for p in pix})


def merge_tables(parts: list[ApdbTables]) -> ApdbTables:
    """The union of disjoint shards' answers (each object is held by one shard)."""
    if len(parts) == 1:
        return parts[0]
    return ApdbTables(
        *(
            pa.concat_tables([getattr(p, name) for p in parts])
            for name in ("dia_objects", "dia_sources", "dia_forced_sources")
        )
    )


def merge_results(parts: list[AssociationResult]) -> AssociationResult:
    """The union of the shards' association results, sources sorted by id as one shard's."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> pa.Table:
        return pa.concat_tables([getattr(p, name) for p in parts])

    return AssociationResult(
        dia_sources=cat("dia_sources").sort_by("diaSourceId"),
        dia_objects=cat("dia_objects").sort_by("diaObjectId"),
        prv_dia_sources=cat("prv_dia_sources"),
        prv_dia_forced_sources=cat("prv_dia_forced_sources"),
        n_matched=sum(p.n_matched for p in parts),
        n_new=sum(p.n_new for p in parts),
    )


# Calls ``method`` on each shard named in ``args`` (shard -> positional args) and
# returns shard -> result; an implementation may run them concurrently.
ShardCaller = Callable[[str, Mapping[int, tuple[Any, ...]]], Mapping[int, Any]]


class ShardedAssociation:
    """:class:`AssociationService` over shards reached through ``call``."""

    def __init__(self, router: ShardRouter, call: ShardCaller) -> None:
        self.router = router
        self._call = call

    def _split(self, table: pa.Table) -> dict[int, tuple[Any, ...]]:
        shard = self.router.shard_of(table["ra"].to_numpy(), table["dec"].to_numpy())
        return {int(k): (table.filter(pa.array(shard == k)),) for k in np.unique(shard).tolist()}

    def preload(self, footprint: Footprint, mjd_tai: float) -> ApdbTables:
        shards = self.router.shards_for(footprint)
        answers = self._call("preload", {k: (footprint, mjd_tai) for k in shards})
        return merge_tables([answers[k] for k in shards])

    def associate(self, dia_sources: pa.Table) -> AssociationResult:
        if dia_sources.num_rows == 0:
            return self._call("associate", {0: (dia_sources,)})[0]
        args = self._split(dia_sources)
        answers = self._call("associate", args)
        return merge_results([answers[k] for k in sorted(args)])

    def record_forced(self, dia_forced_sources: pa.Table) -> pa.Table:
        if dia_forced_sources.num_rows == 0:
            return self._call("record_forced", {0: (dia_forced_sources,)})[0]
        args = self._split(dia_forced_sources)
        answers = self._call("record_forced", args)
        return pa.concat_tables([answers[k] for k in sorted(args)])


def load_shard(
    router: ShardRouter,
    shard: int,
    apdb: ApdbStore | None,
    *,
    radius_arcsec: float = 1.0,
    history_days: float = 365.0,
) -> ApdbShard:
    """A shard with the state it had: its region's objects and history read from the APDB.

    What a restarted shard actor runs, so that no DiaObject is forgotten.
    """
    region = router.region(shard)
    state = ApdbShard(region, radius_arcsec=radius_arcsec, history_days=history_days)
    if apdb is not None:
        whole = region if region is not None else Footprint.box(0.0, 360.0, -90.0, 90.0)
        tables = apdb.read(whole)
        if tables.dia_objects.num_rows:
            # The APDB reads padded pixels; a shard holds only what it owns.
            objects = tables.dia_objects
            owned = state.owns(objects["ra"].to_numpy(), objects["dec"].to_numpy())
            tables = ApdbTables(
                objects.filter(pa.array(owned)), tables.dia_sources, tables.dia_forced_sources
            )
            state.load(tables)
    return state


class LocalAssociation(ShardedAssociation):
    """The shards as plain objects in this process: the in-memory twin of the shard actors."""

    def __init__(self, shards: list[ApdbShard], router: ShardRouter | None = None) -> None:
        router = router or ShardRouter(len(shards))
        if len(shards) != router.n_shards:
            raise ValueError(f"{len(shards)} shards for a router of {router.n_shards}")
        self.shards = shards

        def call(method: str, args: Mapping[int, tuple[Any, ...]]) -> dict[int, Any]:
            return {k: getattr(shards[k], method)(*a) for k, a in args.items()}

        super().__init__(router, call)
