"""Recovery after a worker kill, and how many detector workers this machine holds.

Two parts, each printed as a table:

1. **Recovery** (synthetic camera, 4 detectors): for each of ``--kills`` visits,
   one worker is killed while it processes the visit's raws. Printed, as medians:
   the time from the kill until Ray serves the worker again with its calibrations
   loaded, and the visit's latency (last raw -> visit done) with the kill against
   the same visits without one, side by side.
2. **Capacity** (``--instrument``, default lsstcam with full 4072x4000 CCDs):
   ``--workers`` detector workers (the central CCDs) are started, one visit is
   processed, and each worker process's memory is read (RSS, and USS: the memory only
   it holds) after loading and after the visit, with its peak RSS (``VmHWM``) over the
   visit. From the largest peak and the machine's
   memory (less ``--reserve-gib`` for Ray's own processes and the OS), it prints how
   many workers this machine holds, and what a 189-detector camera needs.

Run: ``.venv/bin/python benchmarks/bench_cluster.py [--kills 5] [--workers 4]``.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import ray
from ppray.actors.factory import init_ray
from ppray.actors.runtime import Deployment, deploy

from ppray.config import DeploymentConfig, load_config
from ppray.messages import NextVisit
from ppray.sim.observatory import SimulatedObservatory

GIB = 1024**3
MIB = 1024**2


# The central CCD and its neighbours, nearest first: with the sky simulated only out to
# CENTRE_RADIUS_DEG (the whole camera's templates would be ~13 GB of pixels).
CENTRE = ("R22_S11", "R22_S10", "R22_S12", "R22_S01", "R22_S21")
CENTRE_RADIUS_DEG = 0.4


def bench_config(
    instrument: str, detectors: tuple[str, ...] | None, sky_radius_deg: float | None = None
) -> DeploymentConfig:
    root = tempfile.mkdtemp(prefix="ppray-bench-")
    # LSSTCam's templates alone are several GB: never leave them behind.
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    base = load_config(env={})
    sim = base.sim.model_dump()
    if sky_radius_deg is not None:
        sim |= {"catalog_radius_deg": sky_radius_deg, "star_density_per_deg2": 100_000.0}
    return base.rooted_at(root).with_overrides(
        instrument=instrument,
        detectors=detectors,
        namespace=f"bench-{uuid.uuid4().hex[:6]}",
        write_images=False,
        ray_num_cpus=os.cpu_count(),
        sim=sim,
    )


def run_visit(
    dep: Deployment, obs: SimulatedObservatory, visit: NextVisit, kill: str | None
) -> tuple[float, float | None]:
    """Process ``visit`` (killing ``kill``'s worker mid-processing); latency, recovery."""
    raws = obs.expose(visit)  # rendered before the visit starts, as the camera would
    ray.get(dep.coordinator.next_visit.remote(visit))
    for raw in raws:
        ray.get(
            dep.coordinator.raw_arrived.remote(raw.model_copy(update={"arrived_at": time.time()}))
        )
    recovery = None
    if kill is not None:
        worker = dep.workers[kill]
        old = ray.get(worker.ready.remote())["pid"]
        while not ray.get(worker.ready.remote())["processing"]:
            time.sleep(0.005)
        t0 = time.perf_counter()
        ray.kill(worker, no_restart=False)
        while True:  # until a new process answers with its calibrations loaded
            try:
                status = ray.get(worker.ready.remote(), timeout=30)
                if status["pid"] != old and status["loaded"]:
                    break
            except ray.exceptions.RayActorError:
                pass
            time.sleep(0.01)
        recovery = time.perf_counter() - t0
    summary = dep.wait_visit(visit, 180.0)
    if summary is None or summary.n_ok != summary.n_expected or summary.latency_s is None:
        raise SystemExit(f"visit {visit.groupId} did not complete: {summary}")
    return summary.latency_s, recovery


def bench_recovery(kills: int) -> None:
    cfg = bench_config("synthetic", None)
    obs = SimulatedObservatory(cfg)
    obs.write_reference_data()
    init_ray(cfg)
    dep = deploy(cfg)
    plain, killed, recovery = [], [], []
    try:
        run_visit(dep, obs, obs.visit(0), None)  # warm-up
        for i in range(kills):
            # Alternate so that both series see the same drift of this shared machine.
            plain.append(run_visit(dep, obs, obs.visit(1 + 2 * i), None)[0])
            latency, rec = run_visit(dep, obs, obs.visit(2 + 2 * i), obs.detectors[i % 4])
            killed.append(latency)
            assert rec is not None
            recovery.append(rec)
        retries = ray.get(dep.coordinator.status.remote())["retries"]
    finally:
        dep.shutdown()
        ray.shutdown()
    print(f"recovery: synthetic camera, 4 detectors, {kills} kills, cpus={os.cpu_count()}")
    print(f"{'metric':<46} {'median':>9} {'min':>9} {'max':>9}")
    for name, values in [
        ("kill -> worker back, calibrations loaded [s]", recovery),
        ("visit latency, no kill [s]", plain),
        ("visit latency, worker killed mid-visit [s]", killed),
    ]:
        print(
            f"{name:<46} {statistics.median(values):>9.2f} {min(values):>9.2f} {max(values):>9.2f}"
        )
    print(
        f"latency ratio killed / not killed: "
        f"{statistics.median(killed) / statistics.median(plain):.2f}; detector retries: {retries}"
    )


def memory_of(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.rss / MIB, info.uss / MIB


def peak_rss(pid: int) -> float:
    """The process's RSS high-water mark (``VmHWM``), MiB: its peak during the visit."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def bench_capacity(instrument: str, n_workers: int, reserve_gib: float) -> None:
    from ppray.instrument import load_instrument

    if instrument == "lsstcam":
        if n_workers > len(CENTRE):
            raise SystemExit(f"--workers: at most {len(CENTRE)} for lsstcam (the central CCDs)")
        names = list(CENTRE[:n_workers])
        cfg = bench_config(instrument, tuple(names), CENTRE_RADIUS_DEG)
    else:
        names = load_instrument(instrument).detector_names[:n_workers]
        cfg = bench_config(instrument, tuple(names))
    obs = SimulatedObservatory(cfg)
    t = time.perf_counter()
    obs.write_reference_data()
    print(f"capacity: wrote reference data of {n_workers} {instrument} CCDs in "
          f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    init_ray(cfg)
    dep = deploy(cfg)
    try:
        pids = {d: ray.get(w.ready.remote())["pid"] for d, w in dep.workers.items()}
        loaded = [memory_of(p) for p in pids.values()]
        latency, _ = run_visit(dep, obs, obs.visit(0), None)
        after: list[Any] = [memory_of(p) for p in pids.values()]
        peaks = [peak_rss(p) for p in pids.values()]
    finally:
        dep.shutdown()
        ray.shutdown()
    layout = load_instrument(instrument).layout
    print(f"{instrument}: {layout.nx}x{layout.ny} px per CCD, {n_workers} workers")
    print(f"{'per worker [MiB]':<34} {'median':>9} {'max':>9}")
    for name, values in [
        ("RSS after loading calibrations", [r for r, _ in loaded]),
        ("USS after loading calibrations", [u for _, u in loaded]),
        ("RSS after one visit", [r for r, _ in after]),
        ("USS after one visit", [u for _, u in after]),
        ("peak RSS (VmHWM) over the visit", peaks),
    ]:
        print(f"{name:<34} {statistics.median(values):>9.0f} {max(values):>9.0f}")
    print(f"one visit, {n_workers} workers on {os.cpu_count()} cores: latency {latency:.1f} s")
    # What a worker must be given: its peak, not what it keeps between visits.
    per_worker = max(peaks) / 1024
    total = psutil.virtual_memory().total / GIB
    holds = math.floor((total - reserve_gib) / per_worker)
    print(
        f"this machine: {total:.1f} GiB, {os.cpu_count()} cores; less {reserve_gib:g} GiB "
        f"reserved it holds {holds} detector workers by memory "
        f"({per_worker:.2f} GiB each, the largest peak)"
    )
    print(
        f"a 189-detector camera needs ~{math.ceil(189 * per_worker + reserve_gib)} GiB "
        f"for workers (+ reserve) and 189 cores at num_cpus=1 per worker"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--instrument", default="lsstcam")
    parser.add_argument("--reserve-gib", type=float, default=4.0)
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--skip-capacity", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not args.skip_recovery:
        bench_recovery(args.kills)
    if not args.skip_capacity:
        bench_capacity(args.instrument, args.workers, args.reserve_gib)


if __name__ == "__main__":
    main()
