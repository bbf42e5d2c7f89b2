"""Killing ``ppray run`` between a visit's raws loses no alert and duplicates none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppray.config import DeploymentConfig
from ppray.kafka.client import ensure_topics
from ppray.kafka.publish import ObservatoryPublisher
from ppray.kafka.sinks import alert_id
from ppray.layout import visit_prefix
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import Storage
from ppray.testing.tansu import TansuBroker

from .cluster_helpers import wait_until
from .kafka_helpers import committed, kafka_deployment, read_topic

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def start_run(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with log.open("ab") as out:
        # Its own session: the kill takes the whole service down, its local Ray included.
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ppray.actors.cli",
                "run",
                "--config",
                str(config_file),
                "--max-visits",
                "1",
                "--idle-exit-s",
                "150",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_kill_between_raws_loses_and_duplicates_no_alert(
    config: DeploymentConfig, broker: TansuBroker, tmp_path: Path
) -> None:
    cfg = kafka_deployment(config, broker)
    kafka = cfg.kafka
    assert kafka is not None
    config_file = tmp_path / "kafka.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ensure_topics(kafka)
    observatory = SimulatedObservatory(cfg)
    observatory.write_reference_data()
    visit = observatory.visit(0)
    out = Storage(cfg.output_root)
    markers = [f"_published/alerts/{visit_prefix(visit)}/{d}.json" for d in observatory.detectors]
    log = tmp_path / "run.log"
    publisher = ObservatoryPublisher(kafka)
    keys = observatory.raw_keys(visit, 0)
    first, rest = observatory.detectors[:2], observatory.detectors[2:]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        run = start_run(config_file, log)
        procs.append(run)
        publisher.next_visit(visit)
        observatory.expose(visit, 0, detectors=tuple(first))
        publisher.raws_written(keys[:2])

        def first_published() -> bool:
            assert run.poll() is None, f"ppray run ended early:\n{log.read_text()[-3000:]}"
            return all(out.exists(m) for m in markers[:2])

        # The markers are written once a detector's alerts are published: they stay.
        wait_until(
            first_published,
            240,
            f"the alerts of {first} published (their markers written)",
            poll_s=0.5,
            detail=lambda: log.read_text()[-3000:],
        )
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(30)
        before = read_topic(kafka, kafka.topics.alerts)
        assert before, "the first run published no alert: nothing to test"
        position, _ = committed(kafka, kafka.topics.next_visit)
        assert not position, "next_visit committed before its visit was done"

        # The rest of the visit's raws land while the service is down.
        observatory.expose(visit, 0, detectors=tuple(rest))
        publisher.raws_written(keys[2:])
        rerun = start_run(config_file, log)
        procs.append(rerun)
        assert rerun.wait(240) == 0, log.read_text()[-3000:]
    finally:
        publisher.close()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    assert "1 visits done" in log.read_text()
    summary = out.read_json(f"{visit_prefix(visit)}/summary.json")
    assert summary["n_ok"] == 4, summary
    alerts = read_topic(kafka, kafka.topics.alerts)
    ids = [alert_id(r.value, confluent=True) for r in alerts]
    assert len(ids) == len(set(ids)), "an alert was published twice"
    assert len(ids) == summary["n_alerts"], "an alert was lost"
    # The first run's alerts were kept, not re-sent, by the restarted service.
    assert [r.value for r in alerts[: len(before)]] == [r.value for r in before]
    published = {i for m in markers for i in json.loads(out.read_bytes(m))["diaSourceIds"]}
    assert published == set(ids)
