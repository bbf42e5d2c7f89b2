"""The APDB of record through Rubin's own code, ``lsst.dax.apdb``.

:class:`RubinApdb` has the interface of the Parquet store
(:class:`ppray.apdb.store.Apdb`: :meth:`~RubinApdb.write` one ``(visit,
detector)``, :meth:`~RubinApdb.read` a footprint) over any APDB that
``lsst.dax.apdb`` opens: SQLite (the embedded default), PostgreSQL, Cassandra.
Its tables are Rubin's (``lsst-sdm-schemas``' ``apdb.yaml``), whose columns
and units the alert schema's records share, so rows go in and come out with
the same names and no conversion.

A retried detector never writes twice: :meth:`RubinApdb.write` asks
``containsVisitDetector`` first, and should two attempts race past that check,
the second ``store`` (one transaction) fails on the primary keys, which the
deterministic ids make the same, and is rolled back whole; it then finds the
first attempt's rows and reports them written.

Versions of a DiaObject: ``store`` closes the open version of each object it
is given (``validityEndMjdTai``) and opens a new one that starts at the visit's
time, so each visit leaves one version per object it changed.
"""

from __future__ import annotations

import gc
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa

from ppray.apdb.store import TABLES, ApdbTables, conformed_rows
from ppray.errors import NonRetriableError, RetriableError
from ppray.schema import AlertSchema, conform_table, load_alert_schema
from ppray.skyregion import Footprint

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RubinApdb", "default_sqlite_url", "sphgeom_region", "with_password"]


def default_sqlite_url(output_root: str) -> str:
    """The embedded default: one SQLite file under a local output root."""
    parsed = urlparse(output_root)
    if parsed.scheme not in ("", "file"):
        raise NonRetriableError(
            f"apdb.db_url is not set and output_root {output_root!r} is not a local "
            "directory: SQLite needs a local file; set apdb.db_url (e.g. postgresql://...) "
            "or apdb.config_uri"
        )
    root = Path(parsed.path if parsed.scheme else output_root).resolve()
    return f"sqlite:///{root / 'apdb' / 'apdb.sqlite3'}"


def with_password(db_url: str, password: str | None) -> str:
    """``db_url`` with ``password`` in it (for the driver only: never log the result)."""
    if password is None:
        return db_url
    import sqlalchemy

    url = sqlalchemy.make_url(db_url).set(password=password)
    return url.render_as_string(hide_password=False)


def sphgeom_region(footprint: Footprint, pad_arcsec: float = 0.0) -> Any:
    """A ``lsst.sphgeom`` circle that contains ``footprint`` padded by ``pad_arcsec``."""
    from lsst.sphgeom import Angle, Circle, LonLat, UnitVector3d

    ra, dec, radius = footprint.bounding_cone()
    radius += pad_arcsec / 3600.0
    if radius >= 180.0:
        return Circle.full()
    return Circle(UnitVector3d(LonLat.fromDegrees(ra, dec)), Angle.fromDegrees(radius))


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """Columns as pandas' nullable types, so a null int stays a null, not a float NaN."""
    import pandas as pd

    nullable = {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
        pa.bool_(): pd.BooleanDtype(),
    }
    return table.to_pandas(types_mapper=nullable.get)


def _from_pandas(frame: pd.DataFrame | None, record: str, schema: AlertSchema) -> pa.Table:
    if frame is None or len(frame) == 0:
        return schema.arrow_schema(record).empty_table()
    return conform_table(pa.Table.from_pandas(frame, preserve_index=False), record, schema)


def _visit_mjd(tables: list[pa.Table | None]) -> float | None:
    """The visit's ``midpointMjdTai``: what ``store`` starts new DiaObject versions at."""
    for table in tables:
        if table is not None and table.num_rows:
            times = np.unique(table["midpointMjdTai"].to_numpy(zero_copy_only=False))
            if times.size != 1:
                raise ValueError(f"rows of one (visit, detector) hold {times.size} midpoints")
            return float(times[0])
    return None


def _database_error(exc: BaseException) -> tuple[str | None, str]:
    """What the database said, if ``exc`` (or what it wraps: pandas does) came from it.

    ``integrity`` a key broken; ``operational`` the database unreachable, locked or
    timed out; ``data`` a value it refused; None not the database's.
    """
    import sqlalchemy.exc as sa

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sa.DBAPIError):
            words = str(seen.orig).strip().splitlines()[0] if seen.orig else str(seen)
            if isinstance(seen, sa.IntegrityError):
                return "integrity", words
            if isinstance(seen, sa.OperationalError | sa.InterfaceError):
                return "operational", words
            return "data", words
        seen = seen.__cause__ or seen.__context__
    return None, ""


def _raise_for(exc: Exception, where: str) -> NoReturn:
    """Raise what the pipeline acts on: retry when the database was unreachable, locked
    or timed out (nothing was stored), fail for good when it refused a value."""
    kind, words = _database_error(exc)
    if kind in ("operational", "integrity"):
        raise RetriableError(f"{where} failed, to be retried: {words}") from exc
    if kind == "data":
        raise NonRetriableError(f"{where}: the database refused a value: {words}") from exc
    raise exc


class RubinApdb:
    """An APDB opened with ``lsst.dax.apdb``: store of record for DIA rows.

    Parameters
    ----------
    apdb
        An ``lsst.dax.apdb.Apdb`` (:meth:`open` makes one).
    object_pad_arcsec
        Reads of DiaObjects cover the footprint padded by this much.
    schema
        The alert schema whose records' columns rows are given and returned in.
    """

    def __init__(
        self,
        apdb: Any,
        *,
        object_pad_arcsec: float = 10.0,
        schema: AlertSchema | None = None,
    ) -> None:
        self.apdb = apdb
        self.object_pad_arcsec = object_pad_arcsec
        self.schema = schema or load_alert_schema()

    @classmethod
    def create(
        cls, db_url: str, *, password: str | None = None, connection_timeout_s: float = 60.0
    ) -> str:
        """Make the SQL APDB's tables at ``db_url`` if they are not there yet.

        Safe to call on an existing APDB (its rows are kept). Returns ``db_url``.
        """
        from lsst.dax.apdb.sql import ApdbSql

        if db_url.startswith("sqlite:///"):
            Path(db_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # init_database leaves its pooled connection to the garbage collector, which
            # warns that it was not closed; collect it here, where that is expected.
            warnings.simplefilter("ignore", ResourceWarning)
            ApdbSql.init_database(
                db_url=with_password(db_url, password),
                connection_timeout=math.ceil(connection_timeout_s),
            )
            gc.collect()
        return db_url

    @classmethod
    def open(
        cls,
        *,
        config_uri: str | None = None,
        db_url: str | None = None,
        password: str | None = None,
        connection_timeout_s: float = 60.0,
        object_pad_arcsec: float = 10.0,
    ) -> RubinApdb:
        """Open an existing APDB: by its config file (any backend) or a SQL URL.

        ``password`` goes into the URL given to the driver, never into a message.

        Raises
        ------
        NonRetriableError
            Neither or both given, or the database cannot be opened (the cause is
            chained).
        """
        from lsst.dax.apdb import Apdb
        from lsst.dax.apdb.sql import ApdbSqlConfig

        if (config_uri is None) == (db_url is None):
            raise NonRetriableError("open the APDB with one of config_uri or db_url")
        try:
            if config_uri is not None:
                apdb = Apdb.from_uri(config_uri)
            elif db_url is not None:
                config = ApdbSqlConfig(db_url=with_password(db_url, password))
                config.connection_config.connection_timeout = math.ceil(connection_timeout_s)
                # No pool: a worker stores once a visit, and pooled connections outlive
                # the worker's interest in them (left open at exit).
                config.connection_config.connection_pool = False
                apdb = Apdb.from_config(config)
        except Exception as exc:
            where = config_uri or db_url
            raise NonRetriableError(f"cannot open the APDB at {where}: {exc}") from exc
        return cls(apdb, object_pad_arcsec=object_pad_arcsec)

    def contains(self, visit: int, detector: int) -> bool:
        """Whether rows of ``(visit, detector)`` are stored (a re-run must not write)."""
        try:
            return bool(self.apdb.containsVisitDetector(int(visit), int(detector)))
        except Exception as exc:
            _raise_for(exc, f"APDB look-up of visit {visit} detector {detector}")
            raise  # not reached: _raise_for always raises

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
        """Store the rows of ``(visit, detector)`` unless they are stored already.

        Parameters
        ----------
        visit, detector
            Every DiaSource and DiaForcedSource row must carry them.
        dia_sources, dia_forced_sources, dia_objects
            Tables with the alert schema's columns; ``dia_objects`` the objects this
            detector created or updated (their new versions).
        writer
            Unused (the Parquet store's partial writers); must be empty.

        Returns
        -------
        list of str
            ``["<Table>/v<visit>_d<detector>", ...]`` for the tables written; empty
            when the ``(visit, detector)`` was stored before (a re-run) or has no rows.

        Raises
        ------
        ValueError
            A table lacks a required column, or holds rows of another visit or
            detector.
        """
        import astropy.time

        if writer:
            raise ValueError("the Rubin APDB is written whole per (visit, detector): no writer")
        tables = conformed_rows(
            visit,
            detector,
            {"DiaSource": dia_sources, "DiaForcedSource": dia_forced_sources,
             "DiaObject": dia_objects},
            self.schema,
        )  # fmt: skip
        mjd = _visit_mjd([tables.get("DiaSource"), tables.get("DiaForcedSource")])
        if mjd is None:
            # Objects change only through sources and forced sources of this visit.
            return []
        if self.contains(visit, detector):
            return []
        frames = {name: _to_pandas(table) for name, table in tables.items()}
        objects = frames.get("DiaObject")
        if objects is None:
            objects = _to_pandas(self.schema.arrow_schema("diaObject").empty_table())
        try:
            self.apdb.store(
                astropy.time.Time(mjd, format="mjd", scale="tai"),
                objects,
                frames.get("DiaSource"),
                frames.get("DiaForcedSource"),
            )
        except Exception as exc:
            kind, words = _database_error(exc)
            if kind != "integrity":
                _raise_for(exc, f"APDB store of visit {visit} detector {detector}")
            if self.contains(visit, detector):
                return []  # another attempt of this detector stored the same rows first
            raise NonRetriableError(
                f"APDB store of visit {visit} detector {detector} conflicts with rows "
                f"already stored: {words}"
            ) from exc
        return [f"{name}/v{int(visit)}_d{int(detector)}" for name in sorted(tables)]

    def read(
        self,
        footprint: Footprint,
        *,
        mjd_tai: float | None = None,
        history_days: float = 365.0,
    ) -> ApdbTables:
        """DiaObjects in ``footprint`` (latest versions) and their recent history.

        Parameters
        ----------
        footprint
            Where the objects' positions must lie.
        mjd_tai
            "Now": sources before ``mjd_tai - history_days`` are left out. None
            keeps all.
        history_days
            Length of the source history (Rubin preloads 12 months).

        Returns
        -------
        ApdbTables
            Objects, sources and forced sources, each sorted by its id.
        """
        if not (history_days >= 0 and math.isfinite(history_days)):
            raise ValueError(f"history_days must be finite and >= 0, not {history_days}")
        try:
            return self._read(footprint, mjd_tai, history_days)
        except Exception as exc:
            _raise_for(exc, "APDB read")

    def _read(self, footprint: Footprint, mjd_tai: float | None, history_days: float) -> ApdbTables:
        import astropy.time

        region = sphgeom_region(footprint, self.object_pad_arcsec)
        objects = _from_pandas(self.apdb.getDiaObjects(region), "diaObject", self.schema)
        inside = footprint.contains(objects["ra"].to_numpy(), objects["dec"].to_numpy())
        objects = objects.filter(pa.array(inside)).sort_by("diaObjectId")
        ids = [int(i) for i in objects["diaObjectId"].to_pylist()]
        start = 0.0 if mjd_tai is None else mjd_tai - history_days
        # With an explicit start, lsst.dax.apdb uses the visit time for nothing else.
        begin = astropy.time.Time(start, format="mjd", scale="tai")
        now = begin if mjd_tai is None else astropy.time.Time(mjd_tai, format="mjd", scale="tai")
        out = {}
        for name, getter in (
            ("DiaSource", self.apdb.getDiaSources),
            ("DiaForcedSource", self.apdb.getDiaForcedSources),
        ):
            frame = getter(region, ids, now, begin) if ids else None
            rows = _from_pandas(frame, TABLES[name], self.schema)
            out[name] = rows.sort_by(f"{TABLES[name]}Id")
        return ApdbTables(objects, out["DiaSource"], out["DiaForcedSource"])
