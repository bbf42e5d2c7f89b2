"""Single-detector science timings: render, ISR, background, detection.

For a synthetic-camera detector (512x512) and a full LSSTCam CCD (4072x4000,
~5000 stars), prints the median of ``--repeat`` wall times of each step, and
ISR's time as a multiple of a numpy copy of the image (the target is <= 10x).

Run: ``.venv/bin/python benchmarks/bench_science.py [--repeat 5] [--small-only]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ppray.image import RawExposure
from ppray.instrument import detector_wcs, load_instrument
from ppray.science.background import estimate_background, subtract_background
from ppray.science.detection import detect_sources
from ppray.science.isr import run_isr
from ppray.sim.render import SimulatedObservation, make_calibrations, render_detector
from ppray.sim.sky import make_star_catalog

__all__ = ["main"]


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(instrument: str, detector: str, density: float, repeat: int) -> None:
    inst = load_instrument(instrument)
    det = inst.detector(detector)
    ra, dec = 150.0, 2.2
    wcs = detector_wcs(inst, det, ra, dec, 0.0)
    radius = 1.2 * np.hypot(inst.layout.nx, inst.layout.ny) * inst.pixel_scale_arcsec / 3600
    catalog = make_star_catalog(ra, dec, radius, density_per_deg2=density, seed=0)
    t_cal, calibs = _median(lambda: make_calibrations(inst, det, seed=0), 1)
    obs = SimulatedObservation()
    t_render, (segments, truth) = _median(
        lambda: render_detector(catalog, inst, det, wcs, obs, calibs, seed=0), repeat
    )
    raw = RawExposure(segments=segments, header={"EXPTIME": obs.exptime_s})
    t_isr, exposure = _median(lambda: run_isr(raw, calibs, inst, det, wcs=wcs), repeat)
    t_copy, _ = _median(lambda: exposure.image.copy(), max(repeat, 5))
    t_bg, (background, _) = _median(lambda: estimate_background(exposure), repeat)
    t_sub, subtracted = _median(lambda: subtract_background(exposure, background), repeat)
    t_det, sources = _median(lambda: detect_sources(subtracted), repeat)
    print(
        f"{instrument} {detector} {inst.layout.nx}x{inst.layout.ny}, "
        f"{truth.stars.num_rows} stars, {sources.num_rows} sources"
    )
    for name, t in (
        ("calibrations (once)", t_cal),
        ("render", t_render),
        ("isr", t_isr),
        ("background", t_bg),
        ("subtract", t_sub),
        ("detect", t_det),
    ):
        print(f"  {name:22s} {t * 1e3:9.1f} ms")
    print(f"  {'isr + bg + detect':22s} {(t_isr + t_bg + t_sub + t_det) * 1e3:9.1f} ms")
    print(f"  isr / numpy copy       {t_isr / t_copy:9.1f} x  (copy {t_copy * 1e3:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--small-only", action="store_true")
    args = parser.parse_args()
    bench("synthetic", "R22_S11", 100_000.0, args.repeat)
    if not args.small_only:
        # ~5000 stars on a 0.05 deg^2 CCD.
        bench("lsstcam", "R22_S11", 100_000.0, args.repeat)


if __name__ == "__main__":
    main()
