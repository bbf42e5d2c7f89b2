from __future__ import annotations

import json
from pathlib import Path

from ppray.messages import Event
from ppray.messaging import DirectorySource, EventLog, InMemoryBus
from ppray.rawkeys import raw_key, sidecar_key
from ppray.report import format_event
from ppray.storage import Storage

from .helpers import next_visit, raw, sal_next_visit


def test_bus_validates_bytes_and_keeps_the_original_of_bad_ones() -> None:
    bus = InMemoryBus()
    bus.publish_next_visit(next_visit())
    bus.publish_raw(raw())
    bus.publish_bytes("next_visit", b'{"groupId": "g"}')
    items = bus.poll(0.01)
    assert [i.kind for i in items] == ["next_visit", "raw_arrival", "next_visit"]
    assert items[2].message is None and "salIndex" in items[2].error
    assert items[2].original == b'{"groupId": "g"}'
    assert bus.poll(0.01) == []


def test_directory_source_delivers_each_file_once_and_moves_acked_visits(tmp_path: Path) -> None:
    inbox, raws = Storage(str(tmp_path / "inbox")), Storage(str(tmp_path / "raw"))
    inbox.write_bytes("v1.json", json.dumps(sal_next_visit()).encode())
    inbox.write_bytes("bad.json", b"not json")
    key = raw_key("Synthetic", "SY_O", 20261124, 5, "R22_S00")
    raws.write_bytes(key, b"fits bytes")  # sidecar not there yet: not announced
    source = DirectorySource(str(tmp_path / "inbox"), str(tmp_path / "raw"), 0.01)
    first = source.poll(0.05)
    assert sorted((i.kind, bool(i.error)) for i in first) == [
        ("next_visit", False),
        ("next_visit", True),
    ]
    raws.write_json(sidecar_key(key), {"GROUPID": "g"})
    second = source.poll(0.05)
    assert len(second) == 1 and second[0].message is not None
    assert second[0].message.detector == "R22_S00"  # type: ignore[union-attr]
    for item in first:
        item.ack()
    assert inbox.list(suffix=".json") == ["bad.json", "done/v1.json"]
    assert source.poll(0.02) == []


def test_event_log_is_incremental_and_bounded() -> None:
    log = EventLog(maxlen=3)
    for i in range(5):
        log.emit(Event(kind="raw_arrived", detector=f"D{i}"))
    nxt, events = log.since(0)
    assert nxt == 5 and [e.detector for e in events] == ["D2", "D3", "D4"]
    assert log.since(4) == (5, events[-1:])


def test_progress_lines() -> None:
    done = Event(
        kind="visit_done",
        group_id="g",
        time=12.0,
        data={"n_ok": 4, "n_failed": 0, "n_timed_out": 0, "n_sources": 99, "latency_s": 1.25},
    )
    line = format_event(done, t0=10.0)
    assert line is not None and "2.00s" in line and "sources=99" in line
    assert format_event(Event(kind="raw_arrived"), 0.0) is None
    assert format_event(Event(kind="raw_arrived"), 0.0, verbose=True) is not None
