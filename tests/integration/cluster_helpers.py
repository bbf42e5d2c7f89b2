"""Helpers for the tests that run ppray as a Ray job on a :class:`LocalRayCluster`."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import ray
from ppray.actors.runtime import Deployment, deploy, pump

from ppray.config import DeploymentConfig
from ppray.messages import Event, VisitSummary
from ppray.messaging import AckLedger, EventSource, Inbound
from ppray.sim.observatory import SimulatedObservatory

REPO = Path(__file__).resolve().parents[2]
JOB_CONFIG = "configs/deployments/ray-job.yaml"
# The driver's own progress line for a finished visit (actors' log lines, which Ray
# also copies into a job's output, never start like this).
T = TypeVar("T")
VISIT_DONE = re.compile(r"^\[\s*[\d.]+s\] visit_done ", re.MULTILINE)


def visits_done(log: str) -> int:
    """How many ``visit_done`` progress lines ``ppray demo`` printed."""
    return len(VISIT_DONE.findall(log))


def read_summaries(output_root: Path) -> list[VisitSummary]:
    """The ``summary.json`` of every visit under ``output_root`` (the config's ``out/``)."""
    return [
        VisitSummary.model_validate(json.loads(path.read_text()))
        for path in sorted(output_root.rglob("summary.json"))
    ]


def visit_table(log: str) -> list[list[str]]:
    """The rows of the visit table ``ppray demo`` prints at the end, split into columns.

    Columns: group, exposure, det ok/all, failed, t/o, sources, dia, alerts, latency_s.
    """
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("group ")]
    assert starts, f"no visit table in the job's output:\n{log[-3000:]}"
    rows = []
    for line in lines[starts[-1] + 2 :]:
        cols = line.split()
        if len(cols) != 9:
            break
        rows.append(cols)
    return rows


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    poll_s: float,
    detail: Callable[[], str] | None = None,
) -> T:
    """``predicate()``'s first true value, polled every ``poll_s``; fails after ``timeout_s``.

    The failure says ``what`` was awaited, and ``detail()`` (what was seen last) if given.
    Wait on states that last once reached (a counter, a new pid, an event in the log, a
    file written): a short-lived one can come and go between two polls.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    message = f"not within {timeout_s:.0f} s: {what}"
    if detail is not None:
        message += f"\n{detail()}"
    raise AssertionError(message)


def pump_visits(
    dep: Deployment,
    source: EventSource,
    n_visits: int,
    timeout_s: float,
    on_event: Callable[[Event], None] | None = None,
    on_rejected: Callable[[Inbound], None] | None = None,
) -> tuple[AckLedger, list[Event]]:
    """:func:`~ppray.actors.runtime.pump` until the coordinator's event log holds
    ``n_visits`` ``visit_done`` events; fails after ``timeout_s`` saying how many came.

    Returns the acks still held and every event the pump passed on, in order.
    """
    events: list[Event] = []
    deadline = time.monotonic() + timeout_s

    def stop() -> bool:
        done = sum(e.kind == "visit_done" for e in events)
        if done >= n_visits:
            return True
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not within {timeout_s:.0f} s: {n_visits} visit_done events (got {done}); "
                f"events: {[e.kind for e in events][-40:]}"
            )
        return False

    def record(event: Event) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event)

    held = pump(dep, source, stop=stop, on_event=record, on_rejected=on_rejected)
    return held, events


def wait_for_job(client: Any, job_id: str, timeout_s: float, poll_s: float = 1.0) -> Any:
    """Poll ``get_job_status`` until the job is over, and return that status (a
    ``ray.job_submission.JobStatus``); after ``timeout_s`` stop it and fail, with its log."""
    try:
        return wait_until(
            lambda: (status := client.get_job_status(job_id)).is_terminal() and status,
            timeout_s,
            f"job {job_id} over",
            poll_s=poll_s,
            detail=lambda: client.get_job_logs(job_id)[-4000:],
        )
    except AssertionError:
        client.stop_job(job_id)
        raise


def check_demo_outputs(log: str, output: Path, n_visits: int, n_detectors: int) -> None:
    """Assert that a ``ppray demo`` job processed every visit fully and wrote its outputs.

    Reads both what the job printed (``log``) and what it wrote under ``output``.
    """
    assert visits_done(log) == n_visits, log[-3000:]
    rows = visit_table(log)
    assert len(rows) == n_visits, log[-3000:]
    for row in rows:
        assert row[2] == f"{n_detectors}/{n_detectors}", row
    printed_alerts = sum(int(row[7]) for row in rows)
    assert printed_alerts > 0

    out = output / "out"
    summaries = read_summaries(out)
    assert len(summaries) == n_visits
    for summary in summaries:
        assert summary.n_ok == summary.n_expected == n_detectors, summary.reasons
    assert sum(s.n_alerts for s in summaries) == printed_alerts
    assert len(list(out.rglob("sources.parquet"))) == n_visits * n_detectors
    # One Avro container of alerts per visit and detector.
    assert len(list((out / "alerts").rglob("*.avro"))) == n_visits * n_detectors


@contextlib.contextmanager
def deployed(config: DeploymentConfig) -> Iterator[Deployment]:
    """A deployment of ``config`` for one test, shut down however the test ends.

    For tests that need another configuration than :func:`running`'s.
    """
    dep = deploy(config)
    try:
        yield dep
    finally:
        dep.shutdown()


@contextlib.contextmanager
def simulated_deployment(
    config: DeploymentConfig,
) -> Iterator[tuple[Deployment, SimulatedObservatory]]:
    """The simulator's reference data written, then :func:`deployed`: ``(dep, observatory)``.

    What the ``running`` fixture yields; for a test that needs another configuration.
    """
    observatory = SimulatedObservatory(config)
    observatory.write_reference_data()
    with deployed(config) as dep:
        yield dep, observatory


def restarted(actor: Any, old_pid: int, timeout_s: float = 90.0) -> dict[str, Any]:
    """The actor's ``ready()`` once a new process serves it (the kill takes a moment)."""

    def new_process() -> dict[str, Any] | None:
        try:
            status: dict[str, Any] = ray.get(actor.ready.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return None  # between the old process dying and the new one starting
        return status if status["pid"] != old_pid else None

    status: dict[str, Any] = wait_until(
        new_process, timeout_s, f"the actor answering from a process other than {old_pid}", 0.1
    )
    return status


def apdb_contents(db_url: str) -> dict[str, Any]:
    """Everything in a Rubin APDB, read with ``lsst.dax.apdb``'s own API, as a downstream
    user would: the open DiaObject versions, and all their DiaSources and
    DiaForcedSources; pandas frames sorted by id."""
    from astropy.time import Time
    from lsst.dax.apdb import Apdb
    from lsst.dax.apdb.sql import ApdbSqlConfig
    from lsst.sphgeom import Circle

    config = ApdbSqlConfig(db_url=db_url)
    config.connection_config.connection_pool = False
    apdb = Apdb.from_config(config)
    everywhere = Circle.full()
    objects = apdb.getDiaObjects(everywhere)
    ids = objects["diaObjectId"].tolist()
    epoch = Time(0.0, format="mjd", scale="tai")  # the whole history
    frames = {
        "DiaObject": (objects, "diaObjectId"),
        "DiaSource": (apdb.getDiaSources(everywhere, ids, epoch, epoch), "diaSourceId"),
        "DiaForcedSource": (
            apdb.getDiaForcedSources(everywhere, ids, epoch, epoch),
            "diaForcedSourceId",
        ),
    }
    return {
        name: frame.sort_values(key).reset_index(drop=True) for name, (frame, key) in frames.items()
    }
