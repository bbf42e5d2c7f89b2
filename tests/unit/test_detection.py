"""Background and detection against the simulator's truth.

Completeness is scored on *isolated* stars: truth stars more than 8 px from
the detector edge, with no defect or cosmic ray within 2 FWHM, and no other
star brighter than a quarter of their flux within 3 FWHM (close pairs blend
into one footprint at any threshold; that is deblending's problem, not
detection's).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import sep
from numpy.testing import assert_allclose
from scipy.ndimage import binary_dilation
from scipy.spatial import cKDTree

from ppray.image import Exposure, MaskBit
from ppray.science import detection
from ppray.science.background import estimate_background, subtract_background
from ppray.science.detection import (
    FLAG_BAD,
    FLAG_EDGE,
    FLAG_SATURATED,
    SOURCE_SCHEMA,
    detect_sources,
)
from ppray.science.isr import run_isr

from .simdata import Sim, psf_fwhm_px, simulate


def _process(sim: Sim, segments: dict[str, np.ndarray] | None = None) -> tuple[Exposure, pa.Table]:
    exp = run_isr(sim.raw(segments), sim.calibs, sim.instrument, sim.detector, wcs=sim.wcs)
    background, _ = estimate_background(exp)
    exp = subtract_background(exp, background)
    return exp, detect_sources(exp)


def _isolated(sim: Sim) -> np.ndarray:
    stars = sim.truth.stars
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
    flux = stars["flux_e"].to_numpy()
    fwhm = psf_fwhm_px(sim)
    ny, nx = sim.truth.image_e.shape
    inside = (x > 8) & (x < nx - 9) & (y > 8) & (y < ny - 9)
    tree = cKDTree(np.c_[x, y])
    crowded = np.zeros(len(x), dtype=bool)
    for i, j in tree.query_pairs(3 * fwhm):
        crowded[i] |= flux[j] > 0.25 * flux[i]
        crowded[j] |= flux[i] > 0.25 * flux[j]
    spoiled = binary_dilation(
        sim.calibs.defects | sim.truth.cosmic_ray_mask, iterations=int(np.ceil(2 * fwhm))
    )
    ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
    return inside & ~crowded & ~spoiled[iy, ix]


def _match(sources: pa.Table, stars: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and index of, the nearest detection of each truth star."""
    tree = cKDTree(np.c_[sources["x"].to_numpy(), sources["y"].to_numpy()])
    dist, index = tree.query(np.c_[stars["x"].to_numpy(), stars["y"].to_numpy()])
    return dist, index


@pytest.fixture(scope="module")
def processed() -> list[tuple[Sim, Exposure, pa.Table]]:
    out = []
    for name in ("R22_S11", "R22_S00"):  # R22_S00 has a bad column
        sim = simulate(name)
        exp, sources = _process(sim)
        out.append((sim, exp, sources))
    return out


def test_background_recovers_the_sky(processed: list[tuple[Sim, Exposure, pa.Table]]) -> None:
    for sim, _, _ in processed:
        exp = run_isr(sim.raw(), sim.calibs, sim.instrument, sim.detector)
        background, stats = estimate_background(exp, box_size=128)
        assert background.shape == exp.shape and background.dtype == np.float32
        sky = sim.truth.sky_e
        assert_allclose(np.median(background), sky, rtol=0.005)
        assert np.abs(background - sky).max() < 0.02 * sky
        assert_allclose(stats["bg_mean"], sky, rtol=0.005)
        assert_allclose(stats["bg_rms"], np.sqrt(sky + 36.0), rtol=0.1)
        assert 0 < stats["bg_masked_fraction"] < 0.01
        sub = subtract_background(exp, background)
        assert sub.image is not exp.image and sub.variance is exp.variance
        assert_allclose(np.median(sub.image), 0.0, atol=0.01 * sky)


def test_background_of_a_fully_masked_exposure() -> None:
    exp = Exposure(
        image=np.full((64, 64), np.nan, dtype=np.float32),
        variance=np.full((64, 64), np.inf, dtype=np.float32),
        mask=np.full((64, 64), MaskBit.NO_DATA, dtype=np.uint32),
    )
    background, stats = estimate_background(exp)
    assert (background == 0).all()
    assert stats == {"bg_mean": 0.0, "bg_rms": 0.0, "bg_masked_fraction": 1.0}
    assert detect_sources(exp).schema.equals(SOURCE_SCHEMA)


def test_detection_completeness_for_snr_20_stars(
    processed: list[tuple[Sim, Exposure, pa.Table]],
) -> None:
    found = total = 0
    for sim, _, sources in processed:
        stars = sim.truth.stars
        target = _isolated(sim) & (stars["snr"].to_numpy() >= 20)
        dist, _ = _match(sources, stars)
        found += int(np.count_nonzero(dist[target] < 1.0))
        total += int(np.count_nonzero(target))
    assert total >= 60  # enough stars for the fraction to mean something
    assert found / total >= 0.95, (found, total)


def test_positions_fluxes_and_sky_coordinates_are_unbiased(
    processed: list[tuple[Sim, Exposure, pa.Table]],
) -> None:
    ratios, dxs, dys, dsky = [], [], [], []
    for sim, _, sources in processed:
        stars = sim.truth.stars
        bright = _isolated(sim) & (stars["snr"].to_numpy() >= 50) & ~stars["saturated"].to_numpy()
        dist, index = _match(sources, stars)
        sel = bright & (dist < 1.0)
        src = sources.take(pa.array(index[sel]))
        assert ((src["flags"].to_numpy() & (FLAG_SATURATED | FLAG_EDGE)) == 0).all()
        x, y = stars["x"].to_numpy()[sel], stars["y"].to_numpy()[sel]
        # The truth's own aperture flux: the same aperture on the noiseless star light.
        light = (sim.truth.image_e - np.float32(sim.truth.sky_e)).astype(np.float32)
        truth_flux, _, _ = sep.sum_circle(light, x, y, 6.0, subpix=5)
        ratios.append(src["flux"].to_numpy() / truth_flux)
        dxs.append(src["x"].to_numpy() - x)
        dys.append(src["y"].to_numpy() - y)
        cos_dec = np.cos(np.radians(stars["dec"].to_numpy()[sel]))
        dsky.append(
            3600
            * np.hypot(
                (src["ra"].to_numpy() - stars["ra"].to_numpy()[sel]) * cos_dec,
                src["dec"].to_numpy() - stars["dec"].to_numpy()[sel],
            )
        )
        snr = src["snr"].to_numpy()
        assert_allclose(snr, src["flux"].to_numpy() / src["flux_err"].to_numpy())
    ratio, dx, dy = np.concatenate(ratios), np.concatenate(dxs), np.concatenate(dys)
    assert len(ratio) >= 30
    assert_allclose(np.median(ratio), 1.0, atol=0.02)
    assert abs(np.median(dx)) < 0.03 and abs(np.median(dy)) < 0.03
    assert np.sqrt(np.mean(dx**2 + dy**2)) < 0.15
    # 0.2"/px: sky positions as good as pixel positions.
    assert np.median(np.concatenate(dsky)) < 0.03


def test_flux_errors_match_the_scatter(processed: list[tuple[Sim, Exposure, pa.Table]]) -> None:
    pulls = []
    for sim, _, sources in processed:
        stars = sim.truth.stars
        sel_truth = _isolated(sim) & (stars["snr"].to_numpy() >= 20)
        sel_truth &= ~stars["saturated"].to_numpy()
        dist, index = _match(sources, stars)
        sel = sel_truth & (dist < 1.0)
        src = sources.take(pa.array(index[sel]))
        light = (sim.truth.image_e - np.float32(sim.truth.sky_e)).astype(np.float32)
        truth_flux, _, _ = sep.sum_circle(
            light, src["x"].to_numpy(), src["y"].to_numpy(), 6.0, subpix=5
        )
        pulls.append((src["flux"].to_numpy() - truth_flux) / src["flux_err"].to_numpy())
    pull = np.concatenate(pulls)
    # Robust width (background-estimate errors add a little to the per-source error).
    width = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert 0.7 < width < 1.4, width


def test_saturated_star_is_found_once_and_flagged() -> None:
    sim = simulate(bright_star_at=(300.4, 140.6, 12.0))
    exp, sources = _process(sim)
    x, y = sources["x"].to_numpy(), sources["y"].to_numpy()
    near = np.hypot(x - 300.4, y - 140.6)
    hit = np.flatnonzero(near < 2.0)
    assert len(hit) == 1
    flags = sources["flags"].to_numpy()
    assert flags[hit[0]] & FLAG_SATURATED
    # Its wings are not shredded into many spurious detections.
    assert np.count_nonzero(near < 15.0) <= 3
    # Only sources touching SAT pixels carry the flag.
    sat = (exp.mask & MaskBit.SAT) != 0
    flagged = np.flatnonzero(flags & FLAG_SATURATED)
    for i in flagged:
        iy, ix = round(y[i]), round(x[i])
        assert sat[max(iy - 30, 0) : iy + 31, max(ix - 30, 0) : ix + 31].any()


def test_extraction_grows_a_too_small_pixel_stack() -> None:
    sim = simulate(bright_star_at=(300.4, 140.6, 12.0))
    exp, sources = _process(sim)
    data = np.ascontiguousarray(exp.image)
    untrusted = (exp.mask & np.uint32(MaskBit.BAD | MaskBit.NO_DATA)) != 0
    before = sep.get_extract_pixstack()
    try:
        sep.set_extract_pixstack(10)  # far less than the saturated star's footprint
        objects, _ = detection._extract(data, np.sqrt(exp.variance), untrusted, 5.0, 5)
        assert sep.get_extract_pixstack() > 10
    finally:
        sep.set_extract_pixstack(before)
    assert len(objects) == sources.num_rows


def test_all_nan_amplifier_does_not_stop_detection() -> None:
    sim = simulate()
    segments = dict(sim.segments, C01=np.full_like(sim.segments["C01"], np.nan))
    exp, sources = _process(sim, segments)
    amp = next(a for a in sim.detector.amplifiers if a.name == "C01")
    assert ((exp.mask[amp.slices] & MaskBit.NO_DATA) != 0).all()
    assert (exp.image[amp.slices] == 0).all()
    x, y = sources["x"].to_numpy(), sources["y"].to_numpy()
    in_amp = (x > amp.x0 + 2) & (x < amp.x0 + amp.nx) & (y >= amp.y0) & (y < amp.y0 + amp.ny - 2)
    assert not in_amp.any()
    # Sources elsewhere are still found, and those touching the dead amp say so.
    stars = sim.truth.stars
    sx, sy = stars["x"].to_numpy(), stars["y"].to_numpy()
    elsewhere = (
        _isolated(sim)
        & (stars["snr"].to_numpy() >= 20)
        & ~((sx > amp.x0 - 10) & (sy < amp.y0 + amp.ny + 10))
    )
    dist, _ = _match(sources, stars)
    assert np.count_nonzero(elsewhere) >= 15
    assert np.mean(dist[elsewhere] < 1.0) >= 0.95
    touching = (x > amp.x0 - 4) & (x < amp.x0) & (y < amp.y0 + amp.ny - 10)
    flags = sources["flags"].to_numpy()
    assert ((flags[touching] & FLAG_BAD) != 0).all()
    assert np.isfinite(sources["flux"].to_numpy()).all()


def test_empty_sky_gives_an_empty_table_with_the_schema() -> None:
    sim = simulate(empty_sky=True, cosmic_rays=0)
    _, sources = _process(sim)
    assert sources.num_rows == 0
    assert sources.schema.equals(SOURCE_SCHEMA)
    assert sources.column_names[:3] == ["id", "x", "y"]


def test_table_schema_ids_and_wcs_columns(
    processed: list[tuple[Sim, Exposure, pa.Table]],
) -> None:
    _, exp, sources = processed[0]
    assert sources.schema.equals(SOURCE_SCHEMA)
    assert sources.num_rows > 50
    assert (sources["id"].to_numpy() == np.arange(sources.num_rows)).all()
    assert np.isfinite(sources["ra"].to_numpy()).all()
    no_wcs = Exposure(exp.image, exp.variance, exp.mask, wcs=None)
    bare = detect_sources(no_wcs)
    assert bare.num_rows == sources.num_rows
    assert np.isnan(bare["ra"].to_numpy()).all() and np.isnan(bare["dec"].to_numpy()).all()
    # Only sources near the border carry FLAG_EDGE.
    x, y = sources["x"].to_numpy(), sources["y"].to_numpy()
    interior = (x > 20) & (x < 490) & (y > 20) & (y < 490)
    assert interior.sum() > 40
    assert not (sources["flags"].to_numpy()[interior] & FLAG_EDGE).any()
    assert (sources["flags"].to_numpy()[~interior] & FLAG_EDGE).any()


def test_bad_parameters_are_rejected(processed: list[tuple[Sim, Exposure, pa.Table]]) -> None:
    _, exp, _ = processed[0]
    with pytest.raises(ValueError, match="threshold_sigma"):
        detect_sources(exp, threshold_sigma=0.0)
    with pytest.raises(ValueError, match="min_area"):
        detect_sources(exp, min_area=0)


def test_completeness_counts_every_bright_star_in_a_dense_field() -> None:
    """No isolation cut: every S/N >= 20 star off the edge and off defects, at 400k stars/deg².

    With sep's cleaning on, this field gives 90%: cleaning deletes faint real sources
    beside bright ones.
    """
    found = total = 0
    for name in ("R22_S00", "R22_S01", "R22_S10", "R22_S11"):
        sim = simulate(name, density=400_000.0)
        _, sources = _process(sim)
        stars = sim.truth.stars
        x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
        ny, nx = sim.truth.image_e.shape
        spoiled = binary_dilation(sim.calibs.defects | sim.truth.cosmic_ray_mask, iterations=2)
        ix = np.clip(np.rint(x).astype(int), 0, nx - 1)
        iy = np.clip(np.rint(y).astype(int), 0, ny - 1)
        inside = (x > 3) & (x < nx - 4) & (y > 3) & (y < ny - 4) & ~spoiled[iy, ix]
        target = inside & (stars["snr"].to_numpy() >= 20)
        dist, _ = _match(sources, stars)
        found += int(np.count_nonzero(dist[target] < 1.0))
        total += int(np.count_nonzero(target))
    assert total >= 300
    assert found / total >= 0.95, (found, total)
