"""Which APDB a deployment writes to: Rubin's (the default) or ppray's Parquet files.

Both have the same two calls, :class:`ApdbStore`: write one ``(visit,
detector)``'s rows, read a footprint's objects and history. The workers
write through it after association; the shard actors read their region from
it when they start, so a restarted shard forgets nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pyarrow as pa

from ppray.apdb.store import Apdb, ApdbTables
from ppray.config import ApdbConfig
from ppray.skyregion import Footprint

__all__ = ["ApdbStore", "create_store", "open_store"]


class ApdbStore(Protocol):
    """The APDB's store of record, as the pipeline uses it."""

    def write(
        self,
        visit: int,
        detector: int,
        *,
        dia_sources: pa.Table | None = None,
        dia_forced_sources: pa.Table | None = None,
        dia_objects: pa.Table | None = None,
        writer: str = "",
    ) -> list[str]:
        """Store one ``(visit, detector)``'s rows; a re-run leaves the APDB unchanged."""
        ...

    def read(
        self,
        footprint: Footprint,
        *,
        mjd_tai: float | None = None,
        history_days: float = 365.0,
    ) -> ApdbTables:
        """DiaObjects in ``footprint`` and their history (sources, forced sources)."""
        ...


def _sql_url(config: ApdbConfig, output_root: str) -> str:
    from ppray.apdb.rubin import default_sqlite_url

    return config.db_url or default_sqlite_url(output_root)


def _password(config: ApdbConfig) -> str | None:
    return None if config.db_password is None else config.db_password.get_secret_value()


def create_store(config: ApdbConfig, output_root: str) -> None:
    """Make the APDB's tables if they are not there (once per deployment, before workers).

    Nothing to do for the Parquet store (it makes its files as it writes) or for an
    APDB given by ``config_uri`` (made by its operator with ``apdb-cli``).
    """
    if config.backend == "rubin" and config.config_uri is None:
        from ppray.apdb.rubin import RubinApdb

        RubinApdb.create(
            _sql_url(config, output_root),
            password=_password(config),
            connection_timeout_s=config.connection_timeout_s,
        )


def _create_sqlite_once(url: str, timeout_s: float) -> None:
    """Make a SQLite APDB that is not there yet; concurrent openers wait for the first."""
    import fcntl

    from ppray.apdb.rubin import RubinApdb

    path = Path(url.removeprefix("sqlite:///"))
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            RubinApdb.create(url, connection_timeout_s=timeout_s)


def open_store(config: ApdbConfig, output_root: str) -> ApdbStore:
    """The deployment's APDB.

    A SQLite APDB is made on first use (the embedded default needs no set-up); any
    other SQL database by :func:`create_store`, which a deployment runs first.
    """
    if config.backend == "parquet":
        return Apdb(output_root, nside=config.partition_nside)
    from ppray.apdb.rubin import RubinApdb

    if config.config_uri is not None:
        return RubinApdb.open(config_uri=config.config_uri)
    url = _sql_url(config, output_root)
    if url.startswith("sqlite:///"):
        _create_sqlite_once(url, config.connection_timeout_s)
    return RubinApdb.open(
        db_url=url, password=_password(config), connection_timeout_s=config.connection_timeout_s
    )
