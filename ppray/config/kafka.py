"""Kafka connection, topics and client settings, as a frozen pydantic model.

Lives in :class:`ppray.config.DeploymentConfig` as ``kafka:`` and is overridable
from the environment like any field (``PPRAY_KAFKA__BOOTSTRAP_SERVERS=host:9092``,
``PPRAY_KAFKA__SASL_PASSWORD=...``). Passwords are :class:`pydantic.SecretStr`:
their ``repr`` and JSON dumps print ``**********``, so logging a config never
leaks a credential.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = ["KafkaConfig", "KafkaTopics"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaTopics(_Frozen):
    """Topic names: two inputs, four outputs."""

    next_visit: str = "ppray.next_visit"
    raw_arrival: str = "ppray.raw_arrival"
    alerts: str = "ppray.alerts"
    metrics: str = "ppray.metrics"
    events: str = "ppray.events"
    dead_letter: str = "ppray.dead_letter"

    def all(self) -> tuple[str, ...]:
        return (
            self.next_visit,
            self.raw_arrival,
            self.alerts,
            self.metrics,
            self.events,
            self.dead_letter,
        )


class KafkaConfig(_Frozen):
    """How ppray talks to a Kafka-protocol broker (Apache Kafka, Redpanda, Tansu...)."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", min_length=1, description="host:port[,host:port...]"
    )
    client_id: str = "ppray"
    group_id: str = Field(default="ppray", min_length=1, description="Consumer group.")
    topics: KafkaTopics = KafkaTopics()
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    # Group membership: a restarted consumer waits about a session timeout to rejoin.
    session_timeout_ms: int = Field(default=10_000, ge=100)
    heartbeat_interval_ms: int = Field(default=3_000, ge=10)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    next_visit_expiry_s: float = Field(
        default=600.0, gt=0, description="next_visit older than this (by private_sndStamp) skip."
    )
    sidecar_wait_s: float = Field(
        default=2.0, ge=0, description="How long a raw notification waits for its .json sidecar."
    )
    sidecar_poll_s: float = Field(default=0.1, gt=0)
    linger_ms: int = Field(default=5, ge=0)
    request_timeout_ms: int = Field(default=30_000, ge=100)
    flush_timeout_s: float = Field(default=30.0, gt=0)
    create_topics: bool = Field(
        default=True, description="Create missing topics at start (needs the broker's ACL)."
    )
    partitions: int = Field(default=1, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    publish_metrics: bool = True
    publish_events: bool = True

    @field_validator("sasl_password", "ssl_password", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        # Environment overrides are YAML-parsed: a numeric password arrives as an int.
        return value if value is None or isinstance(value, SecretStr) else str(value)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL_"):
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"security_protocol {self.security_protocol} needs {missing}")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to kafka-python's producer, consumer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",")],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.ssl_password is not None:
            kwargs["ssl_password"] = self.ssl_password.get_secret_value()
        return kwargs

    def describe(self) -> str:
        """A log-safe one-liner: servers, protocol, user; never a password."""
        who = f" as {self.sasl_username}" if self.sasl_username else ""
        return f"{self.bootstrap_servers} ({self.security_protocol}{who})"
