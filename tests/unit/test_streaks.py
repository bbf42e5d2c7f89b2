"""Streaks on synthetic difference images: found, measured and masked; look-alikes are not."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
from astropy.wcs import WCS

from ppray.image import Exposure, MaskBit
from ppray.science.dia import DIA_SOURCE_SCHEMA, FLAG_EDGE, SNR_SCALE_KEY, detect_dia_sources
from ppray.science.stats import FWHM_PER_SIGMA
from ppray.science.streaks import (
    Streak,
    StreakResult,
    find_streaks,
    replace_streak_fragments,
    streak_dia_rows,
)
from ppray.science.subtraction import subtract_images

from .simdata_diff import make_pair
from .simdata_streaks import (
    NOISE_E,
    PSF_SIGMA_PX,
    TruthStreak,
    add_cosmic_ray,
    add_dipole,
    add_four_lobes,
    add_point_source,
    add_streak,
    clip_to_image,
    noise_exposure,
    segment,
)

SHAPE = (1024, 1024)
MARGIN_PX = 2.0  # find_streaks' default mask_margin_px

SINGLE = {
    "bright, near-horizontal": segment(512, 300, 2000, 0.3, 20.0),
    "faint, near-vertical": segment(700, 512, 2000, 89.7, 1.0),
    "faint, diagonal": segment(512, 512, 2000, 30.0, 1.0),
    "fainter, diagonal": segment(512, 400, 2000, 10.0, 0.7),
    "both ends inside": segment(500, 520, 600, -45.0, 3.0),
    "one end inside": segment(300, 200, 900, -70.0, 1.0),
    "short and faint": segment(512, 400, 400, 20.0, 0.8),
    "wide and faint": segment(512, 512, 2000, 60.0, 0.7, 5.1),
    "horizontal": segment(512, 611.0, 2000, 0.0, 2.0),
    "vertical": segment(333.0, 512, 2000, 90.0, 2.0),
}


def _ends(streak: Streak) -> np.ndarray:
    return np.array([[streak.x0, streak.y0], [streak.x1, streak.y1]])


def _end_error(streak: Streak, truth_ends: np.ndarray) -> float:
    """Largest distance between matched ends, in whichever order they match best."""
    ends = _ends(streak)
    return min(
        float(np.hypot(*(ends - truth_ends).T).max()),
        float(np.hypot(*(ends[::-1] - truth_ends).T).max()),
    )


def _angle_error(a_deg: float, b_deg: float) -> float:
    return abs((a_deg - b_deg + 90.0) % 180.0 - 90.0)


def _distance_to_segment(x: np.ndarray, y: np.ndarray, ends: np.ndarray) -> np.ndarray:
    (x0, y0), (x1, y1) = ends
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def _check(
    found: Streak,
    truth: TruthStreak,
    model: np.ndarray,
    mask: np.ndarray,
    others: tuple[TruthStreak, ...] = (),
) -> None:
    """A streak measured as ``truth`` and masked over its pixels and not much else
    (with ``others``: nothing else but theirs)."""
    ends = clip_to_image(truth, model.shape)
    # An end is a step in the flux along the line: to ~1 px at 2 sigma per pixel, a
    # few px at 1 sigma (4.9 px at most over 12 trials).
    assert _end_error(found, ends) <= (3.0 if abs(truth.peak_sigma) >= 2.0 else 5.0)
    assert _angle_error(found.angle_deg, truth.angle_deg) <= 0.5
    assert found.length_px == pytest.approx(float(np.hypot(*(ends[1] - ends[0]))), abs=6.0)
    assert found.width_px == pytest.approx(FWHM_PER_SIGMA * truth.sigma_px, rel=0.15)
    tolerance = max(4.0 * found.flux_per_px_err, 0.04 * abs(truth.flux_per_px))
    assert found.flux_per_px == pytest.approx(truth.flux_per_px, abs=tolerance)
    assert found.snr == pytest.approx(abs(found.flux_per_px) / found.flux_per_px_err)
    runs_off = not np.allclose(ends, [[truth.x0, truth.y0], [truth.x1, truth.y1]], atol=0.5)
    assert found.truncated == runs_off
    # >= 99% of the pixels where the streak is above half the noise are masked...
    above = np.abs(model) > 0.5 * NOISE_E
    assert mask[above].mean() >= 0.99
    # ... and nothing farther from it than where it falls to half the noise, plus the margin.
    iy, ix = np.nonzero(mask)
    beyond = np.ones(iy.size, dtype=bool)
    for t in (truth, *others):
        level = t.sigma_px * math.sqrt(2.0 * math.log(max(abs(t.peak_sigma) / 0.5, 1.0)))
        reach = max(level, 0.5 * FWHM_PER_SIGMA * t.sigma_px) + MARGIN_PX + 2.0
        beyond &= _distance_to_segment(ix, iy, clip_to_image(t, mask.shape)) > reach
    assert not beyond.any(), (ix[beyond], iy[beyond])


@pytest.mark.parametrize("name", list(SINGLE))
def test_one_streak_is_found_measured_and_masked(name: str) -> None:
    truth = SINGLE[name]
    exposure = noise_exposure(SHAPE, seed=list(SINGLE).index(name))
    model = add_streak(exposure, truth)
    result = find_streaks(exposure, PSF_SIGMA_PX)
    assert len(result.streaks) == 1, result.streaks
    _check(result.streaks[0], truth, model, result.mask)
    assert result.mask.sum() == result.streaks[0].n_pix


def test_two_crossing_streaks_are_found_once_each() -> None:
    exposure = noise_exposure(SHAPE, seed=21)
    truths = [segment(512, 500, 2000, 20.0, 10.0), segment(480, 512, 2000, 100.0, 1.5)]
    models = [add_streak(exposure, t) for t in truths]
    result = find_streaks(exposure, PSF_SIGMA_PX)
    assert len(result.streaks) == 2
    # The brighter first.
    for found, truth, model, other in zip(
        result.streaks, truths, models, truths[::-1], strict=True
    ):
        _check(found, truth, model, result.mask, others=(other,))


def test_masked_columns_no_data_and_edges_neither_make_nor_break_a_streak() -> None:
    exposure = noise_exposure(SHAPE, seed=22)
    truth = segment(512, 512, 2000, 35.0, 1.5)
    model = add_streak(exposure, truth)
    for column in (300, 301, 302, 610, 800):  # bad columns full of garbage
        exposure.mask[:, column] |= np.uint32(MaskBit.BAD)
        exposure.image[:, column] = 1e6
    hole = np.s_[560:700, 600:900]  # the streak crosses it over ~180 px
    exposure.image[hole] = np.nan
    exposure.variance[hole] = np.nan
    exposure.mask[hole] |= np.uint32(MaskBit.NO_DATA)
    for border in (np.s_[:8, :], np.s_[-8:, :], np.s_[:, :8], np.s_[:, -8:]):
        exposure.mask[border] |= np.uint32(MaskBit.EDGE)
        exposure.image[border] = 3e4
    before = [a.copy() for a in (exposure.image, exposure.variance, exposure.mask)]
    result = find_streaks(exposure, PSF_SIGMA_PX)
    assert len(result.streaks) == 1, result.streaks
    _check(result.streaks[0], truth, model, result.mask)
    assert result.streaks[0].mask_bits & int(MaskBit.BAD | MaskBit.NO_DATA | MaskBit.EDGE)
    after = (exposure.image, exposure.variance, exposure.mask)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)  # the input is not modified


def test_a_streak_faint_in_places_is_one_streak() -> None:
    exposure = noise_exposure(SHAPE, seed=23)
    truth = segment(512, 512, 900, -25.0, 2.0)
    model = add_streak(exposure, truth)
    model += add_streak(exposure, segment(512, 512, 250, -25.0, -1.8))  # 0.2 sigma there
    result = find_streaks(exposure, PSF_SIGMA_PX)
    assert len(result.streaks) == 1
    found = result.streaks[0]
    assert _end_error(found, clip_to_image(truth, SHAPE)) <= 3.0
    assert result.mask[model > 0.5 * NOISE_E].mean() >= 0.99


def test_a_negative_streak_is_found_unless_asked_not_to() -> None:
    exposure = noise_exposure(SHAPE, seed=24)
    truth = segment(512, 512, 2000, 66.0, -3.0)
    model = add_streak(exposure, truth)
    result = find_streaks(exposure, PSF_SIGMA_PX)
    assert len(result.streaks) == 1
    _check(result.streaks[0], truth, model, result.mask)
    assert result.streaks[0].flux_per_px < 0
    assert find_streaks(exposure, PSF_SIGMA_PX, negative=False).streaks == ()


def _short(exposure: Exposure) -> None:
    add_streak(exposure, segment(500, 500, 80, 30.0, 5.0))


def _sharp(exposure: Exposure) -> None:
    """A track a pixel wide (a grazing cosmic ray), 8 sigma, 440 px long."""
    for k in range(400):
        exposure.image[round(300 + 0.44 * k), round(300 + 0.9 * k)] += 8 * NOISE_E


def _dashes(exposure: Exposure) -> None:
    """Three 56 px dashes 400 px apart on one line: the signal in a few places."""
    a = math.radians(25.0)
    for k in range(3):
        c = 80 + 400 * k
        add_streak(exposure, segment(c * math.cos(a) + 40, c * math.sin(a) + 200, 56, 25.0, 3.0))


def _wide(exposure: Exposure) -> None:
    add_streak(exposure, segment(512, 512, 2000, 75.0, 0.5, 12.7))  # 30 px FWHM


@pytest.mark.parametrize(
    ("scene", "rule", "relaxed"),
    [
        (_short, "min_length_px", {"min_length_px": 50.0}),
        (_sharp, "min_width_psf", {"min_width_psf": 0.0}),
        (_dashes, "min_fill", {"min_fill": 0.2}),
        (_wide, "max_width_px", {"max_width_px": 40.0}),
    ],
)
def test_each_rule_rejects_what_it_is_for(scene, rule: str, relaxed: dict) -> None:  # type: ignore[no-untyped-def]
    """Each of these is rejected by its rule alone: relaxing it finds one streak."""
    exposure = noise_exposure(SHAPE, seed=40)
    scene(exposure)
    strict = {"max_width_px": 20.0} if rule == "max_width_px" else {}
    assert find_streaks(exposure, PSF_SIGMA_PX, **strict).streaks == ()
    assert len(find_streaks(exposure, PSF_SIGMA_PX, **relaxed).streaks) == 1


def _bleed_scene(saturated: bool) -> Exposure:
    """A residual beside a bleed trail: a column of saturated (masked) pixels, dilated as
    subtraction dilates them, with a PSF-wide 4 sigma ridge along its side."""
    exposure = noise_exposure(SHAPE, seed=25)
    add_streak(exposure, TruthStreak(508.0, 250.0, 508.0, 750.0, 4.0))
    if saturated:
        exposure.mask[250:750, 494:507] |= np.uint32(MaskBit.SAT)
        exposure.image[250:750, 494:507] = 5e5
    return exposure


def test_a_bleed_residual_is_not_a_streak() -> None:
    assert find_streaks(_bleed_scene(saturated=True), PSF_SIGMA_PX).streaks == ()
    # The same ridge away from saturated pixels is a streak: the bleed rule rejected it.
    assert len(find_streaks(_bleed_scene(saturated=False), PSF_SIGMA_PX).streaks) == 1


def test_look_alikes_are_not_streaks_and_a_streak_among_them_is() -> None:
    shape = (2048, 2048)
    rng = np.random.default_rng(5)
    exposure = noise_exposure(shape, seed=3)
    truth = TruthStreak(100.0, 1900.0, 1900.0, 1300.0, 1.5)
    model = add_streak(exposure, truth)
    xy = lambda: rng.uniform(40.0, 2008.0, 2)  # noqa: E731
    for _ in range(60):  # stars that did not subtract (variables, transients)
        add_point_source(exposure, *xy(), 10 ** rng.uniform(3.5, 6.5))
    for _ in range(15):  # bright stars misregistered by 0.2-1.5 px
        add_dipole(
            exposure, *xy(), 10 ** rng.uniform(5.0, 6.5), rng.uniform(0.2, 1.5), rng.uniform(0, 180)
        )
    for _ in range(6):  # bright stars with mismatched PSF shapes
        add_four_lobes(exposure, *xy(), 10 ** rng.uniform(5.0, 6.5), 1.1)
    for _ in range(40):  # unmasked cosmic rays, up to 60 px long
        add_cosmic_ray(
            exposure, *xy(), rng.uniform(3, 60), rng.uniform(0, 180), 10 ** rng.uniform(3, 4.5)
        )
    # A saturated star's bleed trail, masked and dilated, with ridges on both sides.
    exposure.mask[450:950, 1494:1507] |= np.uint32(MaskBit.SAT)
    for x in (1492.0, 1508.5):
        add_streak(exposure, TruthStreak(x, 450.0, x, 950.0, 4.0))
    exposure.image[450:950, 1494:1507] = 5e5
    result = find_streaks(exposure, PSF_SIGMA_PX)
    assert len(result.streaks) == 1, result.streaks
    found = result.streaks[0]
    assert _end_error(found, clip_to_image(truth, shape)) <= 3.0
    assert result.mask[model > 0.5 * NOISE_E].mean() >= 0.99


def test_through_a_real_subtraction() -> None:
    """A crowded field (200k stars/deg²) subtracted from a warped template: its
    residuals are no streak, and a 1.5 sigma streak added to the science image is."""
    pair = make_pair()
    sub = subtract_images(pair.science, pair.template)
    sigma = sub.psf_fwhm_px / FWHM_PER_SIGMA
    assert find_streaks(sub.difference, sigma).streaks == ()
    noise = float(np.sqrt(np.median(sub.difference.variance)))
    science = dataclasses.replace(pair.science, image=pair.science.image.copy())
    truth = segment(256, 256, 1000, 33.0, 1.5 * noise / NOISE_E, sigma)  # NOISE_E units
    model = add_streak(science, truth)
    sub = subtract_images(science, pair.template)
    result = find_streaks(sub.difference, sub.psf_fwhm_px / FWHM_PER_SIGMA)
    assert len(result.streaks) == 1
    found = result.streaks[0]
    assert _end_error(found, clip_to_image(truth, model.shape)) <= 3.0
    assert _angle_error(found.angle_deg, truth.angle_deg) <= 0.5
    assert result.mask[model > 0.5 * noise].mean() >= 0.99


@pytest.mark.parametrize("seed", [100, 101, 102])
def test_noise_alone_has_no_streaks(seed: int) -> None:
    result = find_streaks(noise_exposure((2048, 2048), seed=seed), PSF_SIGMA_PX)
    assert result.streaks == ()
    assert not result.mask.any()


def test_empty_and_tiny_images() -> None:
    nothing = noise_exposure((300, 300), seed=1)
    nothing.image[:] = np.nan
    assert find_streaks(nothing, PSF_SIGMA_PX).streaks == ()
    tiny = noise_exposure((40, 60), seed=2)
    add_streak(tiny, segment(30, 20, 100, 10.0, 20.0))
    assert find_streaks(tiny, PSF_SIGMA_PX).streaks == ()  # shorter than min_length_px
    with pytest.raises(ValueError):
        find_streaks(tiny, 0.0)


def _near(table: pa.Table, ends: np.ndarray, reach: float) -> np.ndarray:
    x = table["x"].to_numpy(zero_copy_only=False)
    y = table["y"].to_numpy(zero_copy_only=False)
    return _distance_to_segment(x, y, ends) <= reach


def test_dia_fragments_become_one_trailed_source_per_streak() -> None:
    exposure = noise_exposure(SHAPE, seed=31)
    truths = [segment(512, 300, 2000, 12.0, 1.5), segment(512, 600, 2000, -40.0, 3.0)]
    for truth in truths:
        add_streak(exposure, truth)
    stars = [(200.0, 800.0), (800.0, 850.0), (100.0, 100.0)]
    for x, y in stars:
        add_point_source(exposure, x, y, 20_000.0)
    dia = detect_dia_sources(exposure, PSF_SIGMA_PX)
    ends = [clip_to_image(t, SHAPE) for t in truths]
    # What this is about: the faint streak in pieces, the bright one a single long
    # detection (its S/N ridge is unbroken).
    fragments = [int(_near(dia, e, 4.0).sum()) for e in ends]
    assert fragments[0] >= 10 and fragments[1] >= 1, fragments
    result = find_streaks(exposure, PSF_SIGMA_PX)
    assert len(result.streaks) == 2

    table = replace_streak_fragments(dia, result)
    assert table.schema == dia.schema
    assert table.schema.metadata[SNR_SCALE_KEY] == dia.schema.metadata[SNR_SCALE_KEY]
    np.testing.assert_array_equal(table["diaSourceIndex"].to_numpy(), np.arange(table.num_rows))
    y = table["y"].to_numpy()
    assert np.all(np.diff(y) >= 0)
    trailed = table["isTrailed"].to_numpy(zero_copy_only=False)
    for truth, e in zip(truths, ends, strict=True):
        on = _near(table, e, 4.0)
        assert on.sum() == 1 and trailed[on].all()
        row = {k: v[0] for k, v in table.filter(pa.array(on)).to_pydict().items()}
        found = next(s for s in result.streaks if _end_error(s, e) <= 3.0)
        assert row["trailLength"] == pytest.approx(found.length_px)
        assert _angle_error(row["trailAngle"], truth.angle_deg) <= 0.5
        assert row["psfFlux"] == pytest.approx(truth.flux_per_px * found.length_px, rel=0.05)
        assert row["snr"] == pytest.approx(row["psfFlux"] / row["psfFluxErr"])
        assert row["flags"] & FLAG_EDGE  # runs off the image: its length is a lower bound
        assert not row["isNegative"] and not row["isDipole"]
        assert row["nPix"] == found.n_pix
    for x, y0 in stars:  # the stars are kept
        assert (np.hypot(table["x"].to_numpy() - x, y - y0) < 1.0).sum() == 1
    ix = np.rint(dia["x"].to_numpy()).astype(int)
    iy = np.rint(dia["y"].to_numpy()).astype(int)
    assert table.num_rows == int((~result.mask[iy, ix]).sum()) + 2

    masked_only = replace_streak_fragments(dia, result, trailed="none")
    for e in ends:
        assert not _near(masked_only, e, 4.0).any()
    assert masked_only.num_rows == table.num_rows - 2


def test_streak_dia_rows_columns() -> None:
    exposure = noise_exposure(SHAPE, seed=32)
    add_streak(exposure, segment(500, 520, 600, -45.0, -3.0))
    result = find_streaks(exposure, PSF_SIGMA_PX)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [512.0, 512.0]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    rows = streak_dia_rows(result, wcs=wcs)
    assert rows.schema == DIA_SOURCE_SCHEMA and rows.num_rows == 1
    row = {k: v[0] for k, v in rows.to_pydict().items()}
    streak = result.streaks[0]
    assert (row["x"], row["y"]) == pytest.approx(streak.center)
    assert row["isNegative"] and row["isTrailed"] and row["psfFlux"] < 0
    assert not row["flags"] & FLAG_EDGE  # both ends inside
    assert math.isfinite(row["ra"]) and math.isfinite(row["dec"])
    assert math.isnan(row["apFlux"]) and math.isnan(row["dipoleLength"])
    # The moments of the trail: L²/12 + sigma² along it, sigma² across, at -45 degrees.
    sigma2 = (streak.width_px / FWHM_PER_SIGMA) ** 2
    along = streak.length_px**2 / 12.0 + sigma2
    assert row["ixx"] + row["iyy"] == pytest.approx(along + sigma2)
    assert row["ixy"] == pytest.approx(-0.5 * (along - sigma2), rel=1e-3)
    assert 0 < row["xErr"] < 1.0 and 0 < row["yErr"] < 1.0
    assert streak_dia_rows(result, trailed="none").num_rows == 0
    assert streak_dia_rows(StreakResult((), np.zeros(SHAPE, dtype=bool))).num_rows == 0
    with pytest.raises(ValueError):
        streak_dia_rows(result, trailed="all")  # type: ignore[arg-type]
    table = result.to_table()
    assert table.num_rows == 1 and table["length_px"][0].as_py() == streak.length_px


def test_streak_mask_bit() -> None:
    bits = [int(b) for b in MaskBit]
    assert MaskBit.STREAK == 64
    assert len(set(bits)) == len(bits) and all(b & (b - 1) == 0 for b in bits)
