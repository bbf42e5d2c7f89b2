"""Visit latency and coordinator overhead on the synthetic camera, on a local Ray.

For each of ``--visits`` visits (after ``--warmup`` unmeasured ones), the raws
are rendered ahead of time, then ``next_visit`` is sent, the workers preload,
all raws are announced at once and the visit is awaited. Printed, as medians:

- last raw arrival -> visit done (the Alert Production hot path);
- coordinator overhead: broadcasting ``prepare`` to all workers (until every
  worker has preloaded), routing one raw to its worker (round trip), and the
  driver's ``next_visit``/``raw_arrived`` call round trips;
- the per-step detector timings.

Run: ``.venv/bin/python benchmarks/bench_visit.py [--visits 12]``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time
import uuid

import ray
from ppray.actors.factory import init_ray
from ppray.actors.runtime import deploy

from ppray.config import load_config
from ppray.sim.observatory import SimulatedObservatory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--instrument", default="synthetic")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="ppray-bench-")

    atexit.register(shutil.rmtree, root, ignore_errors=True)  # GBs of images
    cfg = (
        load_config(env={})
        .rooted_at(root)
        .with_overrides(
            instrument=args.instrument,
            namespace=f"bench-{uuid.uuid4().hex[:6]}",
            write_images=False,
            ray_num_cpus=os.cpu_count(),
        )
    )
    observatory = SimulatedObservatory(cfg)
    observatory.write_reference_data()
    init_ray(cfg)
    dep = deploy(cfg)
    total = args.warmup + args.visits
    latency, call_nv, call_raw, per_step = [], [], [], {}
    try:
        for i in range(total):
            visit = observatory.visit(i)
            raws = observatory.expose(visit)  # rendered and written before the visit starts
            t = time.perf_counter()
            ray.get(dep.coordinator.next_visit.remote(visit))
            nv_s = time.perf_counter() - t
            # Wait for the preload so the hot path is measured as in production, where
            # next_visit comes >= 20 s ahead of the pixels.
            while (
                len(
                    ray.get(dep.coordinator.status.remote())["overhead_samples_s"][
                        "prepare_broadcast_s"
                    ]
                )
                < i + 1
            ):
                time.sleep(0.005)
            raw_s = []
            for raw in raws:
                t = time.perf_counter()
                ray.get(
                    dep.coordinator.raw_arrived.remote(
                        raw.model_copy(update={"arrived_at": time.time()})
                    )
                )
                raw_s.append(time.perf_counter() - t)
            summary = dep.wait_visit(visit, 120.0)
            if summary is None or summary.n_ok != summary.n_expected:
                raise SystemExit(f"visit {visit.groupId} did not complete: {summary}")
            if i < args.warmup:
                continue
            assert summary.latency_s is not None
            latency.append(summary.latency_s)
            call_nv.append(nv_s)
            call_raw.extend(raw_s)
            for step, sec in summary.step_median_s.items():
                per_step.setdefault(step, []).append(sec)
        status = ray.get(dep.coordinator.status.remote())
    finally:
        dep.shutdown()
        ray.shutdown()

    samples = status["overhead_samples_s"]
    broadcast = samples["prepare_broadcast_s"][args.warmup :]
    route = samples["route_raw_s"]
    n_det = len(dep.workers)
    ms = 1000.0
    print(
        f"instrument={cfg.instrument} detectors={n_det} visits={args.visits} "
        f"(after {args.warmup} warm-up) cpus={os.cpu_count()}"
    )
    print(f"{'metric':<44} {'median':>10} {'min':>10} {'max':>10}")
    rows = [
        ("last raw -> visit done [ms]", latency),
        (f"prepare broadcast to {n_det} workers [ms]", broadcast),
        ("route one raw coordinator->worker [ms]", route),
        ("driver next_visit call [ms]", call_nv),
        ("driver raw_arrived call [ms]", call_raw),
    ] + [(f"detector step {k} [ms]", v) for k, v in sorted(per_step.items())]
    for name, values in rows:
        print(
            f"{name:<44} {statistics.median(values) * ms:>10.2f} "
            f"{min(values) * ms:>10.2f} {max(values) * ms:>10.2f}"
        )
    science = sum(statistics.median(v) for v in per_step.values())
    print(
        f"coordinator overhead / hot path: "
        f"{statistics.median(route) / statistics.median(latency):.3f} (route) "
        f"hot path / detector science: {statistics.median(latency) / science:.2f}"
    )


if __name__ == "__main__":
    main()
