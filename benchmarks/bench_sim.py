"""The simulator: one full LSSTCam CCD rendered in the simple and the realistic sky.

Renders detector R22_S11 (4072x4000) of the same pointing, calibrations and
conditions ``--repeat`` times in each mode, interleaved so that both see the same
load, and prints the medians of the wall and CPU times and their ratios (the
target: realistic <= ~2x simple). On a shared machine the CPU time is the steadier.
The realistic render includes one trail across the CCD and its bright stars' bleeding.

Run: ``.venv/bin/python benchmarks/bench_sim.py [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ppray.config import load_config
from ppray.sim.artifacts import Streak
from ppray.sim.observatory import SimulatedObservatory
from ppray.sim.realistic import render_realistic
from ppray.sim.render import SimulatedObservation, make_calibrations, render_detector

__all__ = ["main"]

DETECTOR = "R22_S11"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = load_config(env={})
    with tempfile.TemporaryDirectory() as tmp:
        observatories = {
            sky: SimulatedObservatory(
                base.rooted_at(tmp).with_overrides(
                    instrument="lsstcam",
                    detectors=(DETECTOR,),
                    sim={**base.sim.model_dump(), "catalog_radius_deg": 0.2, "sky": sky},
                ),
                start_time=1.7e9,
            )
            for sky in ("simple", "realistic")
        }
    simple, real = observatories["simple"], observatories["realistic"]
    inst = simple.instrument
    det = inst.detector(DETECTOR)
    visit = simple.visit(0)
    wcs = simple.true_wcs(visit, DETECTOR)
    calibs = make_calibrations(inst, det, seed=0)
    obs = SimulatedObservation(seeing_fwhm_arcsec=simple.seeing_arcsec(visit))
    psf = real.science_psf(visit, DETECTOR)
    trail = Streak(-100.0, 300.0, 4200.0, 3500.0, flux_e_per_px=2000.0, extra_sigma_px=1.0)
    cat_simple, cat_real = simple.catalog, real.catalog
    wall: dict[str, list[float]] = {"simple": [], "realistic": []}
    cpu: dict[str, list[float]] = {"simple": [], "realistic": []}

    def timed(sky: str, fn: Callable[[], Any]) -> Any:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall[sky].append(time.perf_counter() - start)
        cpu[sky].append(time.process_time() - start_cpu)
        return out

    for i in range(args.repeat):
        timed(
            "simple",
            lambda i=i: render_detector(
                cat_simple, inst, det, wcs, obs, calibs, seed=i, cosmic_rays=10
            ),
        )
        _, truth = timed(
            "realistic",
            lambda i=i: render_realistic(
                cat_real, inst, det, wcs, obs, calibs, psf, seed=i, cosmic_rays=10, streaks=[trail]
            ),
        )
    for name, times in (("wall", wall), ("cpu", cpu)):
        medians = {k: statistics.median(v) for k, v in times.items()}
        for sky, values in times.items():
            listed = ", ".join(f"{v:.2f}" for v in values)
            print(f"{name:4s} {sky:10s} median {medians[sky]:.2f} s  ({listed})")
        print(f"{name:4s} realistic / simple = {medians['realistic'] / medians['simple']:.2f}")
    kinds = np.array(truth.stars["kind"].to_pylist())
    print(
        f"realistic CCD: {np.sum(kinds == 'star')} stars, {np.sum(kinds == 'galaxy')} galaxies, "
        f"{truth.streaks.num_rows} trail, {int(truth.bleed_mask.sum())} bled pixels"
    )


if __name__ == "__main__":
    main()
