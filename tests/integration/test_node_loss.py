"""Losing a whole worker node mid-run: its detectors move to the other node, no visit fails.

A head and two worker nodes on loopback (:class:`LocalRayCluster`); ``ppray demo`` runs
as a Ray job whose detector workers may only run on the worker nodes (custom resource
``detector``) and whose coordinator, aggregator and APDB shards stay on the head
(resource ``head``), so that losing a worker node loses detector workers and nothing
else. Once the first visit is done, with the others in flight, the worker node holding
the most detectors is killed (SIGKILL to all its processes, like a machine that died).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from ppray.config import DeploymentConfig, load_config
from ppray.instrument import load_instrument
from ppray.testing.raycluster import LocalRayCluster, RayNode

from .cluster_helpers import (
    JOB_CONFIG,
    REPO,
    read_summaries,
    visits_done,
    wait_for_job,
    wait_until,
)

# Three Ray nodes, a job and a node's worth of actor restarts on two shared cores:
# a minute when the machine is quiet, three when it is busy.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_VISITS = 3
# 3.5 s between visits (35 s simulated): the later visits are still to come, or in
# flight, when the first is done and the node is killed.
TIME_SCALE = 0.1
# The GCS declares a node dead after this many missed health checks, 1 s apart (the
# default, 5 x 3 s, would add ~10 s to the test).
HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}

T = TypeVar("T")


def write_config(path: Path, namespace: str) -> Path:
    """``ray-job.yaml`` with detectors on ``detector`` nodes and the rest on the head."""
    raw = yaml.safe_load((REPO / JOB_CONFIG).read_text())
    raw["namespace"] = namespace
    raw["sim"] = {**raw["sim"], "n_visits": N_VISITS, "time_scale": TIME_SCALE}
    raw["worker"] = {**raw["worker"], "resources": {"detector": 1}}
    defaults = DeploymentConfig()
    for section in ("coordinator", "aggregator", "apdb_shard"):
        # A section given in YAML replaces the default one: keep its other options.
        options = getattr(defaults, section).model_dump()
        raw[section] = {**options, "resources": {"head": 1}}
    path.write_text(yaml.safe_dump(raw))
    load_config(path, env={})  # fail here, not in the job, if it is invalid
    return path


def job_actors(
    cluster: LocalRayCluster, namespace: str, class_name: str | None = None
) -> dict[str, dict[str, Any]]:
    """The job's named actors (of ``class_name``) by name, as the state API reports them.

    An actor Ray restarted keeps its id and name: its row says where it runs now and
    how often it was restarted.
    """
    filters = {"class_name": class_name} if class_name else {}
    return {
        a["name"]: a
        for a in cluster.list_state("actors", **filters)
        if a.get("ray_namespace") == namespace and a.get("name")
    }


def detector_actors(cluster: LocalRayCluster, namespace: str) -> dict[str, dict[str, Any]]:
    return job_actors(cluster, namespace, "DetectorWorker")


def test_visits_survive_losing_a_worker_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the Jobs client checks its own env
    from ray.job_submission import JobStatus, JobSubmissionClient

    namespace = f"node-loss-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path / "node-loss.yaml", namespace)
    detectors = load_instrument(load_config(config, env={}).instrument).detector_names
    output = tmp_path / "job"
    with LocalRayCluster(num_cpus=1, resources={"head": 100}, env=HEALTH_CHECKS) as cluster:
        # Room for every detector on each node: the survivor takes the lost ones in.
        room = {"detector": len(detectors)}
        workers = [cluster.add_node(num_cpus=1, resources=room, wait=False) for _ in range(2)]
        for node in workers:
            cluster.wait_for_node(node)
        client = JobSubmissionClient(cluster.dashboard_url)
        job_id = client.submit_job(
            entrypoint=f"ppray demo --config {config} --output {output}",
            submission_id=f"ppray-node-loss-{uuid.uuid4().hex[:8]}",
        )

        def first_visit_done() -> str:
            log: str = client.get_job_logs(job_id)
            if client.get_job_status(job_id).is_terminal():
                raise AssertionError(f"job ended before the node was lost:\n{log[-4000:]}")
            return log if "visit_done" in log else ""

        log = wait_until(first_visit_done, 240, "the first visit done", poll_s=0.5)
        assert visits_done(log) < N_VISITS, "no visit left in flight to lose"
        head_id = cluster.node_id("head")
        others = {n: a["node_id"] for n, a in job_actors(cluster, namespace).items()}
        others = {n: nid for n, nid in others.items() if not n.startswith("detector-")}
        assert others and set(others.values()) == {head_id}, others
        node_ids = {cluster.node_id(n): n for n in workers}
        placed = {name: a["node_id"] for name, a in detector_actors(cluster, namespace).items()}
        assert len(placed) == len(detectors) and set(placed.values()) <= set(node_ids)
        on_node: dict[str, list[str]] = {nid: [] for nid in node_ids}
        for name, nid in placed.items():
            on_node[nid].append(name)
        victim_id = max(on_node, key=lambda nid: len(on_node[nid]))
        victim: RayNode = node_ids[victim_id]
        survivor_id = next(nid for nid in node_ids if nid != victim_id)
        lost = sorted(on_node[victim_id])

        cluster.kill_node(victim)

        def moved() -> bool:
            actors = detector_actors(cluster, namespace)
            return all(
                actors[name]["state"] == "ALIVE" and actors[name]["node_id"] == survivor_id
                for name in lost
            )

        wait_until(moved, 120, f"{lost} alive again on {node_ids[survivor_id].name}", poll_s=0.5)
        assert victim.name not in cluster.alive_node_names()

        status = wait_for_job(client, job_id, timeout_s=300)
        log = client.get_job_logs(job_id)
        summaries = read_summaries(output / "out")
        assert len(summaries) == N_VISITS, log[-4000:]
        for summary in summaries:
            assert summary.detectors == dict.fromkeys(detectors, "ok"), (
                f"{summary.group_id}: {summary.reasons}"
            )
        assert status == JobStatus.SUCCEEDED, f"{status}:\n{log[-4000:]}"
        final = detector_actors(cluster, namespace)
        for name in lost:
            assert int(final[name]["num_restarts"]) >= 1, final[name]
            assert final[name]["node_id"] == survivor_id, final[name]
    assert not cluster.leftover_pids()
