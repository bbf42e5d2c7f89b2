"""Alert production and association timings on one core.

1. Alerts for one detector: ``--n-alerts`` DIA sources on a 4072x4000 CCD, each
   object with ``--history`` earlier DiaSources and DiaForcedSources; alerts
   built (records + three 30x30 FITS cutouts) and serialized with fastavro
   against the lsst-alert-packet schema. Target: >= 2,000 alerts/s per core.
2. Association of ``--n-sources`` DIA sources (half of them at known objects)
   against ``--n-objects`` DiaObjects (each with one earlier DiaSource) on an
   :class:`~ppray.apdb.shard.ApdbShard`: the load (index build) once, then
   one visit's association per repeat.

Prints the median of ``--repeat`` runs. Run:
``.venv/bin/python benchmarks/bench_alerts.py [--repeat 5] [--n-objects 1000000]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from ppray.alerts.diasource import VisitInfo
from ppray.alerts.packet import AlertBatch, CutoutMaker, serialize_alert
from ppray.apdb.ids import pack_id
from ppray.apdb.shard import ApdbShard
from ppray.apdb.store import ApdbTables
from ppray.image import Exposure
from ppray.schema import load_alert_schema, table_from_columns
from ppray.skyregion import radec_to_xyz, xyz_to_radec

__all__ = ["main"]

DAY = 20260101


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _visit(k: int, detector: int = 0) -> VisitInfo:
    return VisitInfo(
        visit=(DAY + k) * 100_000 + 1,
        detector=detector,
        band="ugrizy"[k % 6],
        midpoint_mjd_tai=61041.0 + k,
        exposure_time_s=30.0,
        zero_point_mag=28.0,
        processed_mjd_tai=61041.01 + k,
    )


def _sources(
    info: VisitInfo, ra: np.ndarray, dec: np.ndarray, rng: np.random.Generator
) -> pa.Table:
    n = ra.size
    flux = rng.normal(5000.0, 2000.0, n)
    cols = {
        "diaSourceId": pack_id(info.visit, info.detector, np.arange(n)),
        "visit": np.full(n, info.visit),
        "detector": np.full(n, info.detector),
        "midpointMjdTai": np.full(n, info.midpoint_mjd_tai),
        "ra": ra,
        "dec": dec,
        "raErr": np.full(n, 1e-5),
        "decErr": np.full(n, 1e-5),
        "x": rng.uniform(20, 4050, n),
        "y": rng.uniform(20, 3980, n),
        "xErr": np.full(n, 0.05),
        "yErr": np.full(n, 0.05),
        "psfFlux": flux,
        "psfFluxErr": np.full(n, 300.0),
        "snr": flux / 300.0,
        "psfNdata": np.full(n, 25),
        "trailNdata": np.zeros(n),
        "dipoleNdata": np.zeros(n),
        "bboxSize": np.zeros(n),
        "band": np.full(n, info.band, dtype=object),
        "timeProcessedMjdTai": np.full(n, info.processed()),
        "isNegative": flux < 0,
    }
    return table_from_columns(cols, n, "diaSource", load_alert_schema())


def _scatter(ra: np.ndarray, dec: np.ndarray, arcsec: float, rng: np.random.Generator) -> tuple:
    xyz = radec_to_xyz(ra, dec) + rng.normal(0, np.radians(arcsec / 3600), (ra.size, 3))
    return xyz_to_radec(xyz)


def bench_alerts(n_alerts: int, history: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    shape = (4000, 4072)
    image = rng.normal(0, 20, shape).astype(np.float32)
    exp = Exposure(image, np.full(shape, 400, np.float32), np.zeros(shape, np.uint32))
    ra, dec = rng.uniform(150, 150.2, n_alerts), rng.uniform(2, 2.2, n_alerts)
    shard = ApdbShard()
    schema = load_alert_schema()
    for k in range(history):
        r, d = _scatter(ra, dec, 0.1, rng)
        shard.associate(_sources(_visit(k), r, d, rng))
        # Forced photometry of every object in each earlier visit, as Rubin's alerts carry.
        objects = shard.snapshot().dia_objects
        info, n = _visit(k, detector=1), objects.num_rows
        cols = {
            "diaForcedSourceId": pack_id(info.visit, 1, np.arange(n)),
            "diaObjectId": objects["diaObjectId"].to_numpy(),
            "ra": objects["ra"].to_numpy(),
            "dec": objects["dec"].to_numpy(),
            "visit": np.full(n, info.visit),
            "detector": np.full(n, 1),
            "psfFlux": rng.normal(0, 300, n),
            "psfFluxErr": np.full(n, 300.0),
            "scienceFlux": rng.normal(9000, 300, n),
            "scienceFluxErr": np.full(n, 300.0),
            "midpointMjdTai": np.full(n, info.midpoint_mjd_tai),
            "band": np.full(n, info.band, dtype=object),
            "timeProcessedMjdTai": np.full(n, info.processed()),
        }
        shard.record_forced(table_from_columns(cols, n, "diaForcedSource", schema))
    current = _sources(_visit(history), *_scatter(ra, dec, 0.1, rng), rng)
    res = shard.associate(current)
    njy = _visit(history).njy_per_electron

    batch = AlertBatch(
        res.dia_sources, res.dia_objects, res.prv_dia_sources, res.prv_dia_forced_sources,
        difference=exp, science=exp, template=exp, njy_per_electron=njy,
    )  # fmt: skip
    t_fast, blobs = _median(lambda: batch.serialized(confluent=True), repeat)
    t_build, alerts = _median(batch.records, repeat)
    t_ser, _ = _median(lambda: [serialize_alert(a, confluent=True) for a in alerts], repeat)
    maker = CutoutMaker(exp, 30, njy)
    xs, ys = current["x"].to_numpy(), current["y"].to_numpy()
    t_cut, _ = _median(lambda: [maker(x, y) for x, y in zip(xs, ys, strict=True)], repeat)
    size = statistics.median(len(b) for b in blobs)
    print(
        f"alerts: {n_alerts} DIA sources on one 4072x4000 detector, {history} earlier "
        f"DiaSources and DiaForcedSources per object, 3 cutouts 30x30 (median of {repeat})"
    )
    print(f"  AlertBatch.serialized (cutouts + columnar Avro)  {t_fast * 1e3:8.1f} ms")
    print(f"    of which cutouts (x3)                          {3 * t_cut * 1e3:8.1f} ms")
    print(f"    alerts/s per core                              {n_alerts / t_fast:8.0f}  (>= 2000)")
    print(f"    alert size                                     {size / 1024:8.1f} KiB")
    print(f"  for comparison, dicts: records + cutouts          {t_build * 1e3:8.1f} ms")
    print(f"    + fastavro.schemaless_writer per alert          {t_ser * 1e3:8.1f} ms")
    print(f"    alerts/s per core                              {n_alerts / (t_build + t_ser):8.0f}")


def bench_association(n_objects: int, n_sources: int, repeat: int) -> None:
    rng = np.random.default_rng(1)
    # Objects uniform on a 10 x 10 deg box (denser than Rubin's DiaObjects: a hard case).
    ra = rng.uniform(145.0, 155.0, n_objects)
    dec = np.degrees(
        np.arcsin(rng.uniform(np.sin(np.radians(-5)), np.sin(np.radians(5)), n_objects))
    )
    first = _sources(_visit(0), ra, dec, rng)
    seed_shard = ApdbShard()
    t0 = time.perf_counter()
    seed_shard.associate(first)
    t_seed = time.perf_counter() - t0
    tables: ApdbTables = seed_shard.snapshot()
    shard = ApdbShard()
    t_load, _ = _median(lambda: shard.load(tables), 1)

    def one_visit(k: int) -> float:
        pick = rng.choice(n_objects, n_sources // 2, replace=False)
        r1, d1 = _scatter(ra[pick], dec[pick], 0.2, rng)
        r2 = rng.uniform(145.0, 155.0, n_sources - pick.size)
        d2 = rng.uniform(-5.0, 5.0, n_sources - pick.size)
        table = _sources(_visit(k), np.r_[r1, r2], np.r_[d1, d2], rng)
        start = time.perf_counter()
        res = shard.associate(table)
        elapsed = time.perf_counter() - start
        assert res.n_matched >= pick.size * 0.99, res.n_matched
        return elapsed

    times = [one_visit(k) for k in range(1, repeat + 1)]
    print(
        f"association: {n_sources} DIA sources (half at known objects) vs "
        f"{n_objects} DiaObjects (median of {repeat} visits)"
    )
    print(f"  create {n_objects} objects (one call)  {t_seed:7.2f} s")
    print(f"  load snapshot + build index        {t_load:7.2f} s")
    print(f"  associate one visit                {statistics.median(times) * 1e3:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--n-alerts", type=int, default=1000)
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--n-objects", type=int, default=1_000_000)
    parser.add_argument("--n-sources", type=int, default=10_000)
    args = parser.parse_args()
    bench_alerts(args.n_alerts, args.history, args.repeat)
    bench_association(args.n_objects, args.n_sources, args.repeat)


if __name__ == "__main__":
    main()
