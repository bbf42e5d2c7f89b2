"""The pure parts of the Kafka adapters: no broker, no Ray."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import fastavro
import pytest

from ppray.config import load_config
from ppray.config.kafka import KafkaConfig
from ppray.errors import RetriableError, ValidationFailure
from ppray.instrument import load_instrument
from ppray.kafka.publish import s3_notification
from ppray.kafka.sinks import (
    KafkaAlertSink,
    alert_id,
    dead_letter_record,
    event_record,
    metrics_records,
)
from ppray.kafka.source import KafkaSource, OffsetTracker, RawResolver
from ppray.messages import DetectorResult, Event, NextVisit, RawArrival, parse_message
from ppray.messaging import AckLedger, Inbound
from ppray.rawkeys import (
    parse_raw_key,
    parse_s3_notification,
    raw_key,
    relative_raw_key,
    sidecar_key,
)
from ppray.schema import load_alert_schema
from ppray.storage import Storage
from ppray.visit.aggregate import summarize_visit

from .helpers import next_visit
from .helpers import sal_next_visit as next_visit_record


def test_alert_id_reads_the_leading_long() -> None:
    assert load_alert_schema().definition["fields"][0]["name"] == "diaSourceId"
    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "A",
            "fields": [{"name": "diaSourceId", "type": "long"}, {"name": "x", "type": "string"}],
        }
    )
    for value in (0, 1, -1, 63, 64, 2**40 + 5, 2**62, -(2**63)):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, {"diaSourceId": value, "x": "cutouts"})
        assert alert_id(buf.getvalue()) == value
        assert alert_id(b"\x00\x00\x00\x00\x07" + buf.getvalue(), confluent=True) == value
    with pytest.raises(ValueError, match="truncated"):
        alert_id(b"\x80")


def test_offsets_commit_only_up_to_the_first_unacked() -> None:
    t = OffsetTracker()
    tp = ("nv", 0)
    for offset in (5, 6, 7):
        t.delivered(tp, offset)
    assert t.committable() == {tp: 5}
    t.acked(tp, 6)
    assert t.committable() == {tp: 5}
    t.mark_committed({tp: 5})
    assert t.committable() == {}
    t.acked(tp, 5)
    assert t.committable() == {tp: 7}
    t.acked(tp, 7)
    assert t.committable() == {tp: 8}
    t.forget([tp])
    assert t.committable() == {}


def test_ack_ledger_holds_until_the_visit_is_over() -> None:
    visit = NextVisit.model_validate(next_visit_record())
    acked: list[str] = []
    ledger = AckLedger()
    ledger.after_submit(
        Inbound("next_visit", visit, ack=lambda: acked.append("nv")), ["visit_accepted"]
    )
    ledger.after_submit(
        Inbound("next_visit", visit, ack=lambda: acked.append("dup")), ["visit_duplicate"]
    )
    ledger.after_submit(
        Inbound("next_visit", error="bad", ack=lambda: acked.append("bad")), ["rejected"]
    )
    assert acked == ["dup", "bad"] and len(ledger) == 1
    key = {"instrument": visit.instrument, "group_id": visit.groupId}
    ledger.on_event(Event(kind="timed_out", detector="R22_S00", **key))
    assert len(ledger) == 1
    ledger.on_event(Event(kind="visit_done", **key))
    assert acked == ["dup", "bad", "nv"] and len(ledger) == 0


def test_ack_ledger_keeps_a_visit_with_retriable_failures_unacked() -> None:
    visit = NextVisit.model_validate(next_visit_record())
    acked: list[str] = []
    ledger = AckLedger()
    ledger.after_submit(
        Inbound("next_visit", visit, ack=lambda: acked.append("nv")), ["visit_accepted"]
    )
    key = {"instrument": visit.instrument, "group_id": visit.groupId}
    ledger.on_event(Event(kind="visit_done", data={"n_retriable": 1}, **key))
    assert acked == [] and len(ledger) == 0  # not durable: re-delivered after a restart


def test_ack_ledger_releases_buffered_raws_that_expired() -> None:
    raw = RawArrival.model_validate(
        {"instrument": "Synthetic", "group_id": "g1", "detector": "R22_S00",
         "uri": "file:///r.fits", "exposure_id": 1, "arrived_at": 0.0}
    )  # fmt: skip
    acked: list[str] = []
    ledger = AckLedger()
    ledger.after_submit(Inbound("raw_arrival", raw, ack=lambda: acked.append("raw")),
                        ["raw_buffered"])  # fmt: skip
    key = {"instrument": "Synthetic", "group_id": "g1"}
    ledger.on_event(Event(kind="raw_rejected", detector="R22_S00", data={"expired": False}, **key))
    assert acked == []  # rejected for another reason: the visit may still come
    ledger.on_event(Event(kind="raw_rejected", detector="R22_S00", data={"expired": True}, **key))
    assert acked == ["raw"] and len(ledger) == 0


def test_secrets_never_printed() -> None:
    cfg = load_config(
        env={
            "PPRAY_SOURCE__KIND": "kafka",
            "PPRAY_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "PPRAY_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "PPRAY_KAFKA__SASL_USERNAME": "ppray",
            "PPRAY_KAFKA__SASL_PASSWORD": "12345",
        }
    )
    kafka = cfg.kafka
    assert kafka is not None
    for text in (repr(cfg), str(kafka), kafka.describe(), cfg.model_dump_json()):
        assert "12345" not in text
    assert kafka.client_kwargs()["sasl_plain_password"] == "12345"
    with pytest.raises(ValueError, match="sasl_password"):
        KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u")
    with pytest.raises(ValueError, match="kafka: section"):
        load_config(env={"PPRAY_ALERTS__SINK": "kafka"})


def test_s3_notification_round_trip() -> None:
    keys = ["Synthetic/20260101/a b/x.fits", "Synthetic/20260101/c+d/y.fits"]
    assert parse_s3_notification(json.dumps(s3_notification("bucket", keys))) == keys


def test_notification_keys_relative_to_the_raw_root() -> None:
    """S3 notifications carry the bucket and the whole key; raws are looked for under
    raw_root, so only those in its bucket and under its prefix are ours."""
    key = "Synthetic/20260101/x/x_R22_S00.fits"
    assert relative_raw_key("s3://raws/night-1", "raws", f"night-1/{key}") == key
    assert relative_raw_key("s3://raws", "raws", key) == key
    assert relative_raw_key("/data/raws", "anything", key) == key  # a directory: as given
    with pytest.raises(ValidationFailure, match="bucket 'other' is not raw_root's"):
        relative_raw_key("s3://raws/night-1", "other", f"night-1/{key}")
    with pytest.raises(ValidationFailure, match="is outside raw_root"):
        relative_raw_key("s3://raws/night-1", "raws", f"night-2/{key}")
    with pytest.raises(ValidationFailure, match="is outside raw_root"):
        relative_raw_key("s3://raws/night-1", "raws", f"night-10/{key}")


def _resolver(tmp_path: Path, **kw: Any) -> tuple[RawResolver, str]:
    inst = load_instrument("synthetic")
    key = raw_key(inst.name, inst.obs_id_prefix, 20260101, 12, "R22_S01")
    store = Storage(str(tmp_path))
    store.write_bytes(key, b"raw")
    store.write_json(sidecar_key(key), {"GROUPID": "g1", "CURINDEX": 1})
    return RawResolver(str(tmp_path), instrument=inst, wait_s=0.2, poll_s=0.05, **kw), key


def test_raw_resolver_checks_keys_detectors_and_sidecars(tmp_path: Path) -> None:
    resolver, key = _resolver(tmp_path)
    raw = resolver.resolve(key, arrived_at=1.0)
    assert (raw.detector, raw.group_id, raw.snap) == ("R22_S01", "g1", 0)
    with pytest.raises(ValidationFailure, match=r"'\.\.'"):
        resolver.resolve("Synthetic/../../etc/passwd.fits")
    with pytest.raises(ValidationFailure, match="no detector 'R99_S99'"):
        resolver.resolve(key.replace("R22_S01", "R99_S99"))
    with pytest.raises(RetriableError, match=r"sidecar .* not found after 0\.2 s"):
        resolver.resolve(key.replace("000012", "000013"))
    only, _ = _resolver(tmp_path, detectors=("R22_S00",))
    with pytest.raises(ValidationFailure, match="not in play"):
        only.resolve(key)


class _TP(NamedTuple):
    topic: str
    partition: int


class _FakeConsumer:
    def __init__(self, records: dict[Any, list[Any]]) -> None:
        self.records = records
        self.commits: list[dict[Any, Any]] = []
        self.closed = False

    def poll(self, timeout_ms: int) -> dict[Any, list[Any]]:
        out, self.records = self.records, {}
        return out

    def commit(self, offsets: dict[Any, Any]) -> None:
        self.commits.append({(tp.topic, tp.partition): o.offset for tp, o in offsets.items()})

    def close(self) -> None:
        self.closed = True


def test_kafka_source_expiry_errors_and_commits(tmp_path: Path) -> None:
    kafka = KafkaConfig(next_visit_expiry_s=60)
    fresh = {**next_visit_record(), "private_sndStamp": 1000.0}
    stale = {**fresh, "groupId": "stale", "private_sndStamp": 900.0}
    tp = _TP(kafka.topics.next_visit, 0)
    rec = [
        SimpleNamespace(offset=i, value=v)
        for i, v in enumerate([json.dumps(stale).encode(), b"{", json.dumps(fresh).encode()])
    ]
    consumer = _FakeConsumer({tp: rec})
    source = KafkaSource(kafka, str(tmp_path), clock=lambda: 1030.0, consumer=consumer)
    items = source.poll(0.1)
    assert source.n_expired == 1
    assert [bool(i.error) for i in items] == [True, False]
    assert "not valid JSON" in items[0].error and items[0].original == b"{"
    assert items[0].origin == f"{kafka.topics.next_visit}[0]@1"
    items[0].ack()
    source.poll(0.1)
    assert consumer.commits[-1] == {(kafka.topics.next_visit, 0): 2}
    items[1].ack()
    source.close()
    assert consumer.commits[-1] == {(kafka.topics.next_visit, 0): 3} and consumer.closed


def test_json_records() -> None:
    key, rec = event_record(Event(kind="visit_done", instrument="I", group_id="g", data={"n": 1}))
    assert key == "I/g" and rec["schema"] == "ppray.event/1" and rec["data"] == {"n": 1}
    item = Inbound("raw_arrival", error="bad key", original=b"\xff\x00", origin="t[0]@3")
    key, rec = dead_letter_record(item)
    assert key == "t[0]@3" and rec["original_text"] is None and rec["original_b64"] == "/wA="
    json.dumps(rec)


def test_metrics_records_say_how_the_difference_went() -> None:
    """Each detector's record has its difference's quality, null where not measured
    (JSON has no NaN); the visit's record has their medians over the ok detectors."""
    visit = next_visit()

    def result(det: str, residual: float, order: float) -> DetectorResult:
        return DetectorResult(
            instrument=visit.instrument, group_id=visit.groupId, detector=det,
            detector_id=0, status="ok", n_sources=3,
            metrics={"bright_star_residual": residual, "kernel_spatial_order": order,
                     "n_streaks": 1.0, "n_dia_unreliable": 4.0, "s3_retries": 2.0},
        )  # fmt: skip

    results = [result("A", 0.9, 2.0), result("B", float("nan"), 0.0), result("C", 1.3, 2.0)]
    summary = summarize_visit(
        visit.instrument, visit.groupId, ["A", "B", "C"], results, done_at=1.0
    )
    records = dict(metrics_records(visit, summary, results))
    det_a = records[f"{visit.instrument}/{visit.groupId}/A"]
    assert det_a["bright_star_residual"] == 0.9 and det_a["kernel_spatial_order"] == 2.0
    assert det_a["n_streaks"] == 1.0 and det_a["n_dia_unreliable"] == 4.0
    assert det_a["s3_retries"] == 2.0
    assert records[f"{visit.instrument}/{visit.groupId}/B"]["bright_star_residual"] is None
    json.dumps(records, allow_nan=False)
    per_visit = records[f"{visit.instrument}/{visit.groupId}"]
    assert per_visit["bright_star_residual"] == 1.3  # the upper median of 0.9 and 1.3
    assert per_visit["kernel_spatial_order"] == 2.0


class _Sent(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


class _FakeProducer:
    """What a kafka-python producer is asked to send; every send acknowledged."""

    def __init__(self) -> None:
        self.sent: list[_Sent] = []

    def send(self, topic: str, key: Any = None, value: Any = None, headers: Any = None) -> Any:
        self.sent.append(_Sent(topic, key, value, list(headers or [])))
        return SimpleNamespace(get=lambda timeout=None: None)

    def flush(self, timeout: float | None = None) -> None:
        pass


def test_alerts_go_out_as_rubin_sends_them() -> None:
    """By default: no key, a producer_timestamp header (ms since the epoch), the frame as
    given; ``kafka_key: diaSourceId`` keys each message by its id; anything else is an
    error that names the choices."""
    kafka = KafkaConfig()
    framed = [b"\x00\x00\x00\x04\x4d" + bytes([2 * n]) + b"rest" for n in (3, 7)]
    producer = _FakeProducer()
    sink = KafkaAlertSink(kafka, producer=producer)
    assert sink.publish(framed) == [3, 7]
    assert [m.key for m in producer.sent] == [None, None]
    assert [m.value for m in producer.sent] == framed
    for m in producer.sent:
        assert m.topic == kafka.topics.alerts
        ((name, stamp),) = m.headers
        assert name == "producer_timestamp" and abs(int(stamp) / 1e3 - time.time()) < 60
    keyed = _FakeProducer()
    KafkaAlertSink(kafka, key="diaSourceId", producer=keyed).publish(framed)
    assert [m.key for m in keyed.sent] == [b"3", b"7"]
    with pytest.raises(ValueError, match="'none' or 'diaSourceId'"):
        KafkaAlertSink(kafka, key="alertId")


def test_the_default_config_frames_alerts_for_kafka() -> None:
    alerts = load_config(env={}).alerts
    assert alerts.confluent_wire_format and alerts.kafka_key == "none"
    assert load_alert_schema().schema_id == 1101


def test_raws_that_landed_before_the_next_visit_are_found_by_listing(tmp_path: Path) -> None:
    """Rubin's fallback: raws whose notifications went to no one (they landed before the
    service subscribed) are announced when their visit's next_visit comes, once each."""
    kafka = KafkaConfig(next_visit_expiry_s=1e9)
    inst = load_instrument("synthetic")
    record = next_visit_record()
    day_obs = int(parse_message("next_visit", json.dumps(record).encode()).day_obs)
    store = Storage(str(tmp_path))

    def land(seq: int, detector: str, group: str) -> str:
        key = raw_key(inst.name, inst.obs_id_prefix, day_obs, seq, detector)
        store.write_bytes(key, b"raw")
        store.write_json(sidecar_key(key), {"GROUPID": group, "CURINDEX": 1})
        return key

    early = [land(7, "R22_S00", record["groupId"]), land(7, "R22_S01", record["groupId"])]
    other = land(6, "R22_S00", "an-earlier-visit")
    nv, notes = _TP(kafka.topics.next_visit, 0), _TP(kafka.topics.raw_arrival, 0)
    consumer = _FakeConsumer({nv: [SimpleNamespace(offset=0, value=json.dumps(record).encode())]})
    source = KafkaSource(kafka, str(tmp_path), instrument=inst, consumer=consumer)
    items = source.poll(0.1)
    assert [i.kind for i in items] == ["next_visit", "raw_arrival", "raw_arrival"]
    assert sorted(i.message.uri.rsplit("/", 1)[1] for i in items[1:]) == sorted(  # type: ignore[union-attr]
        k.rsplit("/", 1)[1] for k in early
    )
    assert all(i.origin.startswith("listing of Synthetic/") for i in items[1:])
    assert source.n_listed == 2
    # Their notifications come late (or are replayed): acknowledged, not announced again;
    # a raw that lands now is announced by its notification as usual.
    late = land(7, "R22_S10", record["groupId"])
    for k, key in enumerate([early[0], late, other]):
        body = json.dumps(s3_notification("b", [key])).encode()
        consumer.records = {notes: [SimpleNamespace(offset=k, value=body)]}
        got = source.poll(0.1)
        if key == early[0]:
            assert got == []
        else:
            assert [g.message.detector for g in got] == [parse_raw_key(key).detector]  # type: ignore[union-attr]
            got[0].ack()  # (the runtime acks once the visit is over)
    # Every notification acknowledged: the raw topic commits past all three.
    source.poll(0.1)
    assert consumer.commits[-1][(kafka.topics.raw_arrival, 0)] == 3
