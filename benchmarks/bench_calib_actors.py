"""Calibration sequences through the actors: time to combine, and memory per worker.

On the synthetic camera (4 detectors of 512x512, one worker each, on a local
Ray), each run is one calibration sequence of ``--n`` exposures: the raws are
rendered and written beforehand (not timed), then ``next_visit`` is sent, every
raw is announced through the coordinator as fast as the driver can, and the
sequence's summary (everything combined and certified; for flats, the
focal-plane normalisation too) is awaited. Runs go bias, dark, flat, ``--repeat``
times, so that each dark and flat is corrected with the masters certified
just before, as in an afternoon. Printed, one row per kind, medians over runs:

- ``next_visit -> certified``: the whole sequence through the actors;
- ``last raw -> certified``: what is left after the last raw is announced
  (combination, defects and the focal-plane gather for flats, certification);
- ``ms/exposure/detector``: the first divided by ``n x detectors`` (the
  workers share the machine's cores);
- the peak RSS of each worker process, sampled every 10 ms with psutil during
  the sequence (largest over workers), and its growth over the RSS before;
- the streaming combiner's own largest state per detector (what grows with
  the number of exposures in a combination that holds them all).

With ``--compare-n`` the same is done with a second number of exposures, to
show that memory does not grow with it.

Run: ``.venv/bin/python benchmarks/bench_calib_actors.py [--n 20] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from typing import Any

import psutil
import ray
from ppray.actors.factory import init_ray
from ppray.actors.runtime import Deployment, deploy

from ppray.calib.results import CalibSummary
from ppray.config import load_config
from ppray.sim.calib_sequence import CalibrationSimulator, SequenceKind

__all__ = ["main"]

_MIB = 1024 * 1024


class RssSampler:
    """Peak RSS of some processes, sampled on a thread until stopped."""

    def __init__(self, pids: list[int], every_s: float = 0.01) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.every_s = every_s
        self.peak = {p.pid: 0 for p in self.procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in self.procs:
                with contextlib.suppress(psutil.Error):  # a worker restarting: skip it
                    self.peak[proc.pid] = max(self.peak[proc.pid], proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rss(pids: list[int]) -> dict[int, int]:
    return {p: psutil.Process(p).memory_info().rss for p in pids}


def one_sequence(
    dep: Deployment, sim: CalibrationSimulator, kind: SequenceKind, n: int, pids: list[int]
) -> dict[str, Any]:
    visit = sim.sequence(kind, n)
    raws = [r for snap in range(n) for r in sim.expose(visit, snap)]  # not timed
    before = _rss(pids)
    with RssSampler(pids) as sampler:
        start = time.perf_counter()
        ray.get(dep.coordinator.next_visit.remote(visit))
        for raw in raws:
            ray.get(dep.coordinator.raw_arrived.remote(raw))
        last_raw = time.perf_counter()
        summary = dep.wait_calib(visit, 600.0)
        end = time.perf_counter()
    if not isinstance(summary, CalibSummary) or summary.n_ok != summary.n_expected:
        raise RuntimeError(f"{kind} sequence did not certify everywhere: {summary}")
    return {
        "total_s": end - start,
        "after_last_raw_s": end - last_raw,
        "ms_per_exposure": 1000 * (end - start) / (n * len(pids)),
        "rss_peak": max(sampler.peak.values()),
        "rss_growth": max(sampler.peak[p] - before[p] for p in pids),
        "combiner_peak": max(summary.combiner_peak_bytes.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="exposures per sequence")
    parser.add_argument("--repeat", type=int, default=3, help="runs per kind")
    parser.add_argument("--compare-n", type=int, default=5, help="a second N (0: none)")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="ppray-bench-calib-")
    base = load_config(env={})
    cfg = base.rooted_at(root).with_overrides(
        namespace=f"bench-calib-{uuid.uuid4().hex[:6]}",
        ray_num_cpus=os.cpu_count(),
        apdb={**base.apdb.model_dump(), "enabled": False},
    )
    sim = CalibrationSimulator(cfg, start_time=time.time() - 86400, cosmic_rays=20)
    init_ray(cfg)
    dep = deploy(cfg)
    pids = [ray.get(w.ready.remote())["pid"] for w in dep.workers.values()]
    rows: list[tuple[str, int, dict[str, float]]] = []
    try:
        sizes = [args.n] + ([args.compare_n] if args.compare_n else [])
        for n in sizes:
            runs: dict[str, list[dict[str, Any]]] = {"bias": [], "dark": [], "flat": []}
            for _ in range(args.repeat):
                for kind in ("bias", "dark", "flat"):
                    runs[kind].append(one_sequence(dep, sim, kind, n, pids))  # type: ignore[arg-type]
            for kind, results in runs.items():
                med = {k: statistics.median(r[k] for r in results) for k in results[0]}
                rows.append((kind, n, med))
    finally:
        dep.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)  # ~1 GB of raws

    print(
        f"\nsynthetic camera: {len(pids)} detectors of 512x512, one worker each, "
        f"{os.cpu_count()} cores; medians of {args.repeat} runs"
    )
    header = (
        f"{'kind':<5} {'N':>3} {'next_visit->certified s':>23} {'last raw->certified s':>21} "
        f"{'ms/exp/det':>10} {'worker RSS peak MiB':>19} {'RSS growth MiB':>14} "
        f"{'combiner peak MiB':>17}"
    )
    print(header)
    print("-" * len(header))
    for kind, n, m in rows:
        print(
            f"{kind:<5} {n:>3} {m['total_s']:>23.2f} {m['after_last_raw_s']:>21.2f} "
            f"{m['ms_per_exposure']:>10.1f} {m['rss_peak'] / _MIB:>19.0f} "
            f"{m['rss_growth'] / _MIB:>14.1f} {m['combiner_peak'] / _MIB:>17.1f}"
        )
    plane = 512 * 512 * 4 / _MIB
    print(f"(one 512x512 float32 image: {plane:.0f} MiB)")


if __name__ == "__main__":
    main()
