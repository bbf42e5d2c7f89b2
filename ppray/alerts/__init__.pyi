"""The public API of :mod:`ppray.alerts`, for type checkers and for the lazy loader
(:func:`lazy_loader.attach_stub` reads what to load, and from where, here)."""

from .avro import encode_rows, varint
from .diasource import AB_NJY_MAG, VisitInfo, dia_source_table, local_jacobian
from .forced import forced_photometry, psf_fluxes
from .packet import (
    CONFLUENT_MAGIC,
    AlertBatch,
    CutoutMaker,
    build_alerts,
    deserialize_alert,
    serialize_alert,
    serialize_alerts,
    validate_alert,
)
from .sinks import (
    FROM_CONFIG,
    AlertSink,
    FileAlertSink,
    InMemoryAlertSink,
    SinkFromConfig,
    local_alert_sink,
    read_alert_file,
)

__all__ = [
    "AB_NJY_MAG",
    "CONFLUENT_MAGIC",
    "FROM_CONFIG",
    "AlertBatch",
    "AlertSink",
    "CutoutMaker",
    "FileAlertSink",
    "InMemoryAlertSink",
    "SinkFromConfig",
    "VisitInfo",
    "build_alerts",
    "deserialize_alert",
    "dia_source_table",
    "encode_rows",
    "forced_photometry",
    "local_alert_sink",
    "local_jacobian",
    "psf_fluxes",
    "read_alert_file",
    "serialize_alert",
    "serialize_alerts",
    "validate_alert",
    "varint",
]
