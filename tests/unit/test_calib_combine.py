"""Streaming combination of calibration exposures against the simulator's true calibration.

Expected noise of a master, from the detector's electronics: each input pixel
carries read noise and ADU rounding, ``R = rn^2 + gain^2 / 12`` (e^2), plus the
noise of its row's overscan level, the median of ``n_os`` such values, which
adds ``pi / (2 n_os)`` of ``R``; darks and flats add their Poisson noise, and
every dark (flat) carries the same master bias (and dark) error, which
averaging does not reduce.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Iterator
from functools import cache

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ppray.calib.combine import MasterResult, StreamingCombiner, combine_calibration
from ppray.calib.prepare import CalibKind, input_preparer
from ppray.calib.quality import combined_quality
from ppray.instrument import load_instrument
from ppray.rawio import read_raw, write_raw
from ppray.science.isr import OVERSCAN_SKIP_COLUMNS
from ppray.sim.calib_exposures import CalibSet, simulate_calib_set, simulate_flat

SYN = load_instrument("synthetic")
N_BIAS, N_DARK, N_FLAT = 12, 10, 10
DARKTIME_S = 60.0
FLUX_E = 20_000.0
FLAT_EXPTIME_S = 10.0  # simulate_calib_set's flats
CR_PER_EXPOSURE = 40


@cache
def calib_set(detector: str = "R22_S11") -> CalibSet:
    """Biases, darks and flats of one detector (cached: do not modify)."""
    det = SYN.detector(detector)
    return simulate_calib_set(
        SYN,
        det,
        n_bias=N_BIAS,
        n_dark=N_DARK,
        n_flat=N_FLAT,
        darktime_s=DARKTIME_S,
        flux_e_per_px=FLUX_E,
        cosmic_rays=CR_PER_EXPOSURE,
        seed=0,
    )


@cache
def masters(detector: str = "R22_S11") -> tuple[MasterResult, MasterResult, MasterResult]:
    """Combined bias, dark and flat of :func:`calib_set` (cached: do not modify)."""
    det = SYN.detector(detector)
    cs = calib_set(detector)
    bias = combine_calibration("bias", (e.raw for e in cs.biases), SYN, det)
    dark = combine_calibration(
        "dark",
        (e.raw for e in cs.darks),
        SYN,
        det,
        bias=bias.combined.image,
        bias_variance=bias.combined.variance,
    )
    flat = combine_calibration(
        "flat",
        (e.raw for e in cs.flats),
        SYN,
        det,
        bias=bias.combined.image,
        dark=dark.combined.image,
        bias_variance=bias.combined.variance,
        dark_variance=dark.combined.variance,
    )
    return bias, dark, flat


def _read_variance_e2() -> float:
    """Per-pixel variance of one input from readout alone, overscan level included."""
    layout = SYN.layout
    n_os = layout.serial_overscan - OVERSCAN_SKIP_COLUMNS
    per_pixel = layout.read_noise_e**2 + layout.gain_e_per_adu**2 / 12.0
    return per_pixel * (1.0 + math.pi / (2.0 * n_os))


def _good() -> np.ndarray:
    return ~calib_set().truth.calibs.defects


# --- recovery of the true calibration -------------------------------------------------


def test_bias_recovers_truth_within_read_noise() -> None:
    bias, _, _ = masters()
    truth = calib_set().truth.calibs
    residual = (bias.combined.image - truth.bias).astype(np.float64)
    expected = math.sqrt(_read_variance_e2() / N_BIAS)
    assert_allclose(residual.std(), expected, rtol=0.1)
    # The mean's standard error (row-correlated overscan noise included) is < 0.01 sigma.
    assert abs(residual.mean()) < 0.05 * expected
    assert_allclose(np.median(bias.combined.variance), expected**2, rtol=0.1)
    assert (bias.combined.n_used >= N_BIAS - 1).mean() > 0.999


def test_dark_recovers_truth_per_second() -> None:
    bias, dark, _ = masters()
    truth = calib_set().truth.calibs
    good = _good()
    residual = (dark.combined.image - truth.dark)[good].astype(np.float64)
    t = DARKTIME_S
    poisson = float(truth.dark[good].mean()) * t
    own = (_read_variance_e2() + poisson) / N_DARK / t**2
    from_bias = float(np.median(bias.combined.variance)) / t**2
    expected = math.sqrt(own + from_bias)
    assert_allclose(residual.std(), expected, rtol=0.1)
    assert abs(residual.mean()) < 0.05 * expected
    assert_allclose(dark.mean_scale, DARKTIME_S)


def test_flat_recovers_truth_relative_response() -> None:
    *_, flat = masters()
    truth = calib_set().truth.calibs
    good = _good()
    image = flat.combined.image / flat.combined.image[good].mean(dtype=np.float64)
    residual = (image - truth.flat)[good].astype(np.float64)
    signal = FLUX_E * float(truth.flat[good].mean())
    dark_e = float(truth.dark[good].mean()) * FLAT_EXPTIME_S
    expected = math.sqrt((signal + dark_e + _read_variance_e2()) / N_FLAT) / FLUX_E
    assert_allclose(residual.std(), expected, rtol=0.1)
    assert abs(residual.mean()) < 0.05 * expected
    # Every input was divided by its own median: the combination sits at 1.
    assert_allclose(np.median(flat.combined.image[good]), 1.0, atol=1e-3)
    assert_allclose(flat.mean_scale, FLUX_E * np.median(truth.flat), rtol=2e-3)


@pytest.mark.parametrize("kind", ["bias", "dark", "flat"])
def test_propagated_variance_is_honest(kind: str) -> None:
    bias, dark, flat = masters()
    truth = calib_set().truth.calibs
    good = _good()
    result = {"bias": bias, "dark": dark, "flat": flat}[kind].combined
    if kind == "flat":
        # The flat's scale is its own median; compare on the truth's scale.
        norm = float(result.image[good].mean(dtype=np.float64))
        chi = (result.image / norm - truth.flat) / (np.sqrt(result.variance) / norm)
    else:
        chi = (result.image - getattr(truth, kind)) / np.sqrt(result.variance)
    values = chi[good].astype(np.float64)
    assert_allclose(values.std(), 1.0, atol=0.05)
    assert abs(values.mean()) < 0.05
    quality = combined_quality(result, good=good)
    assert_allclose(quality["noise_ratio"], 1.0, atol=0.15)


# --- outlier rejection ------------------------------------------------------------


def test_cosmic_rays_are_rejected() -> None:
    bias, dark, _ = masters()
    cs = calib_set()
    truth = cs.truth.calibs
    hit = np.any([e.cosmic_ray_mask for e in cs.darks], axis=0) & _good()
    assert hit.sum() > 1000  # enough tracks that a clean result is no accident
    sigma = np.sqrt(dark.combined.variance)
    chi = np.abs(dark.combined.image - truth.dark) / sigma
    assert chi[hit].max() < 6.0
    # Each hit pixel lost its bad input; rarely one more, where another track passed close.
    n_used = dark.combined.n_used[hit]
    assert (n_used < N_DARK).all()
    assert (n_used == N_DARK - 1).mean() > 0.9
    assert n_used.min() >= N_DARK - 3
    # Without rejection the same inputs leave the tracks in: the test can fail.
    det = SYN.detector("R22_S11")
    plain = combine_calibration(
        "dark", (e.raw for e in cs.darks), SYN, det, bias=bias.combined.image, method="mean"
    )
    plain_chi = np.abs(plain.combined.image - truth.dark) / sigma
    assert np.median(plain_chi[hit]) > 50.0


def test_flat_inputs_with_cosmic_rays_and_different_levels() -> None:
    """Lamp levels that differ by 30% still combine: each input is normalised first."""
    cs = calib_set()
    det = SYN.detector("R22_S11")
    truth = cs.truth.calibs
    preparer = input_preparer("flat", SYN, det, bias=truth.bias, dark=truth.dark)
    combiner = StreamingCombiner(truth.shape)
    hit = np.zeros(truth.shape, dtype=bool)
    levels = []
    fluxes = np.linspace(0.85, 1.15, 7) * FLUX_E
    for k, flux in enumerate(fluxes):
        exp = simulate_flat(SYN, det, cs.truth, flux, "r", seed=100 + k, cosmic_rays=80)
        hit |= exp.cosmic_ray_mask
        prepared = preparer.prepare(exp.raw)
        levels.append(prepared.scale)
        assert_allclose(np.median(prepared.exposure.image), 1.0, atol=1e-3)
        combiner.add_exposure(prepared.exposure)
    result = combiner.result()
    good = _good()
    image = result.image / result.image[good].mean(dtype=np.float64)
    chi = (image - truth.flat) / np.sqrt(result.variance)
    assert np.abs(chi[hit & good]).max() < 6.0
    assert_allclose(chi[good].std(), 1.0, atol=0.05)
    assert_allclose(np.array(levels) / levels[3], fluxes / FLUX_E, rtol=1e-3)


# --- the combiner on its own -------------------------------------------------------


def _gaussian_stream(n: int, shape: tuple[int, int], seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.linspace(0.0, 50.0, shape[0] * shape[1], dtype=np.float32).reshape(shape)
    for _ in range(n):
        yield truth + rng.standard_normal(shape, dtype=np.float32) * np.float32(3.0)


def test_memory_is_bounded_by_a_few_images() -> None:
    shape = (64, 96)
    plane = shape[0] * shape[1] * 4
    combiner = StreamingCombiner(shape, n_reference=5)
    sizes = []
    for image in _gaussian_stream(60, shape, seed=1):
        combiner.add(image, np.full(shape, 9.0, dtype=np.float32))
        sizes.append(combiner.nbytes)
    # While the reference forms: five images and their variances.
    assert combiner.n_added == 60
    assert max(sizes[:4]) == 2 * 5 * plane
    # Afterwards: reference, its variance, the variance shape, four sums, a uint16 count.
    assert sizes[4] <= 8 * plane
    assert len(set(sizes[4:])) == 1
    assert "held_image" not in combiner.state_arrays()
    assert max(a.nbytes for a in combiner.state_arrays().values()) <= plane


def _peak_bytes(n: int, shape: tuple[int, int]) -> int:
    tracemalloc.start()
    try:
        combiner = StreamingCombiner(shape)
        for image in _gaussian_stream(n, shape, seed=2):
            combiner.add(image, 9.0)
        combiner.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_inputs() -> None:
    shape = (128, 128)
    plane = shape[0] * shape[1] * 4
    few, many = _peak_bytes(8, shape), _peak_bytes(48, shape)
    assert many < 1.1 * few
    assert many < 20 * plane  # held images plus a few temporaries, not 48 images


def test_mean_method_is_the_weighted_mean() -> None:
    shape = (32, 40)
    images = list(_gaussian_stream(6, shape, seed=3))
    variances = [np.full(shape, v, dtype=np.float32) for v in (4.0, 9.0, 9.0, 16.0, 4.0, 1.0)]
    combiner = StreamingCombiner(shape, method="mean")
    for img, var in zip(images, variances, strict=True):
        combiner.add(img, var)
    result = combiner.result()
    w = np.array([1.0 / v[0, 0] for v in variances])
    expected = np.tensordot(w, np.stack(images), axes=1) / w.sum()
    assert_allclose(result.image, expected, rtol=1e-5, atol=1e-4)
    assert_allclose(result.variance, 1.0 / w.sum(), rtol=1e-5)
    assert_array_equal(result.n_used, 6)


def test_unknown_noise_is_estimated_from_the_inputs() -> None:
    shape = (80, 80)
    n, sigma, level = 15, 3.0, 100.0
    rng = np.random.default_rng(4)
    combiner = StreamingCombiner(shape)
    hits = np.zeros(shape, dtype=bool)
    for _ in range(n):
        image = np.float32(level) + rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
        y, x = rng.integers(0, shape[0], 30), rng.integers(0, shape[1], 30)
        image[y, x] += 500.0
        hits[y, x] = True
        combiner.add(image)
    result = combiner.result()
    expected = sigma**2 / n
    assert_allclose(np.median(result.variance), expected, rtol=0.1)
    assert_allclose(np.nanmedian(result.empirical_variance), expected, rtol=0.15)
    assert np.abs(result.image - level)[hits].max() < 5 * math.sqrt(expected)


def test_masked_and_non_finite_pixels_are_left_out() -> None:
    shape = (40, 40)
    combiner = StreamingCombiner(shape)
    images = list(_gaussian_stream(8, shape, seed=7))
    for k, image in enumerate(images):
        mask = np.zeros(shape, dtype=bool)
        mask[5, :] = k < 3
        if k == 6:
            image = image.copy()
            image[10, 10] = np.nan
            mask[:, 20] = True
        combiner.add(image, 9.0, mask=mask)
    result = combiner.result()
    assert (result.n_used[5, :] <= 5).all()
    assert result.n_used[10, 10] <= 7 and (result.n_used[:, 20] <= 7).all()
    assert np.isfinite(result.image).all()
    stack = np.stack(images[3:])
    keep = np.arange(shape[1]) != 20
    assert_allclose(result.image[5, keep], stack[:, 5, keep].mean(axis=0), atol=1e-3)


def test_few_inputs_are_combined_without_clipping() -> None:
    shape = (16, 16)
    images = list(_gaussian_stream(2, shape, seed=8))
    images[1][3, 3] += 1000.0
    combiner = StreamingCombiner(shape)
    for image in images:
        combiner.add(image, 9.0)
    result = combiner.result()
    # Two values have no majority: both are kept, outlier and all.
    assert_array_equal(result.n_used, 2)
    assert_allclose(result.image, (images[0] + images[1]) / 2, rtol=1e-6, atol=1e-4)
    one = StreamingCombiner(shape)
    one.add(images[0], 9.0)
    assert_allclose(one.result().image, images[0], atol=1e-5)


def test_combiner_rejects_bad_input() -> None:
    combiner = StreamingCombiner((8, 8))
    with pytest.raises(ValueError, match="shape"):
        combiner.add(np.zeros((8, 9)))
    combiner.add(np.zeros((8, 8)), 1.0)
    with pytest.raises(ValueError, match="noise model"):
        combiner.add(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="no inputs"):
        StreamingCombiner((8, 8)).result()
    with pytest.raises(ValueError, match="method"):
        StreamingCombiner((8, 8), method="median")  # type: ignore[arg-type]


# --- preparing inputs --------------------------------------------------------------


def test_inputs_are_prepared_per_kind() -> None:
    cs = calib_set()
    det = SYN.detector("R22_S11")
    truth = cs.truth.calibs
    with pytest.raises(ValueError, match="bias"):
        input_preparer("dark", SYN, det)
    with pytest.raises(ValueError, match="dark"):
        input_preparer("flat", SYN, det, bias=truth.bias)
    bias_in = input_preparer("bias", SYN, det).prepare(cs.biases[0].raw)
    dark_in = input_preparer("dark", SYN, det, bias=truth.bias).prepare(cs.darks[0].raw)
    assert bias_in.scale == 1.0 and dark_in.scale == DARKTIME_S
    good = _good() & ~cs.darks[0].cosmic_ray_mask
    # Overscan only: the bias structure remains; with the bias gone, e-/s remain.
    assert_allclose(np.median(bias_in.exposure.image - truth.bias), 0.0, atol=0.1)
    assert_allclose(np.median(dark_in.exposure.image[good]), np.median(truth.dark[good]), atol=0.01)
    assert dark_in.exposure.metadata["CALSCALE"] == DARKTIME_S
    assert input_preparer(CalibKind.FLAT, SYN, det, bias=truth.bias, dark=truth.dark).kind == "flat"


def test_calibration_raws_round_trip_through_fits() -> None:
    """The simulator writes what a camera would: the project's raw reader takes it."""
    cs = calib_set()
    det = SYN.detector("R22_S11")
    exposure = cs.darks[0].raw
    back = read_raw(write_raw(exposure.segments, exposure.header, SYN, det), SYN, det)
    assert back.header["IMGTYPE"] == "DARK"
    assert back.darktime_s == DARKTIME_S
    for name, segment in exposure.segments.items():
        assert_array_equal(back.segments[name], segment)


def test_unknown_noise_of_a_single_input_is_not_invented() -> None:
    one = StreamingCombiner((8, 8))
    one.add(np.ones((8, 8), dtype=np.float32))
    result = one.result()
    assert_array_equal(result.image, 1.0)
    assert np.isnan(result.variance).all()
