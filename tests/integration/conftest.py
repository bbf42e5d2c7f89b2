"""Integration tests: one real local Ray for the whole session, loopback only."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ppray.config import DeploymentConfig, load_config
from ppray.testing.tansu import TansuBroker


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Metrics reach the Prometheus endpoint once per report interval (default 10 s; 1 s
    # is Ray's floor); each Ray process reads it when it starts, so before ray.init.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


def _test_config(root: Path) -> DeploymentConfig:
    """The embedded default, rooted in ``root``, in its own Ray namespace."""
    cfg = load_config(env={})
    return cfg.rooted_at(str(root)).with_overrides(
        namespace=f"test-{uuid.uuid4().hex[:8]}",
        sim={**cfg.sim.model_dump(), "time_scale": 0.005},
    )


@pytest.fixture
def config(tmp_path: Path) -> DeploymentConfig:
    """The embedded default, rooted in a temporary directory, in its own Ray namespace."""
    return _test_config(tmp_path)


@pytest.fixture(scope="module")
def running_config(tmp_path_factory: pytest.TempPathFactory) -> DeploymentConfig:
    """What :func:`running` deploys; a module narrows it by overriding this fixture."""
    return _test_config(tmp_path_factory.mktemp("running"))


@pytest.fixture(scope="module")
def running(ray_session: Any, running_config: DeploymentConfig) -> Iterator[tuple[Any, Any]]:
    """``running_config`` deployed on the session's Ray, with its simulator's reference
    data written, once for the module's tests (a deployment takes ~25 s of CPU to start).

    Yields ``(Deployment, SimulatedObservatory)``. The tests that share it each take
    visits of their own (``obs.visit(k)``, distinct ``k``) and count events from where
    they started; one that kills an actor leaves it restarted by Ray, which is what the
    next one then runs on. A test that needs its own configuration uses
    :func:`~tests.integration.cluster_helpers.simulated_deployment` (the same steps).
    """
    from .cluster_helpers import simulated_deployment

    with simulated_deployment(running_config) as running:
        yield running


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    """A Kafka-protocol broker (Tansu) on a free loopback port, for the module's tests."""
    with TansuBroker() as running:
        yield running


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server on loopback (binaries from the pgserver wheel)."""
    from ppray.testing.postgres import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Any]:
    """A real S3 server (SeaweedFS) on loopback with a ``raws`` bucket, and a ``locked``
    one that its scoped identity (a deployment's) may not read."""
    from ppray.testing.seaweed import SeaweedS3

    with SeaweedS3(buckets=["raws", "locked"], scoped=["raws"]) as server:
        yield server
