"""Shared builders for unit tests."""

from __future__ import annotations

from typing import Any

from ppray.messages import NextVisit, RawArrival


def sal_next_visit(**changes: Any) -> dict[str, Any]:
    """A full ScriptQueue nextVisit SAL record, as the summit publishes it."""
    record: dict[str, Any] = {
        "salIndex": 2,
        "scriptSalIndex": 200123,
        "instrument": "Synthetic",
        "groupId": "2026-11-25T03:14:15.926535",
        "coordinateSystem": 2,
        "position": [150.0, 2.2],
        "startTime": 1795576455.9,
        "rotationSystem": 2,
        "cameraAngle": 0.0,
        "filters": "r",
        "dome": 2,
        "duration": 32.0,
        "nimages": 1,
        "survey": "BLOCK-365",
        "totalCheckpoints": 0,
        "private_efdStamp": 1795576418.0,
        "private_kafkaStamp": 1795576418.1,
        "private_identity": "ScriptQueue:2",
        "private_revCode": "c9aab3df",
        "private_origin": 12345,
        "private_seqNum": 77,
        "private_rcvStamp": 1795576418.05,
        "private_sndStamp": 1795576455.0,
    }
    record.update(changes)
    return record


def next_visit(**changes: Any) -> NextVisit:
    return NextVisit.model_validate(sal_next_visit(**changes))


def raw(
    detector: str = "R22_S00",
    group: str = "2026-11-25T03:14:15.926535",
    snap: int = 0,
    instrument: str = "Synthetic",
    arrived_at: float = 100.0,
) -> RawArrival:
    return RawArrival(
        instrument=instrument,
        detector=detector,
        group_id=group,
        snap=snap,
        exposure_id=2026112500042,
        uri=f"file:///raw/{detector}_{snap}.fits",
        arrived_at=arrived_at,
    )
