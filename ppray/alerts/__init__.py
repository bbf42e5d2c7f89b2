"""Alerts: the DIA source and forced-source tables, the packets, and where they go.

- :mod:`.diasource` — ``diaSource`` rows from DIA measurements.
- :mod:`.forced` — forced photometry on the difference and science images.
- :mod:`.packet` — alert packets (``lsst-alert-packet`` schema): cutouts,
  column-wise Avro serialisation, validation.
- :mod:`.avro` — the column-wise Avro encoder.
- :mod:`.sinks` — the :class:`AlertSink` protocol and the sinks the core
  makes (file, in memory); the Kafka sink is an adapter (``ppray.kafka``).

Which rows an alert carries comes from the APDB (:mod:`ppray.apdb`); the
step that puts them together for one detector is
:mod:`ppray.visit.alert_production`.
"""

from ppray.alerts.avro import encode_rows, varint
from ppray.alerts.diasource import AB_NJY_MAG, VisitInfo, dia_source_table, local_jacobian
from ppray.alerts.forced import forced_photometry, psf_fluxes
from ppray.alerts.packet import (
    CONFLUENT_MAGIC,
    AlertBatch,
    CutoutMaker,
    build_alerts,
    deserialize_alert,
    serialize_alert,
    serialize_alerts,
    validate_alert,
)
from ppray.alerts.sinks import (
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
