"""Single-detector science timings: render, ISR, background, detection, streaks.

For a synthetic-camera detector (512x512) and a full LSSTCam CCD (4072x4000,
~5000 stars), prints the median of ``--repeat`` wall times of each step, and
ISR's time as a multiple of a numpy copy of the image (the target is <= 10x).
Then streak finding (:func:`ppray.science.streaks.find_streaks`) on a 4096x4096
synthetic difference image: noise alone, and with a faint (1 sigma per pixel)
and a bright streak (the target is well under 0.5 s on one core).

Run: ``.venv/bin/python benchmarks/bench_science.py [--repeat 5] [--small-only]
[--streaks-only]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ppray.image import Exposure, RawExposure
from ppray.instrument import detector_wcs, load_instrument
from ppray.science.background import estimate_background, subtract_background
from ppray.science.detection import detect_sources
from ppray.science.isr import run_isr
from ppray.science.streaks import find_streaks
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


def _difference(shape: tuple[int, int], streaks: list[tuple[float, ...]]) -> Exposure:
    """Gaussian noise (40 e-, its variance plane) plus streaks ``(x0, y0, x1, y1, peak
    in sigma)`` with a Gaussian profile of 1.7 px sigma (4 px FWHM)."""
    rng = np.random.default_rng(0)
    noise, sigma = 40.0, 1.7
    image = rng.standard_normal(shape, dtype=np.float32) * np.float32(noise)
    y, x = np.indices(shape, dtype=np.float32)
    for x0, y0, x1, y1, peak in streaks:
        length = float(np.hypot(x1 - x0, y1 - y0))
        tx, ty = (x1 - x0) / length, (y1 - y0) / length
        d = (y - y0) * tx - (x - x0) * ty
        s = (x - x0) * tx + (y - y0) * ty
        inside = (s >= 0) & (s <= length)
        image += np.float32(peak * noise) * np.exp(-0.5 * (d / sigma) ** 2) * inside
    variance = np.full(shape, noise**2, dtype=np.float32)
    return Exposure(image=image, variance=variance, mask=np.zeros(shape, dtype=np.uint32))


def bench_streaks(repeat: int) -> None:
    shape = (4096, 4096)
    scenes = {
        "noise alone": [],
        "1 sigma + 20 sigma streaks": [
            (-200.0, 400.0, 4300.0, 3000.0, 1.0),
            (500.0, 3600.0, 2500.0, 3500.0, 20.0),
        ],
    }
    print(f"streak finding on a {shape[1]}x{shape[0]} difference image (find_streaks)")
    for name, streaks in scenes.items():
        difference = _difference(shape, streaks)
        find_streaks(difference, 1.7)  # the first call fills the Hough geometry's cache
        wall, cpu = [], []
        for _ in range(repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = find_streaks(difference, 1.7)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        # CPU time too: on a shared machine it moves less than the wall time.
        print(
            f"  {name:26s} {statistics.median(wall) * 1e3:9.1f} ms"
            f"  (CPU {statistics.median(cpu) * 1e3:.1f} ms; {len(result.streaks)} found)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--small-only", action="store_true")
    parser.add_argument("--streaks-only", action="store_true")
    args = parser.parse_args()
    if not args.streaks_only:
        bench("synthetic", "R22_S11", 100_000.0, args.repeat)
        if not args.small_only:
            # ~5000 stars on a 0.05 deg^2 CCD.
            bench("lsstcam", "R22_S11", 100_000.0, args.repeat)
    bench_streaks(args.repeat)


if __name__ == "__main__":
    main()
