"""Storage on a real S3 server (SeaweedFS, loopback): round trip, listing, and each kind
of bad S3 input told apart: missing, refused, transient (retried, counted), truncated."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ppray.config import S3Config
from ppray.errors import NonRetriableError, RetriableError
from ppray.instrument import load_instrument
from ppray.rawio import read_raw
from ppray.storage import S3Options, Storage, configure_s3, read_uri, s3_retries
from ppray.testing.seaweed import SeaweedS3
from ppray.testing.tansu import free_port


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedS3]:
    with SeaweedS3(buckets=["raws", "out"]) as server:
        yield server


@pytest.fixture(autouse=True)
def _configured(s3: SeaweedS3) -> Iterator[None]:
    S3Config(
        endpoint_url=s3.endpoint,
        region="us-east-1",
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
        retry_backoff_s=0.01,
    ).configure()
    yield
    configure_s3(S3Options())


def test_round_trip_listing_and_uris() -> None:
    store = Storage("s3://out/prefix")
    uri = store.write_bytes("a/b/c.bin", b"xyz")
    assert uri == "s3://out/prefix/a/b/c.bin"
    assert read_uri(uri) == b"xyz" and store.read_bytes("a/b/c.bin") == b"xyz"
    store.write_json("a/meta.json", {"k": 1})
    assert store.list(suffix=".json") == ["a/meta.json"]
    assert store.list("a") == ["a/b/c.bin", "a/meta.json"]
    assert store.list("nothing-here") == []
    assert store.exists("a/meta.json") and not store.exists("a/other.json")


def test_a_missing_object_may_still_be_landing() -> None:
    with pytest.raises(RetriableError, match="no such object"):
        Storage("s3://raws").read_bytes("not/yet.fits")


def test_refused_reads_fail_for_good(s3: SeaweedS3) -> None:
    Storage("s3://raws").write_bytes("k.fits", b"x")
    before = s3_retries()
    S3Config(
        endpoint_url=s3.endpoint, access_key_id=s3.access_key, secret_access_key="wrong"
    ).configure()
    with pytest.raises(NonRetriableError, match="refused by the object store"):
        Storage("s3://raws").read_bytes("k.fits")
    assert s3_retries() == before  # not retried: it would be refused again


def test_transient_errors_are_retried_with_backoff_and_counted() -> None:
    closed = free_port()  # nothing listens there: every attempt fails to connect
    configure_s3(
        S3Options(
            endpoint_url=f"http://127.0.0.1:{closed}",
            access_key_id="a",
            secret_access_key="b",
            retries=2,
            retry_backoff_s=0.01,
        )
    )
    before = s3_retries().get("read", 0)
    with pytest.raises(RetriableError, match="still failing after 2 retries"):
        Storage("s3://raws").read_bytes("k.fits")
    assert s3_retries()["read"] == before + 2


def test_a_truncated_raw_is_named() -> None:
    instrument = load_instrument("synthetic")
    detector = instrument.detectors[0]
    store = Storage("s3://raws")
    fits = b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                   16"
    store.write_bytes("truncated.fits", fits)
    with pytest.raises(NonRetriableError, match=f"raw for {detector.name}"):
        read_raw(store.read_bytes("truncated.fits"), instrument, detector)


def test_credentials_are_never_shown() -> None:
    config = S3Config(access_key_id="AKIA", secret_access_key="very-secret")
    assert "very-secret" not in repr(config) and "very-secret" not in config.model_dump_json()
    config.configure()
    from ppray import storage

    assert "very-secret" not in repr(storage._s3)
