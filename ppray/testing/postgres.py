"""A real PostgreSQL server for tests, benchmarks and local runs, from a wheel.

The ``pgserver`` wheel (a ``dev`` extra) ships PostgreSQL's binaries.
:class:`PostgresServer` runs ``initdb`` into a fresh directory and ``postgres``
on a free loopback TCP port (no Unix socket), waits until it accepts SQL, and
stops it by its own PID. PostgreSQL refuses to run as root; as root (CI) it
runs as an unprivileged system user, ``ppray-pg``, made if missing.

Run one by hand (Ctrl-C stops it)::

    .venv/bin/python -m ppray.testing.postgres --port 5432
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from ppray.testing._process import serve_until_interrupted, stop_process
from ppray.testing.tansu import free_port

__all__ = ["PostgresServer", "postgres_bin"]

_USER = "ppray-pg"


def postgres_bin() -> Path:
    """``$PPRAY_PG_BIN``, else the ``pgserver`` wheel's ``bin``, else the ``postgres`` on PATH's.

    Raises
    ------
    FileNotFoundError
        Saying how to install it.
    """
    explicit = os.environ.get("PPRAY_PG_BIN")
    if explicit:
        return Path(explicit)
    # Found, not imported: importing pgserver sets up its own server machinery.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "pginstall" / "bin"
        if (path / "postgres").is_file():
            return path
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise FileNotFoundError(
        "no PostgreSQL binaries: `pip install pgserver` (in ppray's dev extra), "
        "`apt-get install postgresql`, or set PPRAY_PG_BIN to the directory of `postgres`"
    )


def _run_as() -> str | None:
    """The user PostgreSQL runs as: this one, or ``ppray-pg`` when this one is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_USER)
    except KeyError as missing:
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", _USER], capture_output=True, text=True
        )
        if made.returncode != 0:
            try:  # another process (a parallel test worker) made it first
                pwd.getpwnam(_USER)
            except KeyError:
                raise RuntimeError(
                    f"cannot make the user {_USER!r} PostgreSQL runs as: {made.stderr.strip()}"
                ) from missing
    return _USER


def _searchable_by_all(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _shared_copy(binaries: Path) -> Path:
    """The wheel's installation copied where another user can run it (once per machine).

    Not a chmod of the original: that would open up the directories above a
    virtual environment (often a home directory). The wheel's binaries find their
    libraries at ``$ORIGIN/../../../pgserver.libs``, so the copy keeps that layout.
    """
    install = binaries.parent  # .../site-packages/pgserver/pginstall
    site = install.parent.parent
    digest = hashlib.sha1(str(install).encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"ppray-pginstall-{digest}"
    if not (target / "pgserver" / "pginstall" / "bin" / "postgres").is_file():
        staging = Path(tempfile.mkdtemp(prefix="ppray-pginstall-"))
        for part in ("bin", "lib", "share"):
            if (install / part).is_dir():
                shutil.copytree(install / part, staging / "pgserver" / "pginstall" / part)
        if (site / "pgserver.libs").is_dir():
            shutil.copytree(site / "pgserver.libs", staging / "pgserver.libs")
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(staging, ignore_errors=True)
    return target / "pgserver" / "pginstall" / "bin"


class PostgresServer:
    """One PostgreSQL server with its data in a temporary directory.

    Parameters
    ----------
    port
        Loopback port; None picks a free one.
    database
        A database to create once it answers (``postgres`` always exists).
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", database: str = "apdb"
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.database = database
        self.process: subprocess.Popen[bytes] | None = None
        self.data_dir: Path | None = None
        self._user: str | None = None
        self._bin = Path()
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """SQLAlchemy URL of :attr:`database` (trust authentication, loopback only)."""
        return f"postgresql+psycopg2://postgres@{self.host}:{self.port}/{self.database}"

    def _cmd(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self._bin / name), *args],
            user=self._user,
            capture_output=True,
            text=True,
            check=check,
        )

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        """``initdb``, start, create :attr:`database`; returns once it accepts SQL."""
        self._user = _run_as()
        binaries = postgres_bin()
        if self._user is not None and not _searchable_by_all(binaries):
            binaries = _shared_copy(binaries)
        self._bin = binaries
        # Directly under the temp root: pytest's own temp dirs are private to root.
        self.data_dir = Path(tempfile.mkdtemp(prefix="ppray-pg-"))
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        pgdata = str(self.data_dir / "data")
        # A file, not a pipe: a chatty server must never block on a full pipe.
        self._log = open(self.data_dir / "postgres.log", "wb")  # noqa: SIM115
        self._cmd("initdb", "-D", pgdata, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.process = subprocess.Popen(
            [
                str(binaries / "postgres"),
                "-D",
                pgdata,
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-k",
                "",  # no Unix socket: TCP on loopback only
                "-c",
                "fsync=off",  # test data: speed over durability
            ],
            user=self._user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self._cmd("pg_isready", "-h", self.host, "-p", str(self.port), check=False)
            if ready.returncode == 0:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.data_dir / "postgres.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"postgres did not start on port {self.port}: {log[-2000:]}")
            time.sleep(0.1)
        if self.database != "postgres":
            self.create_database(self.database)
        return self

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its SQLAlchemy URL."""
        self._cmd("createdb", "-h", self.host, "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+psycopg2://postgres@{self.host}:{self.port}/{name}"

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, disconnecting its clients."""
        self._cmd(
            "dropdb", "-h", self.host, "-p", str(self.port), "-U", "postgres", "--force", name
        )

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT; kill after 10 s), then remove the data."""
        proc, self.process = self.process, None
        stop_process(proc, signal.SIGINT, 10.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a local PostgreSQL server (throwaway data)")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--database", default="apdb")
    args = parser.parse_args(argv)
    server = PostgresServer(args.port, database=args.database).start()
    pid = server.process and server.process.pid
    print(f"postgres on {server.url} (pid {pid}); apdb.db_url: {server.url}")
    return serve_until_interrupted(lambda: server.process, server.stop)


if __name__ == "__main__":
    raise SystemExit(main())
