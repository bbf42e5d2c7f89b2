"""APDB preload and store per detector-visit: Rubin's APDB (SQLite, PostgreSQL) and Parquet.

For each size N (``--sizes``, default 1k, 10k, 100k DiaObjects under one
LSSTCam CCD's footprint, 0.22 x 0.22 deg), each backend is filled with N
objects seen on two earlier visits (2N DiaSources), then, per repeat (a new
visit each time):

- **preload**: the footprint's DiaObjects and their 12-month DiaSource and
  DiaForcedSource history (``read``: what a worker's preload and a shard's
  load do);
- **store**: one detector-visit's rows, as the pipeline writes them: 200 new
  DIA sources, forced photometry of all N objects and the N updated objects
  (``write``: Rubin's ``store``, one transaction).

PostgreSQL is a real server started from the ``pgserver`` wheel on loopback
(``ppray.testing.postgres``), with ``fsync=off``; SQLite a file on local disk;
Parquet the ``parquet`` backend's files on local disk. Prints the median of
``--repeat`` runs, the three backends side by side, from one run. Run::

    .venv/bin/python benchmarks/bench_apdb.py [--sizes 1000,10000,100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from ppray.alerts.diasource import VisitInfo
from ppray.apdb.backend import ApdbStore
from ppray.apdb.ids import pack_id
from ppray.apdb.rubin import RubinApdb, default_sqlite_url
from ppray.apdb.shard import ApdbShard
from ppray.apdb.store import Apdb
from ppray.schema import load_alert_schema, table_from_columns
from ppray.skyregion import Footprint
from ppray.testing.postgres import PostgresServer

__all__ = ["main"]

DAY = 20260101
RA0, DEC0, SIDE = 150.0, 2.0, 0.22
FOOTPRINT = Footprint.box(RA0 - SIDE / 2, RA0 + SIDE / 2, DEC0 - SIDE / 2, DEC0 + SIDE / 2)
N_NEW = 200


def _visit(k: int) -> VisitInfo:
    return VisitInfo(
        visit=(DAY + k) * 100_000 + 1,
        detector=0,
        band="ugrizy"[k % 6],
        midpoint_mjd_tai=61041.0 + k,
        exposure_time_s=30.0,
        zero_point_mag=28.0,
        processed_mjd_tai=61041.01 + k,
    )


def _sources(info: VisitInfo, ra: np.ndarray, dec: np.ndarray, offset: int = 0) -> pa.Table:
    n = ra.size
    cols = {
        "diaSourceId": pack_id(info.visit, info.detector, offset + np.arange(n)),
        "visit": np.full(n, info.visit),
        "detector": np.full(n, info.detector),
        "midpointMjdTai": np.full(n, info.midpoint_mjd_tai),
        "ra": ra,
        "dec": dec,
        "raErr": np.full(n, 1e-5),
        "decErr": np.full(n, 1e-5),
        "x": np.full(n, 100.0),
        "y": np.full(n, 100.0),
        "psfFlux": np.full(n, 5000.0),
        "psfFluxErr": np.full(n, 100.0),
        "psfNdata": np.zeros(n, dtype=np.int32),
        "trailNdata": np.zeros(n, dtype=np.int32),
        "dipoleNdata": np.zeros(n, dtype=np.int32),
        "bboxSize": np.full(n, 15, dtype=np.int64),
        "band": np.full(n, info.band, dtype=object),
        "timeProcessedMjdTai": np.full(n, info.processed_mjd_tai),
    }
    return table_from_columns(cols, n, "diaSource", load_alert_schema())


def _forced(info: VisitInfo, objects: pa.Table) -> pa.Table:
    n = objects.num_rows
    cols = {
        "diaForcedSourceId": pack_id(info.visit, info.detector, np.arange(n)),
        "diaObjectId": objects["diaObjectId"].to_numpy(),
        "ra": objects["ra"].to_numpy(),
        "dec": objects["dec"].to_numpy(),
        "visit": np.full(n, info.visit),
        "detector": np.full(n, info.detector),
        "psfFlux": np.full(n, 120.0),
        "psfFluxErr": np.full(n, 100.0),
        "midpointMjdTai": np.full(n, info.midpoint_mjd_tai),
        "band": np.full(n, info.band, dtype=object),
        "timeProcessedMjdTai": np.full(n, info.processed_mjd_tai),
    }
    return table_from_columns(cols, n, "diaForcedSource", load_alert_schema())


class Sky:
    """N objects in the footprint, and the rows each visit writes (from one ApdbShard)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        half = SIDE / 2 * 0.98
        self.ra = RA0 + rng.uniform(-half, half, n)
        self.dec = DEC0 + rng.uniform(-half, half, n)
        self.shard = ApdbShard()

    def history(self, k: int) -> dict[str, pa.Table]:
        """Visit ``k`` < 2: every object detected."""
        res = self.shard.associate(_sources(_visit(k), self.ra, self.dec))
        return {"dia_sources": res.dia_sources, "dia_objects": res.dia_objects}

    def visit(self, k: int) -> dict[str, pa.Table]:
        """Visit ``k`` >= 2: N_NEW new sources, forced photometry of every object."""
        info = _visit(k)
        known = self.shard.snapshot().dia_objects
        rng = np.random.default_rng(k)
        half = SIDE / 2 * 0.98
        ra, dec = RA0 + rng.uniform(-half, half, N_NEW), DEC0 + rng.uniform(-half, half, N_NEW)
        res = self.shard.associate(_sources(info, ra, dec))
        forced = _forced(info, known)
        updated = self.shard.record_forced(forced)
        objects = pa.concat_tables([res.dia_objects, updated])
        ids = objects["diaObjectId"].to_numpy()
        _, last = np.unique(ids[::-1], return_index=True)  # the later row of an object wins
        objects = objects.take(pa.array(ids.size - 1 - last))
        return {
            "dia_sources": res.dia_sources,
            "dia_forced_sources": forced,
            "dia_objects": objects,
        }


def _one_backend(
    store: ApdbStore, n: int, history: list[dict[str, pa.Table]], visits: list[dict[str, pa.Table]]
) -> tuple[float, float, float]:
    """(fill, median preload, median store) seconds."""
    start = time.perf_counter()
    for k, rows in enumerate(history):
        store.write(_visit(k).visit, 0, **rows)
    fill = time.perf_counter() - start
    preload, write = [], []
    for r, rows in enumerate(visits):
        info = _visit(2 + r)
        start = time.perf_counter()
        tables = store.read(FOOTPRINT, mjd_tai=info.midpoint_mjd_tai)
        preload.append(time.perf_counter() - start)
        if tables.dia_objects.num_rows < n:
            raise RuntimeError(f"preload found {tables.dia_objects.num_rows} objects, not {n}+")
        start = time.perf_counter()
        store.write(info.visit, 0, **rows)
        write.append(time.perf_counter() - start)
    return fill, statistics.median(preload), statistics.median(write)


def bench(sizes: list[int], repeat: int, work: Path) -> None:
    print(f"APDB per detector-visit, median of {repeat} (seconds; N DiaObjects in the footprint)")
    print(f"{'N':>7} {'backend':>11} {'fill':>7} {'preload':>8} {'store':>7}  rows stored")
    with PostgresServer() as postgres:
        for n in sizes:
            stores: dict[str, ApdbStore] = {
                "sqlite": RubinApdb.open(
                    db_url=RubinApdb.create(default_sqlite_url(str(work / f"sqlite-{n}")))
                ),
                "postgresql": RubinApdb.open(
                    db_url=RubinApdb.create(postgres.create_database(f"apdb_{n}"))
                ),
                "parquet": Apdb(str(work / f"parquet-{n}")),
            }
            sky = Sky(n)
            history = [sky.history(k) for k in range(2)]
            visits = [sky.visit(2 + r) for r in range(repeat)]
            stored = sum(t.num_rows for t in visits[0].values())
            for name, store in stores.items():
                fill, preload, write = _one_backend(store, n, history, visits)
                print(f"{n:>7} {name:>11} {fill:7.2f} {preload:8.3f} {write:7.3f}  {stored}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-apdb-") as work:
        bench(sizes, args.repeat, Path(work))


if __name__ == "__main__":
    main()
