"""Shared helpers of the Kafka integration tests: configs on a Tansu broker, topic readers."""

from __future__ import annotations

import uuid
from typing import Any

from ppray.config import DeploymentConfig, KafkaTopics
from ppray.config.kafka import KafkaConfig
from ppray.kafka.client import kafka_module, make_consumer
from ppray.testing.tansu import TansuBroker

from .cluster_helpers import wait_until


def kafka_deployment(config: DeploymentConfig, broker: TansuBroker) -> DeploymentConfig:
    """``config`` on ``broker`` with topics and a group of its own."""
    name = f"t{uuid.uuid4().hex[:8]}"
    topics = KafkaTopics(**{f: f"{name}.{f}" for f in KafkaTopics.model_fields})
    kafka = broker.config(topics=topics, group_id=f"{name}-ppray", sidecar_wait_s=0.5)
    return config.with_overrides(
        kafka=kafka,
        source={**config.source.model_dump(), "kind": "kafka"},
        alerts={**config.alerts.model_dump(), "sink": "kafka"},
    )


def read_topic(kafka: KafkaConfig, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every record of partition 0 of ``topic`` (up to its end offset when called), read
    outside any consumer group; fails if they do not all come within ``timeout_s``."""
    k = kafka_module()
    consumer = make_consumer(kafka, group_id=None)
    try:
        tp = k.TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        records: list[Any] = []

        def all_read() -> bool:
            if len(records) < end:  # each poll waits up to 200 ms for records
                for batch in consumer.poll(timeout_ms=200).values():
                    records.extend(batch)
            return len(records) >= end

        wait_until(
            all_read,
            timeout_s,
            f"the {end} records of {topic}",
            poll_s=0,
            detail=lambda: f"read {len(records)}",
        )
        return records
    finally:
        consumer.close()


def committed(kafka: KafkaConfig, topic: str) -> tuple[int | None, int]:
    """The group's committed offset of partition 0 of ``topic``, and its end offset."""
    k = kafka_module()
    consumer = make_consumer(kafka)
    try:
        tp = k.TopicPartition(topic, 0)
        return consumer.committed(tp), consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()
