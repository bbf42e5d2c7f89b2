"""``ppray demo`` as a Ray job on a separately started Ray cluster (``ray start --head``).

The test process never connects to that cluster (it may hold the session's own local
Ray): jobs go through the Jobs API over HTTP, as from a laptop to a cluster.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ppray.config import load_config
from ppray.testing.raycluster import LocalRayCluster

from .cluster_helpers import JOB_CONFIG, REPO, check_demo_outputs, visits_done, wait_for_job

pytestmark = pytest.mark.integration

N_VISITS = 2
N_DETECTORS = 4  # the synthetic camera


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    # Two CPUs for the job supervisor and the driver; ppray's actors reserve none.
    with LocalRayCluster(num_cpus=2) as running:
        yield running
    assert not running.leftover_pids()


def test_job_config_joins_the_cluster() -> None:
    cfg = load_config(REPO / JOB_CONFIG, env={})
    assert cfg.ray_address == "auto"
    assert cfg.source.kind == "memory"
    assert cfg.sim.n_visits == N_VISITS


def test_ray_job_submit_cli(cluster: LocalRayCluster, tmp_path: Path) -> None:
    """The commands of the README: ``ray job submit``, then ``ray job status`` / ``logs``."""
    output = tmp_path / "job"
    address = ["--address", cluster.dashboard_url]
    # Run from the repository root: `--working-dir .` uploads it (minus .gitignore'd paths).
    command = ["ppray", "demo", "--config", JOB_CONFIG, "--output", str(output)]
    submitted = subprocess.run(
        cluster.ray_cli("job", "submit", *address, "--working-dir", ".", "--", *command),
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = submitted.stdout
    assert submitted.returncode == 0, f"{log[-4000:]}\n{submitted.stderr[-2000:]}"
    assert re.search(r"Job '\S+' succeeded", log), log[-3000:]
    # The driver joined this cluster instead of starting a Ray of its own.
    assert f"Ray dashboard: {cluster.dashboard_url}" in log
    check_demo_outputs(log, output, N_VISITS, N_DETECTORS)

    found = re.search(r"Job '(raysubmit_\w+)' submitted successfully", log)
    assert found, log[:2000]
    job_id = found.group(1)
    status = subprocess.run(
        cluster.ray_cli("job", "status", job_id, *address),
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout
    logs = subprocess.run(
        cluster.ray_cli("job", "logs", job_id, *address),
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert visits_done(logs.stdout) == N_VISITS


def test_python_jobs_api(
    cluster: LocalRayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``JobSubmissionClient``: submit, poll the status, read the logs."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the client checks its own env
    from ray.job_submission import JobStatus, JobSubmissionClient

    output = tmp_path / "job"
    client = JobSubmissionClient(cluster.dashboard_url)
    job_id = client.submit_job(
        entrypoint=f"ppray demo --config {JOB_CONFIG} --visits {N_VISITS} --output {output}",
        submission_id=f"ppray-test-{uuid.uuid4().hex[:8]}",
        # Uploaded like `--working-dir .`: .gitignore'd paths (.venv/, build/) stay here.
        runtime_env={"working_dir": str(REPO)},
    )
    status = wait_for_job(client, job_id, timeout_s=240)
    log = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"{status}:\n{log[-4000:]}"
    assert f"Ray dashboard: {cluster.dashboard_url}" in log
    check_demo_outputs(log, output, N_VISITS, N_DETECTORS)
    info = client.get_job_info(job_id)
    assert info.entrypoint.startswith("ppray demo")
