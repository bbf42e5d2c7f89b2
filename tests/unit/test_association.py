"""Association on repeat visits, DiaObject summaries, shards, forced photometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from numpy.testing import assert_allclose
from scipy.special import erf

from ppray.alerts.diasource import dia_source_table
from ppray.alerts.forced import forced_photometry, psf_fluxes
from ppray.apdb.rowstore import RowStore
from ppray.apdb.shard import ApdbShard
from ppray.apdb.store import ApdbTables
from ppray.image import Exposure, MaskBit
from ppray.skyregion import Footprint, angular_separation_deg

from .simdata_apdb import dia_like, offset_radec, render, tan_wcs, visit_info


def _rows(
    k: int, ra: list[float], dec: list[float], detector: int = 0, flux: list[float] | None = None
) -> pa.Table:
    info = visit_info(k, detector)
    table = dia_like(np.array(ra), np.array(dec), None if flux is None else np.asarray(flux))
    return dia_source_table(table, info)


def _tables_equal(a: ApdbTables, b: ApdbTables) -> None:
    for name in ("dia_objects", "dia_sources", "dia_forced_sources"):
        assert getattr(a, name).equals(getattr(b, name)), name


def test_variable_star_five_visits_one_object() -> None:
    rng = np.random.default_rng(0)
    ra0, dec0 = 150.0, 2.0
    shard = ApdbShard()
    fluxes, errs, mjds = [], [], []
    for k in range(5):
        # Centroid scatter of ~0.1" and a varying flux; a steady field star beside it.
        ra, dec = offset_radec(ra0, dec0, *rng.normal(0.0, 0.1, 2))
        flux = 1000.0 + 300.0 * np.sin(k)
        table = _rows(k, [ra, ra0 + 0.01], [dec, dec0], flux=[flux, 500.0])
        res = shard.associate(table)
        assert (res.n_matched, res.n_new) == ((0, 2) if k == 0 else (2, 0))
        assert res.prv_dia_sources.num_rows == 2 * k
        fluxes.append(table["psfFlux"][0].as_py())
        errs.append(table["psfFluxErr"][0].as_py())
        mjds.append(table["midpointMjdTai"][0].as_py())
    snap = shard.snapshot()
    assert snap.dia_objects.num_rows == 2
    assert snap.dia_sources.num_rows == 10
    star = snap.dia_objects.filter(pa.compute.less(snap.dia_objects["ra"], 150.005)).to_pylist()[0]
    assert star["nDiaSources"] == 5
    srcs = snap.dia_sources.filter(
        pa.compute.equal(snap.dia_sources["diaObjectId"], star["diaObjectId"])
    )
    assert srcs.num_rows == 5
    assert star["diaObjectId"] == min(srcs["diaSourceId"].to_pylist())
    f, e = np.array(fluxes), np.array(errs)
    w = 1 / e**2
    assert_allclose(star["r_psfFluxMean"], (w * f).sum() / w.sum(), rtol=1e-6)
    assert_allclose(star["r_psfFluxMeanErr"], 1 / np.sqrt(w.sum()), rtol=1e-6)
    assert_allclose(star["r_psfFluxSigma"], f.std(ddof=1), rtol=1e-6)
    assert_allclose(star["r_psfFluxMin"], f.min(), rtol=1e-6)
    assert_allclose(star["r_psfFluxMax"], f.max(), rtol=1e-6)
    assert_allclose(star["r_psfFluxMaxSlope"], (np.diff(f) / np.diff(mjds)).max(), rtol=1e-5)
    assert star["r_psfFluxNdata"] == 5 and star["g_psfFluxNdata"] == 0
    assert star["g_psfFluxMean"] is None
    assert (star["firstDiaSourceMjdTai"], star["lastDiaSourceMjdTai"]) == (mjds[0], mjds[-1])
    assert angular_separation_deg(star["ra"], star["dec"], ra0, dec0) * 3600 < 0.2


@pytest.mark.parametrize(
    ("ra0", "dec0", "sep_arcsec", "matched"),
    [
        (150.0, 2.0, 0.5, True),
        (150.0, 2.0, 3.0, False),
        (150.0, 2.0, 0.95, True),
        (150.0, 2.0, 1.05, False),
        (359.99995, 0.0, 0.5, True),  # the second source lands at RA ~0.0001
        (359.99995, 0.0, 3.0, False),
        (0.0, 89.99995, 0.5, True),  # at the pole, RA means little
        (123.0, -89.9999, 0.5, True),
        (123.0, -89.9999, 3.0, False),
    ],
)
def test_match_radius(ra0: float, dec0: float, sep_arcsec: float, matched: bool) -> None:
    ra1, dec1 = offset_radec(ra0, dec0, sep_arcsec, 0.0)
    assert_allclose(angular_separation_deg(ra0, dec0, ra1, dec1) * 3600, sep_arcsec, rtol=1e-6)
    shard = ApdbShard(radius_arcsec=1.0)
    shard.associate(_rows(0, [ra0], [dec0]))
    res = shard.associate(_rows(1, [ra1], [dec1]))
    assert res.n_matched == int(matched)
    assert shard.n_objects == (1 if matched else 2)


def test_nearest_source_claims_the_object() -> None:
    shard = ApdbShard()
    shard.associate(_rows(0, [10.0], [-5.0]))
    near, far = offset_radec(10.0, -5.0, 0.3, 0.0), offset_radec(10.0, -5.0, -0.8, 0.0)
    # The far source comes first in the table: order must not matter, distance does.
    res = shard.associate(_rows(1, [far[0], near[0]], [far[1], near[1]]))
    assert (res.n_matched, res.n_new) == (1, 1)
    obj = shard.snapshot().dia_objects["diaObjectId"][0].as_py()
    by_ra = {round(r["ra"], 7): r["diaObjectId"] for r in res.dia_sources.to_pylist()}
    assert by_ra[round(near[0], 7)] == obj and by_ra[round(far[0], 7)] != obj


def _two_detector_visit(shard: ApdbShard, order: list[int] | None) -> None:
    shard.associate(_rows(0, [20.0, 20.01], [1.0, 1.0], detector=1))
    shard.associate(_rows(0, [20.05], [1.0], detector=2))
    # Visit 1: detector 1 sees both old objects; detector 2 sees one of them too (an
    # overlap real cameras do not have) plus a new source that detector 1 also sees.
    near = offset_radec(20.0, 1.0, 0.4, 0.0)
    new = offset_radec(20.03, 1.0, 0.0, 0.0)
    t1 = _rows(1, [near[0], 20.01, new[0]], [near[1], 1.0, new[1]], detector=1)
    other = offset_radec(20.0, 1.0, -0.2, 0.0)
    new2 = offset_radec(20.03, 1.0, 0.3, 0.0)
    t2 = _rows(1, [other[0], 20.05, new2[0]], [other[1], 1.0, new2[1]], detector=2)
    if order is None:
        shard.associate(pa.concat_tables([t2, t1]))
    else:
        for d in order:
            shard.associate({1: t1, 2: t2}[d])


def test_detector_order_does_not_change_the_result() -> None:
    shards = [ApdbShard(), ApdbShard(), ApdbShard()]
    _two_detector_visit(shards[0], [1, 2])
    _two_detector_visit(shards[1], [2, 1])
    _two_detector_visit(shards[2], None)
    snaps = [s.snapshot() for s in shards]
    _tables_equal(snaps[0], snaps[1])
    _tables_equal(snaps[0], snaps[2])
    # Objects made in visit 1 are not matched within visit 1 (both detectors made one).
    assert snaps[0].dia_objects.num_rows == 5


def test_retry_replaces_not_duplicates() -> None:
    once, twice = ApdbShard(), ApdbShard()
    for shard, repeats in ((once, 1), (twice, 3)):
        shard.associate(_rows(0, [40.0, 40.01], [3.0, 3.0]))
        for _ in range(repeats):
            res = shard.associate(_rows(1, [40.0, 40.02], [3.0, 3.0]))
        assert (res.n_matched, res.n_new) == (1, 1)
    _tables_equal(once.snapshot(), twice.snapshot())
    assert once.snapshot().dia_sources.num_rows == 4


def test_snapshot_load_and_preload() -> None:
    shard = ApdbShard(history_days=30)
    for k in range(3):
        shard.associate(_rows(k, [60.0, 61.0], [-30.0, -30.0]))
    restored = ApdbShard(history_days=30)
    restored.load(shard.snapshot())
    _tables_equal(shard.snapshot(), restored.snapshot())
    nxt = _rows(3, [60.0, 62.0], [-30.0, -30.0])
    a, b = shard.associate(nxt), restored.associate(nxt)
    assert a.dia_objects.equals(b.dia_objects) and a.dia_sources.equals(b.dia_sources)
    pre = shard.preload(Footprint.cone(60.0, -30.0, 0.1))
    assert pre.dia_objects.num_rows == 1 and pre.dia_sources.num_rows == 4
    # 40 days later only sources of the last 30 days count.
    late = shard.preload(Footprint.cone(60.0, -30.0, 0.1), mjd_tai=61041.1 + 3 + 29.5)
    assert late.dia_sources.num_rows == 1


def test_region_and_input_errors() -> None:
    shard = ApdbShard(Footprint.box(0, 10, -5, 5))
    with pytest.raises(ValueError, match="outside this shard's region"):
        shard.associate(_rows(0, [20.0], [0.0]))
    assert shard.owns(np.array([5.0, 20.0]), np.array([0.0, 0.0])).tolist() == [True, False]
    mixed = pa.concat_tables([_rows(0, [1.0], [0.0]), _rows(1, [2.0], [0.0])])
    with pytest.raises(ValueError, match="one visit at a time"):
        shard.associate(mixed)
    with pytest.raises(ValueError, match="radius"):
        ApdbShard(radius_arcsec=0)


@dataclass(frozen=True)
class Scene:
    diff: Exposure
    sci: Exposure
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    ra: np.ndarray
    dec: np.ndarray


def _forced_scene(seed: int = 0) -> Scene:
    shape = (160, 160)
    wcs = tan_wcs(80.0, 10.0, shape)
    rng = np.random.default_rng(seed)
    # Isolated sources (a 6 x 6 grid, jittered): blends would bias any forced PSF flux.
    gx, gy = np.meshgrid(np.arange(6) * 26.0 + 15.0, np.arange(6) * 26.0 + 15.0)
    x = gx.ravel() + rng.uniform(-3, 3, gx.size)
    y = gy.ravel() + rng.uniform(-3, 3, gx.size)
    flux = rng.uniform(300.0, 3000.0, x.size)
    diff = render(shape, x, y, flux, 1.6, sky_var=400.0, seed=seed, wcs=wcs)
    sci = render(shape, x, y, flux + 5000.0, 1.6, sky_var=900.0, seed=seed + 1, wcs=wcs)
    ra, dec = wcs.all_pix2world(x, y, 0)
    return Scene(diff, sci, x, y, flux, ra, dec)


@pytest.mark.parametrize("kernel", [False, True])
def test_forced_photometry_recovers_injected_fluxes(kernel: bool) -> None:
    sc = _forced_scene()
    diff, sci, x, y, flux, ra, dec = sc.diff, sc.sci, sc.x, sc.y, sc.flux, sc.ra, sc.dec
    psf: float | np.ndarray = 1.6
    if kernel:  # the same Gaussian as a pixel image (integrated over pixels, as rendered)
        edges = (np.arange(-8, 10) - 0.5) / (np.sqrt(2) * 1.6)
        frac = 0.5 * np.diff(erf(edges))
        psf = np.outer(frac, frac)
    f, e = psf_fluxes(diff, x, y, psf)
    pull = (f - flux) / e
    assert np.abs(pull).max() < 4.5
    assert abs(pull.mean()) < 3 / np.sqrt(pull.size)
    assert 0.7 < pull.std() < 1.3
    # The error is the Cramér-Rao bound for a Gaussian PSF on flat noise.
    assert_allclose(e, np.sqrt(4 * np.pi * 1.6**2 * 400.0), rtol=0.05)

    objects = pa.table(
        {
            "diaObjectId": np.arange(100, 100 + x.size, dtype=np.int64)[::-1].copy(),
            "ra": np.r_[ra[:-1], 81.0],  # the last one is far off the detector
            "dec": np.r_[dec[:-1], 12.0],
        }
    )
    info = visit_info(0, 3)
    rows = forced_photometry(objects, info, difference=diff, science=sci, psf=psf)
    assert rows.num_rows == x.size - 1
    assert rows["diaObjectId"].to_pylist() == sorted(rows["diaObjectId"].to_pylist())
    njy = info.njy_per_electron
    assert njy is not None
    by_id = dict(zip(objects["diaObjectId"].to_pylist(), range(x.size), strict=True))
    k = np.array([by_id[i] for i in rows["diaObjectId"].to_pylist()])
    pull = (rows["psfFlux"].to_numpy() / njy - flux[k]) / (rows["psfFluxErr"].to_numpy() / njy)
    assert np.abs(pull).max() < 4.5
    sci_pull = (rows["scienceFlux"].to_numpy() / njy - flux[k] - 5000) / (
        rows["scienceFluxErr"].to_numpy() / njy
    )
    assert np.abs(sci_pull).max() < 4.5


def test_forced_photometry_masks_and_edges() -> None:
    sc = _forced_scene()
    diff, x, y = sc.diff, sc.x, sc.y
    cx, cy = round(x[0]), round(y[0])
    diff.mask[cy - 6 : cy + 7, cx - 6 :] |= np.uint32(MaskBit.BAD)
    f, e = psf_fluxes(diff, np.r_[x[0], -20.0, np.nan], np.r_[y[0], 50.0, 3.0], 1.6)
    assert np.isnan(f).all() and np.isnan(e).all()
    with pytest.raises(ValueError, match="sigma"):
        psf_fluxes(diff, x, y, -1.0)


def test_record_forced_updates_fp_means() -> None:
    sc = _forced_scene()
    diff, sci, flux, ra, dec = sc.diff, sc.sci, sc.flux, sc.ra, sc.dec
    shard = ApdbShard()
    info = visit_info(0, 0)
    res = shard.associate(dia_source_table(dia_like(ra[:5], dec[:5], flux[:5]), info))
    forced = forced_photometry(res.dia_objects, info, difference=diff, science=sci, psf=1.6)
    updated = shard.record_forced(forced)
    assert updated.num_rows == 5
    fp = np.array(updated["r_fpFluxMean"].to_pylist())
    assert_allclose(np.sort(fp), np.sort(forced["psfFlux"].to_numpy()), rtol=1e-6)
    again = shard.record_forced(forced)  # a retry replaces the rows
    assert again.equals(updated)
    assert shard.snapshot().dia_forced_sources.num_rows == 5
    with pytest.raises(ValueError, match="does not hold"):
        shard.record_forced(forced.set_column(1, "diaObjectId", pa.array([1, 2, 3, 4, 5])))


def test_retry_after_restart() -> None:
    shard = ApdbShard()
    shard.associate(_rows(0, [50.0, 50.01], [3.0, 3.0]))
    shard.associate(_rows(1, [50.0, 50.02], [3.0, 3.0]))
    before = shard.snapshot()
    restarted = ApdbShard()
    restarted.load(before)  # e.g. from the APDB after a crash, visit 1 already written
    res = restarted.associate(_rows(1, [50.0, 50.02], [3.0, 3.0]))
    assert (res.n_matched, res.n_new) == (1, 1)
    _tables_equal(before, restarted.snapshot())


def test_store_base_tail_and_compaction() -> None:
    store = RowStore(pa.table({"a": pa.array([], pa.int64())}), {"v": np.int64})
    for start in range(0, 300 * 3, 3):  # more chunks than the tail keeps
        values = np.arange(start, start + 3)
        store.append(pa.table({"a": values}), v=values)
    assert store.n == 900
    rows = np.array([899, 0, 450, -1, 3, 898])
    got = store.take(rows)["a"].to_pylist()
    assert got == [899, 0, 450, None, 3, 898]
    store.kill(np.arange(0, 900, 2))
    remap = store.compact()
    assert store.n == 450 and (store["v"] % 2 == 1).all()
    assert remap[1] == 0 and remap[0] == -1 and remap[899] == 449
    assert store.take(np.array([449, 0]))["a"].to_pylist() == [899, 1]


def test_expire_drops_old_history() -> None:
    shard = ApdbShard(history_days=2.5)
    for k in range(4):
        shard.associate(_rows(k, [70.0], [5.0]))
    # Associating visit 3 (day 3) dropped day 0's source: 3 days is more than 2.5.
    assert shard.snapshot().dia_sources.num_rows == 3
    assert shard.expire(61041.1 + 4) == 1  # day 1, now 3 days old
    assert shard.expire(61041.1 + 4) == 0
    res = shard.associate(_rows(4, [70.0], [5.0]))
    assert res.dia_objects["nDiaSources"].to_pylist() == [3]  # days 2, 3 and 4
    assert res.prv_dia_sources.num_rows == 2
