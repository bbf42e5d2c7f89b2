"""kafka-python clients made from a :class:`KafkaConfig`, imported lazily.

kafka-python is imported only when a client is first made (and with its
import-time ``DeprecationWarning``\\ s silenced: they come from its use of
``importlib.resources`` and are not ours to fix), so that modules which merely
mention Kafka stay cheap to import and safe under ``filterwarnings = error``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from ppray.config.kafka import KafkaConfig
from ppray.errors import RetriableError

__all__ = ["ensure_topics", "kafka_module", "make_admin", "make_consumer", "make_producer"]

log = logging.getLogger(__name__)


def kafka_module() -> ModuleType:
    """The ``kafka`` package (kafka-python), imported once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import kafka
        import kafka.admin
        import kafka.errors
        import kafka.structs
    return kafka


def make_producer(config: KafkaConfig, **overrides: Any) -> Any:
    """A ``KafkaProducer`` that waits for all in-sync replicas (``acks="all"``)."""
    kafka = kafka_module()
    kwargs = {
        **config.client_kwargs(),
        "acks": "all",
        "linger_ms": config.linger_ms,
        # Alerts carry three FITS cutouts (~27 KB): above the default 16 KB batch, each
        # would go out in a batch of its own.
        "batch_size": 1024 * 1024,
        "max_request_size": 8 * 1024 * 1024,
        **overrides,
    }
    try:
        return kafka.KafkaProducer(**kwargs)
    except kafka.errors.KafkaError as exc:
        raise RetriableError(f"cannot reach Kafka at {config.describe()}: {exc}") from exc


def make_consumer(config: KafkaConfig, topics: Iterable[str] = (), **overrides: Any) -> Any:
    """A ``KafkaConsumer`` in ``config.group_id`` with manual commits (at-least-once)."""
    kafka = kafka_module()
    kwargs = {
        **config.client_kwargs(),
        "group_id": config.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": config.auto_offset_reset,
        "session_timeout_ms": config.session_timeout_ms,
        "heartbeat_interval_ms": config.heartbeat_interval_ms,
        **overrides,
    }
    try:
        return kafka.KafkaConsumer(*topics, **kwargs)
    except kafka.errors.KafkaError as exc:
        raise RetriableError(f"cannot reach Kafka at {config.describe()}: {exc}") from exc


def make_admin(config: KafkaConfig) -> Any:
    kafka = kafka_module()
    return kafka.admin.KafkaAdminClient(**config.client_kwargs())


def ensure_topics(
    config: KafkaConfig, topics: Iterable[str] | None = None, timeout_s: float = 15.0
) -> list[str]:
    """Create the topics that do not exist yet; returns those created.

    Brokers differ in whether they auto-create topics (Tansu does not), so the
    service creates its own at start when ``config.create_topics`` is set.
    """
    kafka = kafka_module()
    wanted = list(topics if topics is not None else config.topics.all())
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = make_admin(config)
            break
        except kafka.errors.KafkaError as exc:
            if time.monotonic() > deadline:
                raise RetriableError(f"cannot reach Kafka at {config.describe()}: {exc}") from exc
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in dict.fromkeys(wanted) if t not in existing]
        if missing:
            new = [
                kafka.admin.NewTopic(t, config.partitions, config.replication_factor)
                for t in missing
            ]
            # Another instance may win the race to create them.
            with contextlib.suppress(kafka.errors.TopicAlreadyExistsError):
                admin.create_topics(new)
            log.info("created Kafka topics %s", missing)
        return missing
    finally:
        admin.close()
