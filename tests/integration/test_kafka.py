"""Kafka in and out against a real broker (Tansu): visits, alerts, metrics, events, dead letters."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
from lsst.alert.packet import SchemaRegistry
from ppray.actors.runtime import Deployment

from ppray.alerts.packet import deserialize_alert, validate_alert
from ppray.config import DeploymentConfig
from ppray.instrument import load_instrument
from ppray.kafka.client import ensure_topics
from ppray.kafka.publish import ObservatoryPublisher, play_to_kafka, s3_notification
from ppray.kafka.sinks import JsonPublisher, alert_id, dead_letter_record, event_record
from ppray.kafka.source import KafkaSource
from ppray.messages import NextVisit
from ppray.schema import load_alert_schema
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import Storage
from ppray.testing.postgres import PostgresServer
from ppray.testing.seaweed import SeaweedS3
from ppray.testing.tansu import TansuBroker

from .cluster_helpers import apdb_contents, pump_visits, restarted, simulated_deployment
from .kafka_helpers import committed, kafka_deployment, read_topic

pytestmark = pytest.mark.integration


def _bad_messages(publisher: ObservatoryPublisher, visit: NextVisit) -> None:
    """Malformed JSON, a next_visit without a field, an unknown detector, a traversal key,
    raws outside raw_root's bucket and prefix."""
    publisher.send_next_visit_bytes(b'{"salIndex": 2, "groupId": ')
    record = visit.model_dump(mode="json")
    del record["filters"]
    record["groupId"] = "missing-filters"
    publisher.send_next_visit_bytes(json.dumps(record).encode())
    oid = "SY_O_20260101_000001"
    unknown = f"Synthetic/20260101/{oid}/{oid}_R99_S99.fits"
    traversal = f"Synthetic/20260101/../../../etc/{oid}/{oid}_R22_S00.fits"
    bucket, prefix = publisher.bucket, publisher.prefix
    for key in (unknown, traversal):
        note = s3_notification(bucket, [f"{prefix}/{key}"])
        publisher.send_notification_bytes(json.dumps(note).encode())
    # A raw of another bucket, and one outside raw_root's prefix: not ours to read.
    good = f"Synthetic/20260101/{oid}/{oid}_R22_S00.fits"
    for note in (s3_notification("other-bucket", [f"{prefix}/{good}"]),
                 s3_notification(bucket, [f"elsewhere/{good}"])):  # fmt: skip
        publisher.send_notification_bytes(json.dumps(note).encode())


def test_visits_through_kafka(
    ray_session: Any,
    config: DeploymentConfig,
    broker: TansuBroker,
    postgres: PostgresServer,
    seaweed: SeaweedS3,
) -> None:
    """Rubin's interfaces end to end: next_visit and bucket notifications from Kafka,
    raws read from a real S3 server, alerts to Kafka in Rubin's framing, the APDB on a
    real PostgreSQL server."""
    run = uuid.uuid4().hex[:12]
    db_url = postgres.create_database(f"apdb_{run}")
    cfg = kafka_deployment(config, broker).with_overrides(
        apdb={**config.apdb.model_dump(), "db_url": db_url},
        raw_root=f"s3://raws/{run}",
        s3={
            "endpoint_url": seaweed.endpoint,
            "region": "us-east-1",
            # Its own rights only: the raws bucket, not the locked one.
            "access_key_id": seaweed.scoped_access_key,
            "secret_access_key": seaweed.scoped_secret_key,
        },
    )
    kafka = cfg.kafka
    assert kafka is not None
    ensure_topics(kafka)
    instrument = load_instrument(cfg.instrument)
    with simulated_deployment(cfg) as (dep, observatory), contextlib.ExitStack() as closing:
        publisher = closing.enter_context(
            contextlib.closing(ObservatoryPublisher(kafka, cfg.raw_root))
        )
        events = closing.enter_context(
            contextlib.closing(JsonPublisher(kafka, kafka.topics.events))
        )
        dead = closing.enter_context(
            contextlib.closing(JsonPublisher(kafka, kafka.topics.dead_letter))
        )
        source = closing.enter_context(
            contextlib.closing(
                KafkaSource(
                    kafka, cfg.raw_root, instrument=instrument, detectors=instrument.detector_names
                )
            )
        )

        def bad_after_first(kind: str, visit: NextVisit, n: int) -> None:
            # The bad messages land between the visits: the next good visit must still complete.
            if kind == "expose" and visit.private_seqNum == 0:
                _bad_messages(publisher, visit)

        visits: list[NextVisit] = []
        player = threading.Thread(
            target=lambda: visits.extend(
                play_to_kafka(observatory, publisher, 2, time_scale=0.0, on_message=bad_after_first)
            )
        )
        player.start()
        held, _ = pump_visits(
            dep,
            source,
            2,
            timeout_s=240,
            on_event=lambda e: events.send([event_record(e)], flush=False),
            on_rejected=lambda item: dead.send([dead_letter_record(item)]),
        )
        player.join(60)
        assert not player.is_alive(), "the player still publishing after its 2 visits were done"
        summaries = [dep.wait_visit(v, 5.0) for v in visits]
        # The raws were in the S3 bucket, and only there.
        assert len(Storage(cfg.raw_root).list(suffix=".fits")) == 2 * 4
        assert not list(Path(config.raw_root).rglob("*.fits"))
        stored = check_apdb_and_rerun(dep, observatory, visits[-1], db_url)
        extra_alerts = check_bad_s3_raws(dep, observatory, cfg.raw_root, seaweed)
    assert len(held) == 0
    assert len(summaries) == 2
    n_alerts = 0
    for summary in summaries:
        assert summary is not None and (summary.n_ok, summary.n_expected) == (4, 4)
        n_alerts += summary.n_alerts
    assert n_alerts > 0

    assert stored["DiaSource"]["diaSourceId"].nunique() == sum(s.n_dia_sources for s in summaries)

    # Alerts: one message each as Rubin sends them (no key, a producer_timestamp header,
    # the Confluent frame), decoded as a broker would: the schema id from the frame,
    # the schema by that id from lsst-alert-packet's own registry.
    alerts = read_topic(kafka, kafka.topics.alerts)
    assert len(alerts) == n_alerts + extra_alerts
    registry = SchemaRegistry.all_schemas_from_filesystem()
    schema = load_alert_schema()
    ids = []
    for record in alerts:
        assert record.key is None
        stamp = dict(record.headers)["producer_timestamp"]
        assert abs(int(stamp) / 1000 - time.time()) < 3600
        magic, schema_id = struct.unpack(">bI", record.value[:5])
        assert (magic, schema_id) == (0, 1101)
        decoded = registry.get_by_id(schema_id).deserialize(record.value[5:])
        assert decoded == deserialize_alert(record.value, schema=schema)
        validate_alert(decoded, schema)
        assert decoded["diaSourceId"] == decoded["diaSource"]["diaSourceId"]
        ids.append(decoded["diaSourceId"])
    assert len(set(ids)) == len(ids)
    assert ids == [alert_id(r.value, confluent=True) for r in alerts]

    # Metrics: per detector and per visit.
    metrics = [json.loads(r.value) for r in read_topic(kafka, kafka.topics.metrics)]
    assert len(metrics) == 2 * (4 + 1)
    per_visit = [m for m in metrics if m["level"] == "visit"]
    assert sorted(m["n_alerts"] for m in per_visit) == sorted(s.n_alerts for s in summaries if s)
    for m in metrics:
        assert m["schema"] == "ppray.metrics/1"
        assert m["psf_fwhm_arcsec"] > 0
        assert m["latency_since_last_raw_s"] is not None
        assert "isr" in m["timings_s"]
    assert all(m["zero_point_mag"] is not None for m in metrics if m["level"] == "detector")

    # Events: the lifecycle, as JSON.
    kinds = {json.loads(r.value)["kind"] for r in read_topic(kafka, kafka.topics.events)}
    assert {"visit_accepted", "preloaded", "raw_arrived", "processed", "visit_done"} <= kinds

    # Dead letters: each bad message with its reason and its original bytes.
    letters = [json.loads(r.value) for r in read_topic(kafka, kafka.topics.dead_letter)]
    errors = sorted(d["error"] for d in letters)
    assert len(letters) == 6, errors
    assert any("not valid JSON" in e for e in errors)
    assert any("bucket 'other-bucket' is not raw_root's" in e for e in errors)
    assert any("is outside raw_root" in e for e in errors)
    assert any("'filters'" in e and "Field required" in e for e in errors)
    assert any("no detector 'R99_S99'" in e for e in errors)
    assert any("'..'" in e for e in errors)
    for letter in letters:
        assert letter["schema"] == "ppray.dead_letter/1"
        assert base64.b64decode(letter["original_b64"])
        assert letter["origin"].startswith(kafka.topics.next_visit) or letter["origin"].startswith(
            kafka.topics.raw_arrival
        )

    # At-least-once: everything consumed was committed once its visit was done.
    for topic in (kafka.topics.next_visit, kafka.topics.raw_arrival):
        position, end = committed(kafka, topic)
        assert position == end, topic


def check_bad_s3_raws(
    dep: Deployment, observatory: SimulatedObservatory, raw_root: str, seaweed: SeaweedS3
) -> int:
    """A raw missing from the bucket, one truncated there, one the deployment may not
    read: each its detector's failed result with a clear reason (retriable, not, not);
    the worker then does the next visit. Returns how many alerts that visit sent."""
    detector = observatory.detectors[1]
    worker = dep.workers[detector]
    bucket = Storage(raw_root)

    def run(visit: NextVisit, raws: list[Any]) -> Any:
        ray.get(worker.prepare.remote(visit))
        for raw in raws:
            ray.get(worker.raw_arrived.remote(raw))
        return ray.get(worker.result.remote(visit), timeout=180)

    missing_visit, truncated_visit, denied_visit, next_visit = (
        observatory.visit(k) for k in (5, 6, 7, 8)
    )
    raw = observatory.expose(missing_visit, detectors=(detector,))[0]
    key = raw.uri.removeprefix(raw_root.rstrip("/") + "/")
    bucket.delete(key)
    missing = run(missing_visit, [raw])
    assert (missing.status, missing.retriable) == ("failed", True), missing
    assert "no such object" in missing.reason and key in missing.reason
    raw = observatory.expose(truncated_visit, detectors=(detector,))[0]
    key = raw.uri.removeprefix(raw_root.rstrip("/") + "/")
    bucket.write_bytes(key, bucket.read_bytes(key)[:10_000])
    truncated = run(truncated_visit, [raw])
    assert (truncated.status, truncated.retriable) == ("failed", False), truncated
    assert f"raw for {detector}" in truncated.reason
    # The object store refuses the deployment's credentials this object (S3's
    # AccessDenied): not worth a retry, the refusal names the object.
    raw = observatory.expose(denied_visit, detectors=(detector,))[0]
    key = raw.uri.removeprefix(raw_root.rstrip("/") + "/")
    with seaweed.filesystem().open_output_stream(f"locked/{key}") as out:
        out.write(bucket.read_bytes(key))
    denied = run(denied_visit, [raw.model_copy(update={"uri": f"s3://locked/{key}"})])
    assert (denied.status, denied.retriable) == ("failed", False), denied
    assert "refused by the object store" in denied.reason and key in denied.reason
    fine = run(next_visit, observatory.expose(next_visit, detectors=(detector,)))
    assert fine.status == "ok", fine.reason
    return int(fine.n_alerts)


def check_apdb_and_rerun(
    dep: Deployment, observatory: SimulatedObservatory, visit: NextVisit, db_url: str
) -> dict[str, Any]:
    """The PostgreSQL APDB, read with lsst.dax.apdb's API, holds exactly what the shards
    hold; a detector run again (its worker restarted, the visit's raws again) leaves it
    unchanged. Returns its contents."""
    held = ray.get([s.snapshot.remote() for s in dep.apdb_shards])
    stored = apdb_contents(db_url)
    for name, key, table in (
        ("DiaObject", "diaObjectId", "dia_objects"),
        ("DiaSource", "diaSourceId", "dia_sources"),
        ("DiaForcedSource", "diaForcedSourceId", "dia_forced_sources"),
    ):
        want = sorted(i for h in held for i in getattr(h, table)[key].to_pylist())
        assert stored[name][key].tolist() == want, name
    detector = observatory.detectors[0]
    worker = dep.workers[detector]
    old = ray.get(worker.ready.remote())
    ray.kill(worker, no_restart=False)
    restarted(worker, old["pid"])
    ray.get(worker.prepare.remote(visit))
    for raw in observatory.expose(visit, detectors=(detector,)):
        ray.get(worker.raw_arrived.remote(raw))
    result = ray.get(worker.result.remote(visit), timeout=180)
    assert result.status == "ok", result.reason
    assert result.metrics.get("n_alerts", 0) > 0  # it did run the visit's alerts again
    again = apdb_contents(db_url)
    for name, frame in stored.items():
        pd.testing.assert_frame_equal(again[name], frame, check_exact=True, obj=name)
    return stored


def test_simulate_publishes_to_kafka(broker: TansuBroker, tmp_path: Any) -> None:
    """``ppray simulate --kafka`` as a user runs it: next_visit and one notification per raw."""
    import os
    import subprocess
    import sys

    from ppray.messages import parse_message
    from ppray.rawkeys import parse_s3_notification, sidecar_key

    name = f"sim{time.monotonic_ns() % 10**8}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.update({f"PPRAY_KAFKA__TOPICS__{t.upper()}": f"{name}.{t}" for t in TOPICS})
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "ppray.actors.cli", "simulate", "--config",
         "configs/deployments/kafka.yaml", "--kafka", broker.bootstrap,
         "--output", str(tmp_path), "--visits", "1"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    kafka = broker.config()
    visits = read_topic(kafka, f"{name}.next_visit")
    assert len(visits) == 1
    visit = parse_message("next_visit", visits[0].value)
    notes = read_topic(kafka, f"{name}.raw_arrival")
    keys = [k for n in notes for k in parse_s3_notification(n.value.decode())]
    assert len(keys) == 4  # one raw per detector of the synthetic camera
    for key in keys:
        assert (tmp_path / "raw" / key).exists()
        sidecar = json.loads((tmp_path / "raw" / sidecar_key(key)).read_text())
        assert sidecar["GROUPID"] == visit.groupId


def test_simulate_writes_raws_to_s3_and_announces_them(
    broker: TansuBroker, seaweed: SeaweedS3, tmp_path: Any
) -> None:
    """``ppray simulate --kafka`` with an s3:// raw_root, configured from the environment
    only (the secret too): raws and sidecars in the bucket, notifications as S3 sends them
    (the bucket, the whole key)."""
    import os
    import subprocess
    import sys

    from ppray.config import S3Config
    from ppray.rawkeys import parse_s3_records, sidecar_key

    name = f"sims3{time.monotonic_ns() % 10**8}"
    root = f"s3://raws/{name}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PPRAY_RAW_ROOT": root,
           "PPRAY_S3__ENDPOINT_URL": seaweed.endpoint, "PPRAY_S3__REGION": "us-east-1",
           "PPRAY_S3__ACCESS_KEY_ID": seaweed.access_key,
           "PPRAY_S3__SECRET_ACCESS_KEY": seaweed.secret_key}  # fmt: skip
    env.update({f"PPRAY_KAFKA__TOPICS__{t.upper()}": f"{name}.{t}" for t in TOPICS})
    for local in ("OUTPUT_ROOT", "CALIB_ROOT", "REFCAT_ROOT", "TEMPLATE_ROOT"):
        env[f"PPRAY_{local}"] = str(tmp_path / local.lower())
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "ppray.actors.cli", "simulate", "--config",
         str(repo / "configs/deployments/kafka.yaml"), "--kafka", broker.bootstrap,
         "--visits", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert seaweed.secret_key not in done.stdout + done.stderr
    notes = read_topic(broker.config(), f"{name}.raw_arrival")
    records = [r for n in notes for r in parse_s3_records(n.value.decode())]
    assert len(records) == 4 and {b for b, _ in records} == {"raws"}
    S3Config(
        endpoint_url=seaweed.endpoint,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
    ).configure()
    bucket = Storage("s3://raws")
    for _, key in records:
        assert key.startswith(f"{name}/")
        assert bucket.read_bytes(key)[:6] == b"SIMPLE"
        assert json.loads(bucket.read_bytes(sidecar_key(key)))["GROUPID"]
    assert not list(Path(tmp_path).rglob("*_R??_S??.fits"))  # no raw on local disk


TOPICS = ("next_visit", "raw_arrival", "alerts", "metrics", "events", "dead_letter")
