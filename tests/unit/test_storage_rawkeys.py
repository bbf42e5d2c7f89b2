from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from ppray.errors import NonRetriableError, RetriableError, ValidationFailure
from ppray.rawkeys import parse_raw_key, parse_s3_notification, raw_arrival, raw_key, sidecar_key
from ppray.storage import Storage, read_uri


def test_storage_round_trip_and_atomic_listing(tmp_path: Path) -> None:
    store = Storage(str(tmp_path / "root"))
    uri = store.write_bytes("a/b/c.bin", b"xyz")
    assert read_uri(uri) == b"xyz"
    store.write_json("a/meta.json", {"k": 1})
    store.write_parquet("t.parquet", pa.table({"x": [1, 2]}))
    assert store.list(suffix=".json") == ["a/meta.json"]
    assert store.read_parquet("t.parquet")["x"].to_pylist() == [1, 2]
    assert not list((tmp_path / "root").rglob("*.tmp-*"))
    assert Storage(f"file://{tmp_path / 'root'}").read_json("a/meta.json") == {"k": 1}


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs/path", "", "a/./b"])
def test_storage_rejects_traversal(tmp_path: Path, key: str) -> None:
    with pytest.raises(NonRetriableError):
        Storage(str(tmp_path)).write_bytes(key, b"x")


def test_missing_object_is_retriable(tmp_path: Path) -> None:
    with pytest.raises(RetriableError):
        Storage(str(tmp_path)).read_bytes("nope")
    with pytest.raises(RetriableError):
        read_uri(str(tmp_path / "nope"))


def test_raw_key_layout_round_trip() -> None:
    key = raw_key("LSSTCam", "MC_O", 20261125, 42, "R22_S11")
    assert key == "LSSTCam/20261125/MC_O_20261125_000042/MC_O_20261125_000042_R22_S11.fits"
    parts = parse_raw_key(key)
    assert (parts.instrument, parts.detector, parts.exposure_id) == (
        "LSSTCam",
        "R22_S11",
        2026112500042,
    )
    assert sidecar_key(key).endswith("_R22_S11.json")
    arrival = raw_arrival(key, {"GROUPID": "g1", "CURINDEX": 2}, "s3://b/" + key, 1.0)
    assert (arrival.group_id, arrival.snap, arrival.detector) == ("g1", 1, "R22_S11")


@pytest.mark.parametrize(
    "key",
    [
        "LSSTCam/20261125/../../etc/passwd",
        "LSSTCam/20261125/MC_O_20261125_000042/MC_O_20261125_000043_R22_S11.fits",
        "LSSTCam/2026/MC_O_20261125_000042/MC_O_20261125_000042_R22_S11.fits",
    ],
)
def test_bad_raw_keys_are_rejected(key: str) -> None:
    with pytest.raises(ValidationFailure, match=r"s3\.object\.key"):
        parse_raw_key(key)


def test_sidecar_without_group_is_rejected() -> None:
    key = raw_key("LSSTCam", "MC_O", 20261125, 42, "R22_S11")
    with pytest.raises(ValidationFailure, match="GROUPID"):
        raw_arrival(key, {}, "x", 0.0)


def test_s3_notification() -> None:
    note = {
        "Records": [
            {"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "a/b+c.fits"}}},
            {"eventName": "ObjectRemoved:Delete", "s3": {"object": {"key": "gone.fits"}}},
        ]
    }
    assert parse_s3_notification(note) == ["a/b c.fits"]
    with pytest.raises(ValidationFailure, match="Records"):
        parse_s3_notification({"foo": 1})
    with pytest.raises(ValidationFailure, match=r"Records\.0\.s3\.object\.key"):
        parse_s3_notification({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]})
