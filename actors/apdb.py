"""Sky-sharded APDB actors, and the :class:`AssociationService` that reaches them.

Each ``apdb-K`` actor wraps one :class:`ppray.apdb.shard.ApdbShard` (its
region's DiaObjects and 12 months of history, in memory). It runs one call at
a time (``max_concurrency=1`` in its options), which is what keeps
association consistent when detectors and pipelined visits call at once. On
start, and so again after a restart, it reads its region back from the APDB's
Parquet files, which the detectors write after each association.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import ray

from ppray.apdb.backend import open_store
from ppray.apdb.service import ShardedAssociation, ShardRouter, load_shard
from ppray.apdb.shard import AssociationResult
from ppray.apdb.store import ApdbTables
from ppray.config import DeploymentConfig
from ppray.skyregion import Footprint

__all__ = ["ApdbShardActor", "RayAssociation", "router_for", "shard_name"]

log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    """The Ray actor name of APDB shard ``index``."""
    return f"apdb-{index}"


def router_for(config: DeploymentConfig) -> ShardRouter:
    """The deployment's shard layout."""
    return ShardRouter(config.apdb.n_shards, config.apdb.shard_nside)


class ApdbShardActor:
    """One sky shard of the APDB: preload, association, forced photometry."""

    def __init__(self, config: DeploymentConfig, index: int) -> None:
        config.s3.configure()  # how s3:// roots are reached, in this process
        start = time.perf_counter()
        self.index = index
        apdb = open_store(config.apdb, config.output_root)
        self.shard = load_shard(
            router_for(config),
            index,
            apdb,
            radius_arcsec=config.apdb.radius_arcsec,
            history_days=config.apdb.history_days,
        )
        self.load_s = time.perf_counter() - start
        log.info("APDB shard %d: %d DiaObjects loaded", index, self.shard.n_objects)

    def ready(self) -> dict[str, Any]:
        """Health: how many DiaObjects this shard holds and how long loading took."""
        return {
            "shard": self.index,
            "n_objects": self.shard.n_objects,
            "load_s": self.load_s,
            "pid": os.getpid(),
        }

    def preload(self, footprint: Footprint, mjd_tai: float) -> ApdbTables:
        return self.shard.preload(footprint, mjd_tai)

    def associate(self, dia_sources: pa.Table) -> AssociationResult:
        return self.shard.associate(dia_sources)

    def record_forced(self, dia_forced_sources: pa.Table) -> pa.Table:
        return self.shard.record_forced(dia_forced_sources)

    def snapshot(self) -> ApdbTables:
        return self.shard.snapshot()


class RayAssociation(ShardedAssociation):
    """The shard actors, found by name, called concurrently from a worker thread."""

    def __init__(self, config: DeploymentConfig) -> None:
        router = router_for(config)
        self.handles = [
            ray.get_actor(shard_name(k), namespace=config.namespace) for k in range(router.n_shards)
        ]

        def call(method: str, args: Mapping[int, tuple[Any, ...]]) -> dict[int, Any]:
            # Futures, not ray.get: the caller is a thread of an async actor, where
            # ray.get works but warns that it would block an event loop.
            futures = {
                k: getattr(self.handles[k], method).remote(*a).future() for k, a in args.items()
            }
            return {k: f.result() for k, f in futures.items()}

        super().__init__(router, call)
