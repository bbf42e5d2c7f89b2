"""Kafka in and out: the ``next_visit``/raw-notification source, the alert, metrics,
event and dead-letter sinks, and the simulator's publisher.

An adapter: the core never imports it; the Ray layer and the CLI pick its
source and sinks when the configuration asks for Kafka. Its settings are
:class:`ppray.config.kafka.KafkaConfig` (part of the deployment configuration).
Import the clients from their modules (``ppray.kafka.source``,
``ppray.kafka.sinks``, ``ppray.kafka.publish``); kafka-python itself is
imported lazily, when a client is made.
"""

__all__: list[str] = []
