"""The LSST raw key layout and S3-style bucket notifications.

Raws land at ``INSTRUMENT/DAY_OBS/OBS_ID/OBS_ID_RXX_SYY.fits`` with a ``.json``
sidecar beside them holding (at least) ``GROUPID``; the exposure id is learned
from ``OBS_ID`` (``PREFIX_DAYOBS_SEQNUM``, exposure id = ``DAYOBS * 100000 +
SEQNUM`` as Rubin's).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from ppray.errors import ValidationFailure
from ppray.messages import RawArrival

__all__ = [
    "RawKey",
    "exposure_id",
    "obs_id",
    "parse_raw_key",
    "parse_s3_notification",
    "raw_arrival",
    "raw_key",
    "sidecar_key",
]

_KEY = re.compile(
    r"^(?P<instrument>[A-Za-z0-9]+)/(?P<day_obs>\d{8})/(?P<obs_id>[A-Z]{2}_[A-Z]_\d{8}_\d{6})/"
    r"(?P=obs_id)_(?P<detector>[A-Z0-9]{3}_S\d\d)\.fits$"
)


@dataclass(frozen=True)
class RawKey:
    """The parts of a raw's storage key."""

    instrument: str
    day_obs: int
    obs_id: str
    seq_num: int
    detector: str

    @property
    def exposure_id(self) -> int:
        return exposure_id(self.day_obs, self.seq_num)


def exposure_id(day_obs: int, seq_num: int) -> int:
    """Rubin-style exposure id: ``YYYYMMDD`` * 100000 + sequence number."""
    return day_obs * 100_000 + seq_num


def obs_id(prefix: str, day_obs: int, seq_num: int) -> str:
    """``OBS_ID`` such as ``MC_O_20261125_000012``."""
    return f"{prefix}_{day_obs:08d}_{seq_num:06d}"


def raw_key(instrument: str, prefix: str, day_obs: int, seq_num: int, detector: str) -> str:
    """The storage key of one detector's raw of one exposure."""
    oid = obs_id(prefix, day_obs, seq_num)
    return f"{instrument}/{day_obs:08d}/{oid}/{oid}_{detector}.fits"


def sidecar_key(key: str) -> str:
    """The ``.json`` sidecar beside a raw key."""
    return key[: -len(".fits")] + ".json"


def parse_raw_key(key: str) -> RawKey:
    """Split a raw key into its parts.

    Raises
    ------
    ValidationFailure
        If the key does not follow the LSST layout (this also rejects ``..`` and
        absolute keys, which cannot match).
    """
    match = _KEY.match(key)
    if match is None:
        raise ValidationFailure(
            "raw_arrival",
            "s3.object.key",
            f"{key!r} does not follow INSTRUMENT/DAY_OBS/OBS_ID/OBS_ID_RXX_SYY.fits",
        )
    oid = match["obs_id"]
    return RawKey(
        instrument=match["instrument"],
        day_obs=int(match["day_obs"]),
        obs_id=oid,
        seq_num=int(oid.rsplit("_", 1)[1]),
        detector=match["detector"],
    )


def raw_arrival(key: str, sidecar: dict[str, Any], uri: str, arrived_at: float) -> RawArrival:
    """Build a :class:`RawArrival` from a raw key and its sidecar.

    The sidecar's ``GROUPID`` names the visit; ``CURINDEX`` (1-based, as Rubin's
    headers) gives the snap, 0 if absent.

    Raises
    ------
    ValidationFailure
        For a bad key or a sidecar without ``GROUPID``.
    """
    parts = parse_raw_key(key)
    group = sidecar.get("GROUPID")
    if not isinstance(group, str) or not group:
        raise ValidationFailure("raw_arrival", "GROUPID", f"sidecar of {key!r} has no GROUPID")
    snap = int(sidecar.get("CURINDEX", 1)) - 1
    return RawArrival(
        instrument=parts.instrument,
        detector=parts.detector,
        group_id=group,
        snap=max(snap, 0),
        exposure_id=parts.exposure_id,
        uri=uri,
        arrived_at=arrived_at,
    )


def parse_s3_notification(payload: bytes | str | dict[str, Any]) -> list[str]:
    """Object keys of the ``ObjectCreated:*`` records of an S3 bucket notification.

    Raises
    ------
    ValidationFailure
        For bad JSON or a record without ``s3.object.key``.
    """
    return [key for _, key in parse_s3_records(payload)]


def s3_bucket_prefix(root: str) -> tuple[str, str] | None:
    """``(bucket, prefix)`` of an ``s3://bucket/prefix`` root; None for any other root."""
    if not root.startswith("s3://"):
        return None
    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def relative_raw_key(root: str, bucket: str, key: str) -> str:
    """A notification's object key relative to ``root``, where the raws are looked for.

    On an ``s3://bucket/prefix`` root the notification must name that bucket and a key
    under that prefix (S3 notifications carry the whole key); on any other root (a
    directory) the key is already relative to it.

    Raises
    ------
    ValidationFailure
        Naming the bucket or key that lies outside ``root``.
    """
    where = s3_bucket_prefix(root)
    if where is None:
        return key
    want_bucket, prefix = where
    if bucket != want_bucket:
        raise ValidationFailure(
            "raw_arrival", "s3.bucket.name", f"bucket {bucket!r} is not raw_root's {root!r}"
        )
    if prefix and not key.startswith(prefix + "/"):
        raise ValidationFailure(
            "raw_arrival", "s3.object.key", f"key {key!r} is outside raw_root {root!r}"
        )
    return key[len(prefix) + 1 :] if prefix else key


def parse_s3_records(payload: bytes | str | dict[str, Any]) -> list[tuple[str, str]]:
    """``(bucket, key)`` of each ``ObjectCreated:*`` record of an S3 bucket notification.

    Raises
    ------
    ValidationFailure
        For bad JSON or a record without ``s3.object.key``.
    """
    if not isinstance(payload, dict):
        try:
            payload = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValidationFailure("raw_arrival", "", f"not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise ValidationFailure("raw_arrival", "", "expected a JSON object")
    records = payload.get("Records")
    if not isinstance(records, list):
        raise ValidationFailure("raw_arrival", "Records", "missing or not a list")
    keys = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValidationFailure("raw_arrival", f"Records.{i}", "not an object")
        if not str(record.get("eventName", "")).startswith("ObjectCreated:"):
            continue
        try:
            key = record["s3"]["object"]["key"]
        except (KeyError, TypeError) as exc:
            raise ValidationFailure("raw_arrival", f"Records.{i}.s3.object.key", "missing") from exc
        bucket = record["s3"].get("bucket", {}).get("name", "")
        # S3 URL-encodes keys in notifications (space -> '+').
        keys.append((str(bucket), unquote_plus(str(key))))
    return keys
