"""Master calibration timings and memory: 20 biases, darks and flats of one detector.

For a synthetic-camera detector (512x512), simulates ``--n`` exposures of each
kind (not timed), then prints per kind the median of ``--repeat`` wall times
of :func:`ppray.calib.combine.combine_calibration` (ISR of every input plus the
streaming combination), the peak of memory allocated during one combination
(tracemalloc) in MB and in detector images (``float32``), and the growth of
the process's peak RSS. The last rows do the same for the memory-hungry way:
ISR every input, stack them all and take the median; its peak grows with the
number of inputs, the streaming one does not.

Run: ``.venv/bin/python benchmarks/bench_calib.py [--n 20] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from ppray.calib.combine import combine_calibration
from ppray.calib.prepare import input_preparer
from ppray.image import RawExposure
from ppray.instrument import load_instrument
from ppray.sim.calib_exposures import simulate_calib_set

__all__ = ["main"]


def _median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20, help="exposures per kind")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--detector", default="R22_S11")
    args = parser.parse_args()
    inst = load_instrument("synthetic")
    det = inst.detector(args.detector)
    start = time.perf_counter()
    cs = simulate_calib_set(inst, det, n_bias=args.n, n_dark=args.n, n_flat=args.n, seed=0)
    t_sim = time.perf_counter() - start
    truth = cs.truth.calibs
    image_bytes = truth.bias.nbytes
    raws: dict[str, list[RawExposure]] = {
        "bias": [e.raw for e in cs.biases],
        "dark": [e.raw for e in cs.darks],
        "flat": [e.raw for e in cs.flats],
    }
    masters = {"bias": truth.bias, "dark": truth.dark}

    def streaming(kind: str, times: int = 1) -> Callable[[], Any]:
        bias = masters["bias"] if kind != "bias" else None
        dark = masters["dark"] if kind == "flat" else None
        inputs = raws[kind] * times
        return lambda: combine_calibration(kind, inputs, inst, det, bias=bias, dark=dark)

    def stacked(kind: str, times: int = 1) -> Callable[[], Any]:
        bias = masters["bias"] if kind != "bias" else None
        dark = masters["dark"] if kind == "flat" else None
        inputs = raws[kind] * times

        def run() -> np.ndarray:
            prep = input_preparer(kind, inst, det, bias=bias, dark=dark)
            stack = np.stack([prep.prepare(r).exposure.image for r in inputs])
            return np.median(stack, axis=0)

        return run

    print(
        f"synthetic {det.name} {inst.layout.nx}x{inst.layout.ny}, {args.n} exposures per kind "
        f"(simulated in {t_sim:.1f} s); median of {args.repeat} runs"
    )
    print(
        f"  {'kind':6s} {'method':16s} {'inputs':>6s} {'time ms':>9s} {'ms/exp':>7s} "
        f"{'peak MB':>8s} {'peak/img':>8s} {'RSS+ MB':>8s}"
    )
    n2 = 2 * args.n  # the same exposures twice: does the peak grow with the inputs?
    rows = [(k, "streaming clip", args.n, streaming(k)) for k in ("bias", "dark", "flat")]
    rows += [
        ("bias", "streaming clip", n2, streaming("bias", 2)),
        ("bias", "stack + median", args.n, stacked("bias")),
        ("bias", "stack + median", n2, stacked("bias", 2)),
    ]
    peaks = {}
    for kind, method, n, fn in rows:
        rss0 = _max_rss_bytes()
        fn()  # warm up; also where the peak RSS grows, if it does
        rss_growth = _max_rss_bytes() - rss0
        t = _median_time(fn, args.repeat)
        peak = peaks[method, n, kind] = _peak_bytes(fn)
        print(
            f"  {kind:6s} {method:16s} {n:6d} {t * 1e3:9.1f} {t * 1e3 / n:7.2f} "
            f"{peak / 2**20:8.1f} {peak / image_bytes:8.1f} {rss_growth / 2**20:8.1f}"
        )
    for method in ("streaming clip", "stack + median"):
        ratio = peaks[method, n2, "bias"] / peaks[method, args.n, "bias"]
        print(f"  peak with {n2} over {args.n} inputs, {method}: {ratio:.2f}x")
    print(f"  (one image: {image_bytes / 2**20:.2f} MB float32)")


if __name__ == "__main__":
    main()
