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

import lazy_loader

# The public API (``__init__.pyi``) is imported on first use: an actor that needs one
# module of the package does not pay for the rest (scipy, astropy) when it starts.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
