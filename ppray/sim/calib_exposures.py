"""Simulated calibration exposures: biases, darks and flats of a detector with known defects.

The true calibration is :func:`ppray.sim.render.make_calibrations`' bias, dark
and flat without its own defects, plus defects injected here with a truth
table: hot pixels (dark current far above the rest), cold pixels (low flat
response), dead pixels (no response) and bad columns (a partial hot column in
the dark, a low-response column in the flat). Exposures go through the same
readout as science raws (:func:`ppray.sim.render.electrons_to_segments`):
overscan, bias drift, read noise, CTI trail, integer ADU, so ISR reads them as
it reads a science raw.

Charge per pixel, in the order it is collected::

    Poisson(flux * flat + dark * DARKTIME) + cosmic rays + bias

A bias has no light and no dark time; a dark has no light. The simulated flat
response is achromatic: the filter only labels the header.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ppray.image import Calibrations, RawExposure
from ppray.instrument import Detector, Instrument
from ppray.sim.render import _cosmic_rays, electrons_to_segments, make_calibrations

__all__ = [
    "COSMIC_RAYS_PER_CM2_S",
    "DEFECT_TRUTH_SCHEMA",
    "NO_DEFECTS",
    "CalibSet",
    "CalibTruth",
    "DefectInjection",
    "SimulatedCalibExposure",
    "make_calib_truth",
    "relative_gain",
    "simulate_bias",
    "simulate_calib_set",
    "simulate_dark",
    "simulate_flat",
]

# Cosmic rays plus the CCD's own radioactivity, per cm^2 of silicon per second of dark
# time: a few per cm^2 per minute, as ground-based CCDs see.
COSMIC_RAYS_PER_CM2_S = 0.05

DEFECT_TRUTH_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "hot", "cold", "dead" or "bad_column"
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        # Dark excess (e-/s) of hot pixels and hot columns; flat response of the others.
        ("value", pa.float64()),
    ]
)

_SEED_TAG = {"truth": 0xDEF, "bias": 0xB1A5, "dark": 0xDA4C, "flat": 0xF1A7}


@dataclass(frozen=True)
class DefectInjection:
    """How many defects of each kind to inject, and how strong.

    Attributes
    ----------
    n_hot
        Hot pixels; dark excess log-uniform in ``hot_e_per_s``.
    n_cold
        Cold pixels; flat response uniform in ``cold_response``.
    n_dead
        Dead pixels; flat response ``dead_response``: almost nothing, but not
        exactly 0, which would leave no data at all in every science image.
    n_hot_columns
        Partial hot columns: from a random row in the lower half to the top,
        dark excess uniform in ``hot_column_e_per_s``.
    n_low_columns
        Whole columns of low flat response, uniform in ``low_column_response``
        (above the usual cold-pixel threshold of 0.8 on purpose: only the
        column as a whole stands out).
    """

    n_hot: int = 60
    hot_e_per_s: tuple[float, float] = (1.0, 50.0)
    n_cold: int = 30
    cold_response: tuple[float, float] = (0.2, 0.7)
    n_dead: int = 15
    dead_response: float = 0.02
    n_hot_columns: int = 1
    hot_column_e_per_s: tuple[float, float] = (0.5, 2.0)
    n_low_columns: int = 1
    low_column_response: tuple[float, float] = (0.82, 0.9)

    def __post_init__(self) -> None:
        for name in ("n_hot", "n_cold", "n_dead", "n_hot_columns", "n_low_columns"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)!r}")


NO_DEFECTS = DefectInjection(n_hot=0, n_cold=0, n_dead=0, n_hot_columns=0, n_low_columns=0)
"""Inject nothing: with ``base_defects`` the camera has only its own defects."""


@dataclass(frozen=True)
class CalibTruth:
    """The true calibration of a simulated detector and its injected defects.

    Attributes
    ----------
    calibs
        Bias (e-), dark (e-/s) and flat (mean 1 over good pixels); ``defects``
        is ``True`` on every injected defect pixel.
    defects
        One row per defect (:data:`DEFECT_TRUTH_SCHEMA`): a 1x1 box for a
        pixel, a ``1 x height`` box for a column.
    """

    calibs: Calibrations
    defects: pa.Table


@dataclass(frozen=True)
class SimulatedCalibExposure:
    """One simulated calibration raw and what the simulator knows about it.

    Attributes
    ----------
    raw
        The raw (segments in ADU, header with ``IMGTYPE``, ``EXPTIME``, ``DARKTIME``).
    cosmic_ray_mask
        ``True`` where a cosmic ray deposited charge.
    saturated
        ``True`` where the data reached the amplifier's saturation level.
    """

    raw: RawExposure
    cosmic_ray_mask: np.ndarray
    saturated: np.ndarray


@dataclass(frozen=True)
class CalibSet:
    """A night's calibration exposures of one detector (see :func:`simulate_calib_set`)."""

    truth: CalibTruth
    biases: tuple[SimulatedCalibExposure, ...]
    darks: tuple[SimulatedCalibExposure, ...]
    flats: tuple[SimulatedCalibExposure, ...]


def _distinct_pixels(
    rng: np.random.Generator, free: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct ``(y, x)`` among the ``True`` pixels of ``free``, then taken."""
    candidates = np.flatnonzero(free)
    if n > candidates.size:
        raise ValueError(f"cannot place {n} defects on {candidates.size} free pixels")
    chosen = rng.choice(candidates, n, replace=False)
    free.reshape(-1)[chosen] = False
    y, x = np.divmod(chosen, free.shape[1])
    return y, x


def make_calib_truth(
    instrument: Instrument,
    detector: Detector,
    *,
    seed: int = 0,
    injection: DefectInjection | None = None,
    base_defects: bool = False,
) -> CalibTruth:
    """The true calibration of a detector with injected defects and their truth table.

    Parameters
    ----------
    instrument, detector
        The camera and the detector.
    seed
        Random seed, combined with ``detector.id`` (as :func:`make_calibrations`).
    injection
        What to inject; the defaults of :class:`DefectInjection` when ``None``.
    base_defects
        Start from :func:`make_calibrations` *with* its own hot and dead pixels and
        hot column (the science simulator's camera, exactly) and add them to the
        truth table; the injected defects go elsewhere. Default: start without them.

    Returns
    -------
    CalibTruth
        Calibrations with defects, and one truth row per defect. Columns keep
        4 pixels from the edges and 8 from each other; pixel defects avoid the
        columns and each other.
    """
    inj = injection if injection is not None else DefectInjection()
    base = make_calibrations(instrument, detector, seed=seed, defects=base_defects)
    ny, nx = base.shape
    rng = np.random.default_rng([seed, detector.id, _SEED_TAG["truth"]])
    dark = base.dark.copy()
    flat = base.flat.copy()
    defects = base.defects.copy()
    rows = _base_defect_rows(base) if base_defects else []

    n_columns = inj.n_hot_columns + inj.n_low_columns
    allowed = np.arange(4, nx - 4)
    for row in rows:
        if row[0] == "bad_column":
            allowed = allowed[np.abs(allowed - row[1]) > 8]
    columns: list[int] = []
    while len(columns) < n_columns:
        if allowed.size == 0:
            raise ValueError(f"cannot place {n_columns} bad columns on {nx} columns")
        col = int(rng.choice(allowed))
        columns.append(col)
        allowed = allowed[np.abs(allowed - col) > 8]
    for k, col in enumerate(columns):
        if k < inj.n_hot_columns:
            y0 = int(rng.integers(0, ny // 2))
            excess = float(rng.uniform(*inj.hot_column_e_per_s))
            dark[y0:, col] += np.float32(excess)
            rows.append(("bad_column", col, y0, 1, ny - y0, excess))
        else:
            y0 = 0
            response = float(rng.uniform(*inj.low_column_response))
            flat[:, col] *= np.float32(response)
            rows.append(("bad_column", col, 0, 1, ny, response))
        defects[y0:, col] = True

    free = ~defects
    free[:, np.asarray(columns, dtype=np.int64)] = False
    hy, hx = _distinct_pixels(rng, free, inj.n_hot)
    lo, hi = inj.hot_e_per_s
    hot = np.exp(rng.uniform(math.log(lo), math.log(hi), hy.size))
    dark[hy, hx] = (dark[hy, hx] + hot).astype(np.float32)
    rows += [("hot", int(x), int(y), 1, 1, float(v)) for y, x, v in zip(hy, hx, hot, strict=True)]
    cy, cx = _distinct_pixels(rng, free, inj.n_cold)
    cold = rng.uniform(*inj.cold_response, cy.size)
    flat[cy, cx] *= cold.astype(np.float32)
    rows += [("cold", int(x), int(y), 1, 1, float(v)) for y, x, v in zip(cy, cx, cold, strict=True)]
    dy, dx = _distinct_pixels(rng, free, inj.n_dead)
    flat[dy, dx] = np.float32(inj.dead_response)
    rows += [("dead", int(x), int(y), 1, 1, inj.dead_response) for y, x in zip(dy, dx, strict=True)]
    for y, x in ((hy, hx), (cy, cx), (dy, dx)):
        defects[y, x] = True

    if not base_defects:  # make_calibrations' own flat is normalised already
        flat /= np.float32(flat[~defects].mean(dtype=np.float64))
    table = pa.Table.from_pylist(
        [dict(zip(DEFECT_TRUTH_SCHEMA.names, r, strict=True)) for r in rows],
        schema=DEFECT_TRUTH_SCHEMA,
    )
    metadata = dict(base.metadata)
    metadata["SIMDEFCT"] = len(rows)
    calibs = Calibrations(bias=base.bias, dark=dark, flat=flat, defects=defects, metadata=metadata)
    return CalibTruth(calibs=calibs, defects=table)


def relative_gain(seed: int, detector: Detector, spread: float = 0.05) -> float:
    """The detector's response relative to the camera's (QE times gain error).

    Uniform in ``1 +- spread``, fixed by ``(seed, detector.id)``. A single
    detector's flat cannot show it; the focal-plane normalisation recovers it.
    """
    rng = np.random.default_rng([seed, detector.id, 0x6A1])
    return float(1.0 + spread * rng.uniform(-1.0, 1.0))


def _base_defect_rows(base: Calibrations) -> list[tuple[str, int, int, int, int, float]]:
    """Truth rows for :func:`make_calibrations`' own defects, read off its planes.

    Its hot column runs from some row to the top; its dead pixels have a flat of
    0.02; every other defect pixel is hot.
    """
    ny, _ = base.shape
    defects = base.defects
    rows: list[tuple[str, int, int, int, int, float]] = []
    in_column = np.zeros_like(defects)
    for col in np.flatnonzero(defects.sum(axis=0) > ny // 4):
        run = int(np.argmin(defects[::-1, col])) if not defects[:, col].all() else ny
        y0 = ny - run
        in_column[y0:, col] = True
        neighbour = base.dark[y0:, col - 2] if col >= 2 else base.dark[y0:, col + 2]
        excess = float(np.median(base.dark[y0:, col]) - np.median(neighbour))
        rows.append(("bad_column", int(col), y0, 1, run, excess))
    single = defects & ~in_column
    dead = single & (base.flat < 0.05)
    for kind, plane in (("dead", dead), ("hot", single & ~dead)):
        ys, xs = np.nonzero(plane)
        values = base.flat[ys, xs] if kind == "dead" else base.dark[ys, xs]
        rows += [
            (kind, int(x), int(y), 1, 1, float(v)) for y, x, v in zip(ys, xs, values, strict=True)
        ]
    return rows


def _n_cosmic_rays(instrument: Instrument, darktime_s: float) -> int:
    area_cm2 = instrument.layout.nx * instrument.layout.ny * (instrument.pixel_size_um * 1e-4) ** 2
    return round(COSMIC_RAYS_PER_CM2_S * area_cm2 * darktime_s)


def _expose(
    kind: str,
    instrument: Instrument,
    detector: Detector,
    truth: CalibTruth,
    *,
    flux_e_per_px: float,
    exptime_s: float,
    darktime_s: float,
    band: str,
    seed: int,
    cosmic_rays: int | None,
    header: Mapping[str, Any] | None,
) -> SimulatedCalibExposure:
    calibs = truth.calibs
    shape = calibs.shape
    rng = np.random.default_rng([seed, detector.id, _SEED_TAG[kind]])
    expected = np.zeros(shape, dtype=np.float32)
    if flux_e_per_px > 0:
        expected += calibs.flat * np.float32(flux_e_per_px)
    if darktime_s > 0:
        expected += calibs.dark * np.float32(darktime_s)
    electrons = rng.poisson(expected).astype(np.float32)
    del expected
    n_cr = _n_cosmic_rays(instrument, darktime_s) if cosmic_rays is None else cosmic_rays
    cr_index, cr_charge = _cosmic_rays(shape, n_cr, rng)
    np.add.at(electrons.reshape(-1), cr_index, cr_charge.astype(np.float32))
    cr_mask = np.zeros(shape, dtype=bool)
    cr_mask.reshape(-1)[cr_index] = True
    electrons += calibs.bias
    segments, saturated = electrons_to_segments(electrons, instrument, detector, rng)
    hdr: dict[str, Any] = {
        "INSTRUME": instrument.name,
        "DETNAME": detector.name,
        "DETECTOR": detector.id,
        "IMGTYPE": kind.upper(),
        "OBSTYPE": kind.upper(),
        "EXPTIME": float(exptime_s),
        "DARKTIME": float(darktime_s),
        "FILTER": band,
        "SIMSEED": seed,
    }
    if header:
        hdr.update(header)
    return SimulatedCalibExposure(
        raw=RawExposure(segments=segments, header=hdr, finite=True),
        cosmic_ray_mask=cr_mask,
        saturated=saturated,
    )


def simulate_bias(
    instrument: Instrument,
    detector: Detector,
    truth: CalibTruth,
    *,
    seed: int,
    cosmic_rays: int = 0,
    header: Mapping[str, Any] | None = None,
) -> SimulatedCalibExposure:
    """A zero-second bias: the bias structure and the readout, nothing else.

    Parameters
    ----------
    instrument, detector
        The camera and the detector.
    truth
        The detector's true calibration (:func:`make_calib_truth`).
    seed
        Noise seed; each exposure of a set needs its own.
    cosmic_rays
        Cosmic-ray tracks (none by default: a bias integrates for no time).
    header
        Extra header keys, overriding the defaults.

    Returns
    -------
    SimulatedCalibExposure
        ``IMGTYPE = "BIAS"``, ``EXPTIME = DARKTIME = 0``.
    """
    return _expose(
        "bias",
        instrument,
        detector,
        truth,
        flux_e_per_px=0.0,
        exptime_s=0.0,
        darktime_s=0.0,
        band="",
        seed=seed,
        cosmic_rays=cosmic_rays,
        header=header,
    )


def simulate_dark(
    instrument: Instrument,
    detector: Detector,
    truth: CalibTruth,
    darktime_s: float,
    *,
    seed: int,
    cosmic_rays: int | None = None,
    header: Mapping[str, Any] | None = None,
) -> SimulatedCalibExposure:
    """A dark of ``darktime_s`` seconds: dark current, cosmic rays, bias and readout.

    Parameters
    ----------
    instrument, detector, truth
        As :func:`simulate_bias`.
    darktime_s
        Dark time (s), > 0; also ``EXPTIME`` (the shutter stays closed).
    seed
        Noise seed.
    cosmic_rays
        Number of cosmic-ray tracks; ``None`` gives :data:`COSMIC_RAYS_PER_CM2_S`
        times the detector's area and the dark time.
    header
        Extra header keys.

    Returns
    -------
    SimulatedCalibExposure
        ``IMGTYPE = "DARK"``.
    """
    if not darktime_s > 0:
        raise ValueError(f"darktime_s must be > 0, not {darktime_s!r}")
    return _expose(
        "dark",
        instrument,
        detector,
        truth,
        flux_e_per_px=0.0,
        exptime_s=darktime_s,
        darktime_s=darktime_s,
        band="",
        seed=seed,
        cosmic_rays=cosmic_rays,
        header=header,
    )


def simulate_flat(
    instrument: Instrument,
    detector: Detector,
    truth: CalibTruth,
    flux_e_per_px: float,
    band: str,
    *,
    seed: int,
    exptime_s: float = 10.0,
    cosmic_rays: int | None = None,
    header: Mapping[str, Any] | None = None,
) -> SimulatedCalibExposure:
    """A dome flat: uniform light times the flat response, dark current, cosmic rays.

    Parameters
    ----------
    instrument, detector, truth
        As :func:`simulate_bias`.
    flux_e_per_px
        Electrons collected by a pixel of response 1 (> 0).
    band
        Filter, written as ``FILTER`` (the simulated response is achromatic).
    seed
        Noise seed.
    exptime_s
        Exposure (and dark) time (s), > 0.
    cosmic_rays
        Number of cosmic-ray tracks; ``None`` scales with area and exposure time.
    header
        Extra header keys.

    Returns
    -------
    SimulatedCalibExposure
        ``IMGTYPE = "FLAT"``.
    """
    if not flux_e_per_px > 0:
        raise ValueError(f"flux_e_per_px must be > 0, not {flux_e_per_px!r}")
    if not exptime_s > 0:
        raise ValueError(f"exptime_s must be > 0, not {exptime_s!r}")
    return _expose(
        "flat",
        instrument,
        detector,
        truth,
        flux_e_per_px=float(flux_e_per_px),
        exptime_s=exptime_s,
        darktime_s=exptime_s,
        band=band,
        seed=seed,
        cosmic_rays=cosmic_rays,
        header=header,
    )


def simulate_calib_set(
    instrument: Instrument,
    detector: Detector,
    *,
    n_bias: int = 10,
    n_dark: int = 10,
    n_flat: int = 10,
    darktime_s: float = 60.0,
    flux_e_per_px: float = 20_000.0,
    band: str = "r",
    cosmic_rays: int | None = None,
    seed: int = 0,
    truth: CalibTruth | None = None,
) -> CalibSet:
    """A set of biases, darks and flats of one detector from one true calibration.

    Parameters
    ----------
    instrument, detector
        The camera and the detector.
    n_bias, n_dark, n_flat
        How many of each.
    darktime_s
        Dark time of each dark (s).
    flux_e_per_px
        Flat level (electrons at response 1); flats expose for 10 s.
    band
        The flats' filter.
    cosmic_rays
        Tracks per dark and per flat; ``None`` scales with area and dark time.
    seed
        Seed of the truth (unless given) and of the exposures' noise.
    truth
        The true calibration; :func:`make_calib_truth` with ``seed`` when ``None``.

    Returns
    -------
    CalibSet
        The truth and the exposures, each with its own noise seed.
    """
    if truth is None:
        truth = make_calib_truth(instrument, detector, seed=seed)
    biases = tuple(
        simulate_bias(instrument, detector, truth, seed=seed * 100_003 + k) for k in range(n_bias)
    )
    darks = tuple(
        simulate_dark(
            instrument,
            detector,
            truth,
            darktime_s,
            seed=seed * 100_003 + k,
            cosmic_rays=cosmic_rays,
        )
        for k in range(n_dark)
    )
    flats = tuple(
        simulate_flat(
            instrument,
            detector,
            truth,
            flux_e_per_px,
            band,
            seed=seed * 100_003 + k,
            cosmic_rays=cosmic_rays,
        )
        for k in range(n_flat)
    )
    return CalibSet(truth=truth, biases=biases, darks=darks, flats=flats)
