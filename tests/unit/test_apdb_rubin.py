"""The APDB of record on Rubin's ``lsst.dax.apdb``, on SQLite and on a real PostgreSQL
server: rows round-trip unchanged, object versions, a re-run writes nothing, racing
attempts, bad input."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ppray.alerts.diasource import dia_source_table
from ppray.apdb.ids import pack_id
from ppray.apdb.rubin import RubinApdb, default_sqlite_url, with_password
from ppray.apdb.shard import ApdbShard
from ppray.config import load_config
from ppray.errors import NonRetriableError, RetriableError
from ppray.schema import load_alert_schema, table_from_columns
from ppray.skyregion import Footprint
from ppray.testing.postgres import PostgresServer

from .simdata_apdb import dia_like, tan_wcs, visit_info


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def apdb(request: pytest.FixtureRequest, tmp_path: Path) -> RubinApdb:
    """A fresh APDB on SQLite (the embedded default) and on a real PostgreSQL server."""
    if request.param == "sqlite":
        url = default_sqlite_url(str(tmp_path))
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.create_database(f"apdb_{uuid.uuid4().hex[:12]}")
    return RubinApdb.open(db_url=RubinApdb.create(url))


def _rows(k: int, detector: int, ra: np.ndarray, dec: np.ndarray) -> pa.Table:
    info = visit_info(k, detector)
    return dia_source_table(dia_like(ra, dec), info, wcs=tan_wcs(float(ra[0]), float(dec[0])))


def _forced(k: int, detector: int, objects: pa.Table) -> pa.Table:
    """Forced photometry of ``objects`` in visit ``k`` (fluxes made up, ids as the pipeline's)."""
    info = visit_info(k, detector)
    n = objects.num_rows
    cols = {
        "diaForcedSourceId": pack_id(info.visit, detector, np.arange(n)),
        "diaObjectId": objects["diaObjectId"].to_numpy(),
        "ra": objects["ra"].to_numpy(),
        "dec": objects["dec"].to_numpy(),
        "visit": np.full(n, info.visit),
        "detector": np.full(n, detector),
        "psfFlux": np.linspace(100.0, 200.0, n),
        "psfFluxErr": np.full(n, 10.0),
        "midpointMjdTai": np.full(n, info.midpoint_mjd_tai),
        "band": np.full(n, info.band, dtype=object),
        "timeProcessedMjdTai": np.full(n, info.midpoint_mjd_tai + 0.001),
    }
    return table_from_columns(cols, n, "diaForcedSource", load_alert_schema())


def _same(got: pa.Table, want: pa.Table, key: str) -> None:
    want = want.sort_by(key)
    assert got.schema == want.schema
    for name in want.column_names:
        a, b = got[name].to_pylist(), want[name].to_pylist()
        if got.schema.field(name).type in (pa.float32(), pa.float64()):
            np.testing.assert_array_equal(
                np.array(a, dtype=float), np.array(b, dtype=float), err_msg=name
            )
        else:
            assert a == b, name


def test_rows_round_trip_through_rubins_apdb(apdb: RubinApdb) -> None:
    shard = ApdbShard()
    ra, dec = np.array([150.0, 150.001, 150.3]), np.array([2.0, 2.0, 2.1])
    first = shard.associate(_rows(0, 5, ra, dec))
    visit = visit_info(0).visit
    written = apdb.write(visit, 5, dia_sources=first.dia_sources, dia_objects=first.dia_objects)
    assert written == [f"DiaObject/v{visit}_d5", f"DiaSource/v{visit}_d5"]
    # Visit 1: two of the objects seen again, the third measured by forced photometry.
    again = shard.associate(_rows(1, 5, ra[:2] + 1e-5, dec[:2]))
    forced = _forced(1, 5, first.dia_objects.filter(pa.array([False, False, True])))
    updated = shard.record_forced(forced)
    objects = pa.concat_tables([again.dia_objects, updated]).sort_by("diaObjectId")
    apdb.write(
        visit_info(1).visit,
        5,
        dia_sources=again.dia_sources,
        dia_forced_sources=forced,
        dia_objects=objects,
    )
    got = apdb.read(Footprint.cone(150.1, 2.0, 1.0), mjd_tai=visit_info(1).midpoint_mjd_tai)
    held = shard.snapshot()
    _same(got.dia_objects, held.dia_objects, "diaObjectId")
    _same(got.dia_sources, held.dia_sources, "diaSourceId")
    _same(got.dia_forced_sources, held.dia_forced_sources, "diaForcedSourceId")
    assert got.dia_objects["nDiaSources"].to_pylist() == [2, 2, 1]
    # Rubin's own reader sees one open version per object, the older ones closed.
    import lsst.sphgeom as sg

    everything = apdb.apdb.getDiaObjects(sg.Circle.full())
    assert len(everything) == 3 and everything["validityEndMjdTai"].isna().all()
    # History older than the window is left out, the objects are not.
    later = apdb.read(Footprint.cone(150.1, 2.0, 1.0), mjd_tai=visit_info(1).midpoint_mjd_tai + 400)
    assert later.dia_objects.num_rows == 3 and later.dia_sources.num_rows == 0
    # Outside the footprint: nothing.
    assert apdb.read(Footprint.cone(10.0, -40.0, 1.0)).dia_objects.num_rows == 0


def test_a_rerun_writes_nothing(apdb: RubinApdb, tmp_path: Path) -> None:
    res = ApdbShard().associate(_rows(0, 5, np.array([150.0, 150.2]), np.array([2.0, 2.0])))
    visit = visit_info(0).visit
    assert apdb.write(visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects)
    assert apdb.contains(visit, 5) and not apdb.contains(visit, 6)
    before = apdb.read(Footprint.cone(150.1, 2.0, 1.0))
    assert apdb.write(visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects) == []
    after = apdb.read(Footprint.cone(150.1, 2.0, 1.0))
    for name in ("dia_objects", "dia_sources", "dia_forced_sources"):
        assert getattr(before, name).equals(getattr(after, name)), name


def test_racing_attempts_store_once(apdb: RubinApdb, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two attempts past the contains() check: the second store is rolled back whole."""
    res = ApdbShard().associate(_rows(0, 5, np.array([150.0, 150.2]), np.array([2.0, 2.0])))
    visit = visit_info(0).visit
    other = RubinApdb(apdb.apdb)
    assert other.write(visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects)
    calls: list[bool] = []
    real = apdb.contains

    def late(v: int, d: int) -> bool:
        calls.append(True)
        return real(v, d) if len(calls) > 1 else False  # the first check ran before the store

    monkeypatch.setattr(apdb, "contains", late)
    assert apdb.write(visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects) == []
    assert len(calls) == 2
    import lsst.sphgeom as sg

    assert len(apdb.apdb.getDiaObjects(sg.Circle.full())) == 2


def test_bad_input_is_named(apdb: RubinApdb, tmp_path: Path) -> None:
    res = ApdbShard().associate(_rows(0, 5, np.array([150.0]), np.array([2.0])))
    visit = visit_info(0).visit
    with pytest.raises(ValueError, match="'detector'"):
        apdb.write(visit, 9, dia_sources=res.dia_sources)
    with pytest.raises(ValueError, match="required column 'ra'"):
        apdb.write(visit, 5, dia_sources=res.dia_sources.drop_columns(["ra"]))
    with pytest.raises(NonRetriableError, match="cannot open the APDB"):
        RubinApdb.open(db_url=f"sqlite:///{tmp_path}/nothing/here.sqlite3")
    with pytest.raises(NonRetriableError, match="SQLite needs a local file"):
        default_sqlite_url("s3://bucket/out")
    # A conflict that is not a re-run (another detector's object ids) is an error, not lost.
    shifted = res.dia_sources.set_column(
        res.dia_sources.schema.get_field_index("detector"), "detector", pa.array([6], pa.int32())
    )
    apdb.write(visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects)
    with pytest.raises(NonRetriableError, match="conflicts with rows already stored"):
        apdb.write(visit, 6, dia_sources=shifted, dia_objects=res.dia_objects)


def test_rubins_tables_hold_every_alert_record_column(apdb: RubinApdb) -> None:
    """What lets rows go in and out unconverted: the APDB's columns (lsst-sdm-schemas)
    include every column of the alert schema's records, with the same nullability."""
    from lsst.dax.apdb import ApdbTables as Tables

    schema = load_alert_schema()
    for table, record in (
        (Tables.DiaObject, "diaObject"),
        (Tables.DiaSource, "diaSource"),
        (Tables.DiaForcedSource, "diaForcedSource"),
    ):
        columns = {c.name: c for c in apdb.apdb.tableDef(table).columns}
        for field in schema.arrow_schema(record):
            assert field.name in columns, (record, field.name)
            assert columns[field.name].nullable == field.nullable, (record, field.name)


def test_the_password_reaches_the_driver_and_no_message() -> None:
    url = "postgresql+psycopg2://ppray@127.0.0.1:1/apdb"
    assert (
        with_password(url, "s3cr:t@") == "postgresql+psycopg2://ppray:s3cr%3At%40@127.0.0.1:1/apdb"
    )
    assert with_password(url, None) == url
    with pytest.raises(NonRetriableError, match="cannot open the APDB") as caught:
        RubinApdb.open(db_url=url, password="s3cr:t@", connection_timeout_s=1)
    assert "s3cr" not in str(caught.value)
    config = load_config(env={"PPRAY_APDB__DB_URL": url, "PPRAY_APDB__DB_PASSWORD": "1234"})
    assert config.apdb.db_password is not None
    assert config.apdb.db_password.get_secret_value() == "1234"
    assert "1234" not in repr(config) and "1234" not in config.model_dump_json()


def test_database_errors_are_told_apart(
    apdb: RubinApdb, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A value the database refuses fails for good; a database gone is retried."""
    res = ApdbShard().associate(_rows(0, 5, np.array([150.0]), np.array([2.0])))
    visit = visit_info(0).visit
    if "postgresql" in request.node.callspec.params["apdb"]:
        # Rubin's schema keeps reliabilityVersion to 7 characters (SQLite ignores lengths).
        long_version = res.dia_sources.set_column(
            res.dia_sources.schema.get_field_index("reliabilityVersion"),
            "reliabilityVersion",
            pa.array(["much-too-long"]),
        )
        with pytest.raises(NonRetriableError, match=r"refused a value.*too long"):
            apdb.write(visit, 5, dia_sources=long_version, dia_objects=res.dia_objects)
        assert not apdb.contains(visit, 5)  # one transaction: nothing of it stored
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.create_database("doomed")
        doomed = RubinApdb.open(db_url=RubinApdb.create(url))
        server.drop_database("doomed")
    else:
        url = RubinApdb.create(default_sqlite_url(str(tmp_path / "doomed")))
        doomed = RubinApdb.open(db_url=url)
        (tmp_path / "doomed" / "apdb" / "apdb.sqlite3").unlink()
    with pytest.raises(RetriableError, match="failed, to be retried"):
        doomed.write(visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects)
