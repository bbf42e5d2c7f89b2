"""The whole per-detector pipeline on one full-size LSSTCam CCD, on one core.

A 4072x4000 CCD is simulated once (raw, calibrations, reference catalog); then
``DetectorProcessor.process`` runs ``--repeat`` times in a fresh process pinned
to one core. Printed: the median time of each step, the total, the ratio of
each step to a plain numpy copy of the image (the memory-bandwidth floor), and
the peak resident memory of the processing process.

``--sky realistic`` simulates the realistic sky instead (a PSF that varies and is
elongated, blends, galaxies, bleeding bright stars; no trail): the same steps on
what a real CCD looks like. Every step the pipeline times is a row, new ones too.

``--baseline CHECKOUT`` (another ppray checkout, e.g. ``git worktree add ../base main``)
runs that checkout's own ``bench_detector.py`` and this one alternately, one run each
per round (each simulates its CCD from the same seed), and prints their medians side
by side with the ratio: the comparison a code change needs on a noisy machine.

Run: ``.venv/bin/python benchmarks/bench_detector.py [--repeat 3] [--sky realistic]
[--baseline ../base]``.
"""

from __future__ import annotations

import argparse
import atexit
import math
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from ppray.config import DeploymentConfig, load_config
from ppray.sim.observatory import SimulatedObservatory
from ppray.visit.processor import DetectorProcessor

DETECTOR = "R22_S11"


def _setup(root: str, sky: str) -> tuple[DeploymentConfig, Any, list[Any]]:
    cfg = (
        load_config(env={})
        .rooted_at(root)
        .with_overrides(
            instrument="lsstcam",
            detectors=(DETECTOR,),
            write_images=False,
            # The whole camera's field would hold ~1.3M stars; the central CCD needs its own.
            sim={
                **load_config(env={}).sim.model_dump(),
                "star_density_per_deg2": 100_000.0,
                "catalog_radius_deg": 0.2,
                "sky": sky,
                "realistic": {
                    **load_config(env={}).sim.realistic.model_dump(),
                    "streaks_per_exposure": 0.0,
                },
            },
        )
    )
    obs = SimulatedObservatory(cfg)
    obs.write_reference_data()
    visit = obs.visit(0)
    return cfg, visit, obs.expose(visit)


def _run(cfg: DeploymentConfig, visit: Any, raws: list[Any], repeat: int, out: Any) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    proc = DetectorProcessor.load(cfg, DETECTOR)
    image = np.zeros((proc.instrument.layout.ny, proc.instrument.layout.nx), np.float32)
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        image.copy()
        copies.append(time.perf_counter() - t0)
    runs = []
    for _ in range(repeat):
        result = proc.process(proc.prepare(visit), raws)
        if result.status != "ok":
            raise SystemExit(f"pipeline failed: {result.reason}")
        runs.append(result.timings_s)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put((runs, statistics.median(copies), peak_mb, result.n_sources))


def _one_run(checkout: str, sky: str) -> dict[str, float]:
    """One run of ``checkout``'s bench_detector, in its own process: seconds per step."""
    script = os.path.join(checkout, "benchmarks", "bench_detector.py")
    cmd = [sys.executable, script, "--repeat", "1"] + (["--sky", sky] if sky != "simple" else [])
    env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("step "))
    steps = {}
    for line in lines[start + 1 :]:
        name, seconds = line.split()[:2]
        steps[name] = float(seconds)
        if name == "total":
            return steps
    raise SystemExit(f"{script}: no total in its output:\n{done.stdout}")


def _compare(baseline: str, sky: str, repeat: int) -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old: list[dict[str, float]] = []
    new: list[dict[str, float]] = []
    for k in range(repeat):
        old.append(_one_run(baseline, sky))
        new.append(_one_run(here, sky))
        print(f"round {k + 1}/{repeat}: {old[-1]['total']:.2f} s then {new[-1]['total']:.2f} s")
    print(f"{DETECTOR} ({sky} sky), median of {repeat} alternating runs on one core")
    print(f"{'step':<14} {'baseline s':>10} {'this s':>8} {'ratio':>6}")
    names = list(new[0]) + [n for n in old[0] if n not in new[0]]
    for name in sorted(names, key=lambda n: n == "total"):
        a = statistics.median(r[name] for r in old) if name in old[0] else math.nan
        b = statistics.median(r[name] for r in new) if name in new[0] else math.nan
        ratio = f"{b / a:6.2f}" if a > 0 and b == b else "     -"
        print(f"{name:<14} {a:>10.3f} {b:>8.3f} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sky", choices=("simple", "realistic"), default="simple")
    parser.add_argument("--baseline", help="another checkout to run alternately, side by side")
    args = parser.parse_args()
    if args.baseline:
        _compare(args.baseline, args.sky, args.repeat)
        return
    root = tempfile.mkdtemp(prefix="ppray-bench-det-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # GBs of images
    t0 = time.perf_counter()
    cfg, visit, raws = _setup(root, args.sky)
    print(f"simulated one LSSTCam CCD ({args.sky} sky) in {time.perf_counter() - t0:.1f} s")
    # One core means one thread: an OpenMP or BLAS pool sized for the whole machine,
    # pinned to one core, spins against itself (astroscrappy ran 10x slower so).
    # The spawned child inherits these before it imports anything.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_run, args=(cfg, visit, raws, args.repeat, queue))
    child.start()
    runs, copy_s, peak_mb, n_sources = queue.get()
    child.join()
    steps = list(runs[0])
    print(
        f"{DETECTOR} 4072x4000, {n_sources} sources, {args.repeat} runs on one core; "
        f"numpy copy {copy_s * 1e3:.1f} ms"
    )
    print(f"{'step':<14} {'median s':>9} {'x copy':>8}")
    total = []
    for step in steps:
        med = statistics.median(r[step] for r in runs)
        print(f"{step:<14} {med:>9.3f} {med / copy_s:>8.1f}")
    total = [sum(r.values()) for r in runs]
    print(
        f"{'total':<14} {statistics.median(total):>9.3f} {statistics.median(total) / copy_s:>8.1f}"
    )
    print(f"peak RSS of the processing process: {peak_mb:.0f} MiB")


if __name__ == "__main__":
    main()
