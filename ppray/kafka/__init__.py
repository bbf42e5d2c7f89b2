"""Kafka in and out: sources, sinks and the simulator's publisher.

Only the configuration is imported here, so that :mod:`ppray.config` can use it;
import the clients from their modules (``ppray.kafka.source``,
``ppray.kafka.sinks``, ``ppray.kafka.publish``). kafka-python itself is
imported lazily, when a client is made.
"""

from __future__ import annotations

from .config import KafkaConfig, KafkaTopics

__all__ = ["KafkaConfig", "KafkaTopics"]
