"""APDB: ids, footprints, schema-shaped tables, idempotent Parquet writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from lsst.alert.packet import get_latest_schema_version
from numpy.testing import assert_allclose

from ppray.alerts.diasource import dia_source_table
from ppray.apdb.ids import pack_id, unpack_id
from ppray.apdb.shard import ApdbShard, AssociationResult
from ppray.apdb.store import Apdb
from ppray.errors import NonRetriableError
from ppray.schema import conform_table, load_alert_schema
from ppray.skyregion import Footprint, angular_separation_deg, healpix_pixels

from .simdata_apdb import dia_like, tan_wcs, visit_info


def test_schema_is_the_packages_newest() -> None:
    schema = load_alert_schema()
    assert schema.version == tuple(get_latest_schema_version())
    avro_names = [f["name"] for f in schema.record("diaSource")["fields"]]
    assert schema.arrow_schema("diaSource").names == avro_names
    assert "diaObjectId" in schema.required("diaObject")
    assert schema.bands == ("u", "g", "r", "i", "z", "y")


@pytest.mark.parametrize("exposure", [0, 7, 2**33 - 1, 2026010100017, 2204123199999])
def test_ids_round_trip(exposure: int) -> None:
    idx = np.array([0, 1, 2**21 - 1])
    ids = pack_id(exposure, 188, idx)
    assert ids.dtype == np.int64 and (ids > 0).all()
    for k, packed in zip(idx, ids, strict=True):
        assert unpack_id(int(packed)) == (exposure, 188, int(k))


def test_ids_distinct_and_bad_input() -> None:
    a = pack_id(2026010100017, 3, np.arange(5))
    b = pack_id(2026010100017, 4, np.arange(5))
    c = pack_id(2026010100018, 3, np.arange(5))
    assert np.unique(np.concatenate([a, b, c])).size == 15
    with pytest.raises(ValueError, match="detector"):
        pack_id(1, 256, 0)
    with pytest.raises(ValueError, match="index"):
        pack_id(1, 0, 2**21)
    with pytest.raises(ValueError, match="exposure id"):
        pack_id(2026133100001, 0, 0)  # month 13


def test_footprints_contain_and_cover() -> None:
    rng = np.random.default_rng(0)
    ra, dec = rng.uniform(0, 360, 20000), np.degrees(np.arcsin(rng.uniform(-1, 1, 20000)))
    feet = [
        Footprint.cone(359.5, 0.3, 2.0),  # across RA 0
        Footprint.cone(10.0, 89.0, 3.0),  # over the pole
        Footprint.box(355.0, 5.0, -3.0, 4.0),  # wraps
        Footprint.box(0.0, 360.0, 80.0, 90.0),  # polar cap
        Footprint.pixels(8, [0, 5, 700]),
    ]
    for foot in feet:
        inside = foot.contains(ra, dec)
        assert inside.any()
        covered = np.isin(healpix_pixels(ra[inside], dec[inside], 32), foot.healpix(32))
        assert covered.all(), foot
    cone = feet[0]
    sep = angular_separation_deg(ra, dec, 359.5, 0.3)
    assert (cone.contains(ra, dec) == (sep <= 2.0)).all()
    box = feet[2]
    in_ra = (ra >= 355) | (ra <= 5)
    assert (box.contains(ra, dec) == (in_ra & (dec >= -3) & (dec <= 4))).all()


def _visit_rows(k: int, detector: int, ra: np.ndarray, dec: np.ndarray) -> pa.Table:
    info = visit_info(k, detector)
    return dia_source_table(dia_like(ra, dec), info, wcs=tan_wcs(float(ra[0]), float(dec[0])))


def _associated(k: int, ra: np.ndarray, dec: np.ndarray, detector: int = 5) -> AssociationResult:
    shard = ApdbShard()
    return shard.associate(_visit_rows(k, detector, ra, dec))


def _sorted(table: pa.Table, key: str) -> pa.Table:
    return table.sort_by(key)


def test_write_read_round_trip(tmp_path: Path) -> None:
    ra = np.array([150.0, 150.001, 152.0])
    dec = np.array([2.0, 2.0, 2.5])
    res = _associated(0, ra, dec)
    apdb = Apdb(str(tmp_path), nside=32)
    info = visit_info(0, 5)
    apdb.write(info.visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects)
    got = apdb.read(Footprint.cone(151.0, 2.2, 3.0), mjd_tai=info.midpoint_mjd_tai)
    assert got.dia_sources.equals(_sorted(res.dia_sources, "diaSourceId"))
    assert got.dia_objects.equals(_sorted(res.dia_objects, "diaObjectId"))
    assert got.dia_forced_sources.num_rows == 0
    small = apdb.read(Footprint.cone(150.0, 2.0, 0.01))
    assert small.dia_objects.num_rows == 2 and small.dia_sources.num_rows == 2
    # Sources older than the history window are left out; objects are not.
    later = apdb.read(Footprint.cone(151.0, 2.2, 3.0), mjd_tai=info.midpoint_mjd_tai + 400)
    assert later.dia_objects.num_rows == 3 and later.dia_sources.num_rows == 0


def test_rewrite_is_idempotent(tmp_path: Path) -> None:
    ra = np.array([150.0, 150.001, 160.0])  # two HEALPix pixels
    dec = np.array([2.0, 2.0, -1.0])
    res = _associated(0, ra, dec)
    apdb = Apdb(str(tmp_path), nside=32)
    visit = visit_info(0).visit
    foot = Footprint.box(140, 170, -10, 10)
    apdb.write(visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects)
    once = apdb.read(foot)
    files_once = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    apdb.write(visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects)
    twice = apdb.read(foot)
    files_twice = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    assert files_once == files_twice
    for name in ("dia_objects", "dia_sources", "dia_forced_sources"):
        assert getattr(once, name).equals(getattr(twice, name)), name
    assert twice.dia_sources.num_rows == 3

    # A re-run that finds fewer sources (none in the second pixel) replaces, not adds.
    rerun = _associated(0, ra[:2], dec[:2])
    apdb.write(visit, 5, dia_sources=rerun.dia_sources, dia_objects=rerun.dia_objects)
    third = apdb.read(foot)
    assert third.dia_sources.num_rows == 2 and third.dia_objects.num_rows == 2
    assert not list(tmp_path.rglob("*.tmp-*"))
    # Another detector's rows of the same visit are untouched by these writes.
    other = _associated(0, np.array([151.0]), np.array([2.0]), detector=6)
    apdb.write(visit, 6, dia_sources=other.dia_sources, dia_objects=other.dia_objects)
    apdb.write(visit, 5, dia_sources=rerun.dia_sources, dia_objects=rerun.dia_objects)
    assert apdb.read(foot).dia_sources.num_rows == 3


def test_object_versions_latest_wins(tmp_path: Path) -> None:
    shard = ApdbShard()
    apdb = Apdb(str(tmp_path))
    for k in range(3):
        res = shard.associate(_visit_rows(k, 5, np.array([150.0]), np.array([2.0])))
        apdb.write(visit_info(k).visit, 5, dia_sources=res.dia_sources, dia_objects=res.dia_objects)
    got = apdb.read(Footprint.cone(150.0, 2.0, 0.1))
    assert got.dia_objects.num_rows == 1
    assert got.dia_objects["nDiaSources"].to_pylist() == [3]
    assert got.dia_sources.num_rows == 3
    assert got.dia_objects.equals(shard.snapshot().dia_objects)


def test_write_rejects_bad_tables(tmp_path: Path) -> None:
    res = _associated(0, np.array([150.0]), np.array([2.0]))
    apdb = Apdb(str(tmp_path))
    visit = visit_info(0).visit
    with pytest.raises(ValueError, match="'detector'"):
        apdb.write(visit, 9, dia_sources=res.dia_sources)
    with pytest.raises(ValueError, match="required column 'ra'"):
        apdb.write(visit, 5, dia_sources=res.dia_sources.drop_columns(["ra"]))
    null_ra = res.dia_objects.set_column(2, "ra", pa.nulls(1, pa.float64()))
    with pytest.raises(ValueError, match="'ra' is null"):
        apdb.write(visit, 5, dia_objects=null_ra)
    apdb.write(visit, 5, dia_sources=res.dia_sources)
    with pytest.raises(NonRetriableError, match="nside"):
        Apdb(str(tmp_path), nside=64).read(Footprint.cone(150.0, 2.0, 1.0))


def test_conform_table_casts_and_fills() -> None:
    table = pa.table({"diaForcedSourceId": [1], "diaObjectId": [2], "ra": [1.0], "dec": [2.0]})
    table = table.append_column("visit", pa.array([3], pa.int32()))
    with pytest.raises(ValueError, match="'detector' is missing"):
        conform_table(table, "diaForcedSource")
    for name, value in (("detector", 4), ("midpointMjdTai", 6e4), ("timeProcessedMjdTai", 6e4)):
        table = table.append_column(name, pa.array([value]))
    table = table.append_column("extra", pa.array([0]))
    out = conform_table(table, "diaForcedSource")
    assert out.schema == load_alert_schema().arrow_schema("diaForcedSource")
    assert out["psfFlux"].null_count == 1 and "extra" not in out.column_names
    with pytest.raises(ValueError, match="'visit'"):
        conform_table(table.set_column(4, "visit", pa.array(["x"])), "diaForcedSource")


def test_dia_source_table_units() -> None:
    ra0, dec0 = 30.0, -20.0
    wcs = tan_wcs(ra0, dec0, scale_arcsec=0.2, rotation_deg=30.0, sip=False)
    x, y = np.array([50.0, 120.0]), np.array([60.0, 30.0])
    ra, dec = wcs.all_pix2world(x, y, 0)
    flux = np.array([1234.0, -500.0])
    info = visit_info(2, detector=7, zero_point_mag=27.5)
    table = dia_source_table(dia_like(ra, dec, flux, x=x, y=y), info, wcs=wcs)
    expect_njy = flux * 10 ** (-0.4 * (27.5 - 31.4)) / 30.0
    assert_allclose(table["psfFlux"].to_numpy(), expect_njy, rtol=1e-6)
    assert table["diaSourceId"].to_pylist() == pack_id(info.visit, 7, [0, 1]).tolist()
    # Isotropic pixel scale: sky errors are pixel errors times 0.2"; rotation mixes x and y.
    err = np.hypot(table["raErr"].to_numpy(), table["decErr"].to_numpy()) * 3600
    assert_allclose(err, np.hypot(0.05, 0.07) * 0.2, rtol=1e-3)
    assert table["band"].to_pylist() == ["r", "r"]
    uncal = dia_source_table(
        dia_like(ra, dec, flux), info.model_copy(update={"zero_point_mag": None})
    )
    assert uncal["psfFlux"].null_count == 2 and uncal["raErr"].null_count == 2
    with pytest.raises(ValueError, match="no finite ra/dec"):
        dia_source_table(dia_like(np.array([np.nan]), np.array([1.0])), info)
    wrong = dia_like(ra, dec).append_column("detector", pa.array([1, 1], pa.int32()))
    with pytest.raises(ValueError, match="'detector'"):
        dia_source_table(wrong, info)
