"""Frozen, JSON-safe message models: what comes in, what goes between actors, what goes out.

``NextVisit`` follows the Rubin ScriptQueue ``nextVisit`` SAL event
(https://ts-xml.lsst.io/sal_interfaces/ScriptQueue.html#nextvisit): the full SAL
record, ``private_*`` fields included, is accepted; unknown extra fields are
tolerated (ignored); a missing or invalid required field is rejected with a
:class:`~ppray.errors.ValidationFailure` naming the field.
"""

from __future__ import annotations

import enum
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ppray.errors import ValidationFailure

__all__ = [
    "CoordSys",
    "DetectorResult",
    "DetectorStatus",
    "Dome",
    "Event",
    "EventKind",
    "NextVisit",
    "RawArrival",
    "RotSys",
    "VisitKey",
    "VisitSummary",
    "parse_message",
]


class CoordSys(enum.IntEnum):
    """``lsst.ts.xml.enums.Script.MetadataCoordSys``."""

    NONE = 1
    ICRS = 2
    OBSERVED = 3
    MOUNT = 4


class RotSys(enum.IntEnum):
    """``lsst.ts.xml.enums.Script.MetadataRotSys``."""

    NONE = 1
    SKY = 2
    HORIZON = 3
    MOUNT = 4


class Dome(enum.IntEnum):
    """``lsst.ts.xml.enums.Script.MetadataDome``."""

    CLOSED = 1
    OPEN = 2
    EITHER = 3


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VisitKey(_Frozen):
    """A visit is keyed by ``(instrument, groupId)``; the exposure id comes later, from the raw."""

    instrument: str
    group_id: str

    def __str__(self) -> str:
        return f"{self.instrument}/{self.group_id}"


class NextVisit(BaseModel):
    """The ScriptQueue ``nextVisit`` event: a visit announced before its pixels exist."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    salIndex: int
    scriptSalIndex: int
    instrument: str = Field(min_length=1)
    groupId: str = Field(min_length=1)
    coordinateSystem: CoordSys
    position: tuple[float, float]
    startTime: float
    rotationSystem: RotSys
    cameraAngle: float
    filters: str
    dome: Dome
    duration: float = Field(ge=0)
    nimages: int = Field(ge=0)
    survey: str
    totalCheckpoints: int
    # SAL bookkeeping fields; present on the summit's records, optional here.
    private_sndStamp: float = 0.0
    private_efdStamp: float = 0.0
    private_kafkaStamp: float = 0.0
    private_rcvStamp: float = 0.0
    private_identity: str = "ScriptQueue"
    private_origin: int = 0
    private_seqNum: int = 0
    private_revCode: str = ""

    @field_validator("groupId", "instrument")
    @classmethod
    def _no_path_separators(cls, value: str) -> str:
        # groupId and instrument become path components of output URIs.
        if "/" in value or "\\" in value or value in {".", ".."}:
            raise ValueError("must not contain path separators or be '.'/'..'")
        return value

    @property
    def key(self) -> VisitKey:
        return VisitKey(instrument=self.instrument, group_id=self.groupId)

    @property
    def ra_deg(self) -> float:
        return self.position[0]

    @property
    def dec_deg(self) -> float:
        return self.position[1]

    @property
    def filter_band(self) -> str:
        """Band letter of ``filters``: ``"SDSSr_65mm~empty"`` -> ``"r"``, ``"r"`` -> ``"r"``."""
        physical = self.filters.split("~", 1)[0]
        if len(physical) == 1:
            return physical
        for prefix in ("SDSS", "LSST"):
            if physical.startswith(prefix) and len(physical) > len(prefix):
                return physical[len(prefix)]
        return physical[:1]

    @property
    def day_obs(self) -> str:
        """Observing day ``YYYYMMDD`` (UTC-12h rollover, as Rubin's day_obs)."""
        start = datetime.fromtimestamp(self.startTime, tz=UTC) - timedelta(hours=12)
        return start.strftime("%Y%m%d")

    def timeout_s(self, image_timeout_s: float) -> float:
        """How long a worker waits for this visit's raws after ``prepare``."""
        return 2.0 * self.duration + image_timeout_s


class RawArrival(_Frozen):
    """One raw file (one detector, one snap) has landed in storage."""

    instrument: str
    detector: str
    group_id: str
    snap: int = Field(default=0, ge=0)
    exposure_id: int
    uri: str
    arrived_at: float = Field(default_factory=time.time)

    @property
    def key(self) -> VisitKey:
        return VisitKey(instrument=self.instrument, group_id=self.group_id)


DetectorStatus = Literal["ok", "failed", "timed_out"]


class DetectorResult(BaseModel):
    """What one detector produced for one visit; travels as a Ray object ref.

    ``sources`` (a pyarrow table) rides along in the object store and is left out of JSON.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    instrument: str
    group_id: str
    detector: str
    detector_id: int
    status: DetectorStatus
    exposure_id: int | None = None
    reason: str = ""
    retriable: bool = False
    n_sources: int = 0
    n_alerts: int = 0
    timings_s: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    flags: tuple[str, ...] = Field(
        default=(), description="What was degraded and why (no template, no refcat...)."
    )
    calib_ids: dict[str, str] = Field(
        default_factory=dict,
        description="Calibrations used, kind -> calib_id ('legacy': the detector's calib.fits).",
    )
    last_raw_at: float | None = None
    finished_at: float = Field(default_factory=time.time)
    sources: pa.Table | None = Field(default=None, exclude=True)
    dia_sources: pa.Table | None = Field(default=None, exclude=True)


class VisitSummary(_Frozen):
    """The gather of one visit's detector results."""

    instrument: str
    group_id: str
    exposure_id: int | None
    n_expected: int
    n_ok: int
    n_failed: int
    n_timed_out: int
    n_sources: int
    n_dia_sources: int = 0
    n_alerts: int = 0
    n_retriable: int = Field(
        default=0, description="Failed detectors a retry may cure (their inputs stay unacked)."
    )
    detectors: dict[str, DetectorStatus]
    reasons: dict[str, str] = Field(default_factory=dict)
    last_raw_at: float | None = None
    done_at: float
    latency_s: float | None = Field(
        default=None, description="Last raw arrival to visit done, seconds."
    )
    step_median_s: dict[str, float] = Field(default_factory=dict)
    calib_ids: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Calibrations used by the visit's detectors: kind -> distinct calib_ids.",
    )
    summary_uri: str = ""


EventKind = Literal[
    "visit_accepted",
    "visit_duplicate",
    "visit_rejected",
    "visit_queued",
    "preloaded",
    "raw_arrived",
    "raw_buffered",
    "raw_rejected",
    "processed",
    "failed",
    "timed_out",
    "retried",
    "visit_done",
    "calib_certified",
    "calib_done",
]


class Event(_Frozen):
    """A lifecycle event for operators (and, later, the events topic)."""

    kind: EventKind
    instrument: str = ""
    group_id: str = ""
    detector: str = ""
    time: float = Field(default_factory=time.time)
    level: Literal["info", "warning", "error"] = "info"
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


_MODELS: dict[str, type[BaseModel]] = {"next_visit": NextVisit, "raw_arrival": RawArrival}


def parse_message(kind: str, payload: bytes | str | dict[str, Any]) -> Any:
    """Parse and validate one incoming message.

    Parameters
    ----------
    kind
        ``"next_visit"`` or ``"raw_arrival"``.
    payload
        JSON bytes/text or an already-decoded mapping.

    Returns
    -------
    NextVisit or RawArrival

    Raises
    ------
    ValidationFailure
        With the offending field named, for bad JSON, a missing field or a bad value.
    """
    model = _MODELS[kind]
    if isinstance(payload, bytes | str):
        try:
            payload = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValidationFailure(kind, "", f"not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise ValidationFailure(kind, "", f"expected a JSON object, got {type(payload).__name__}")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValidationFailure(kind, field, first["msg"]) from exc
