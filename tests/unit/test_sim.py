"""The simulator: sky catalog, calibrations and raw rendering against their own models."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ppray.instrument import detector_wcs, load_instrument
from ppray.sim.render import (
    SimulatedObservation,
    fwhm_to_sigma,
    make_calibrations,
    render_detector,
)
from ppray.sim.sky import catalog_mag, make_star_catalog

from .simdata import BORESIGHT, OBS, simulate, sky_catalog, star_at

SYN = load_instrument("synthetic")


def _angular_distance_deg(ra1: np.ndarray, dec1: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    r1, d1, r0, d0 = (np.radians(v) for v in (ra1, dec1, ra0, dec0))
    cos_d = np.sin(d1) * np.sin(d0) + np.cos(d1) * np.cos(d0) * np.cos(r1 - r0)
    return np.degrees(np.arccos(np.clip(cos_d, -1, 1)))


# --- sky ---------------------------------------------------------------------------


def test_catalog_is_deterministic_per_seed() -> None:
    a = make_star_catalog(10.0, -30.0, 0.2, seed=0)
    b = make_star_catalog(10.0, -30.0, 0.2, seed=0)
    c = make_star_catalog(10.0, -30.0, 0.2, seed=1)
    assert a.equals(b)
    assert not a.equals(c)


def test_catalog_density_area_and_ranges() -> None:
    ra0, dec0, radius, density = 359.9, 60.0, 0.5, 20_000.0
    cat = make_star_catalog(ra0, dec0, radius, density_per_deg2=density, seed=0)
    area = 2 * math.pi * (1 - math.cos(math.radians(radius))) * (180 / math.pi) ** 2
    expected = density * area
    assert abs(cat.num_rows - expected) < 5 * math.sqrt(expected)
    assert cat.column_names == ["id", "ra", "dec", "mag", "mag_g", "mag_r", "mag_i", "size_arcsec"]
    assert_array_equal(cat["id"].to_numpy(), np.arange(cat.num_rows))
    ra, dec = cat["ra"].to_numpy(), cat["dec"].to_numpy()
    assert ((ra >= 0) & (ra < 360)).all()  # wraps through ra = 0
    dist = _angular_distance_deg(ra, dec, ra0, dec0)
    assert dist.max() <= radius + 1e-9
    # Uniform on the sphere: half the stars lie within radius / sqrt(2) (to 3 sigma).
    inner = np.count_nonzero(dist < radius / math.sqrt(2)) / cat.num_rows
    assert abs(inner - 0.5) < 3 * 0.5 / math.sqrt(cat.num_rows)
    mag = cat["mag"].to_numpy()
    assert mag.min() >= 16.0 and mag.max() <= 24.0
    assert_array_equal(cat["mag_r"].to_numpy(), mag)
    assert (cat["size_arcsec"].to_numpy() == 0).all()


def test_catalog_number_counts_follow_the_power_law() -> None:
    cat = make_star_catalog(0.0, 0.0, 1.0, density_per_deg2=50_000, slope=0.3, seed=0)
    mag = cat["mag"].to_numpy()
    bright = np.count_nonzero((mag >= 17) & (mag < 19))
    faint = np.count_nonzero((mag >= 22) & (mag < 24))
    # dN/dm ∝ 10**(0.3 m): two-magnitude bins 5 mag apart differ by 10**1.5.
    ratio = faint / bright
    sigma = ratio * math.sqrt(1 / faint + 1 / bright)
    assert abs(ratio - 10**1.5) < 4 * sigma


def test_catalog_bands_and_galaxies() -> None:
    stars = make_star_catalog(50.0, 10.0, 0.1, density_per_deg2=50_000, seed=3)
    both = make_star_catalog(50.0, 10.0, 0.1, density_per_deg2=50_000, seed=3, galaxies=True)
    assert both.num_rows > stars.num_rows
    size = both["size_arcsec"].to_numpy()
    assert (size[: stars.num_rows] == 0).all() and (size[stars.num_rows :] > 0).all()
    g_r = catalog_mag(stars, "g") - catalog_mag(stars, "r")
    assert (g_r > 0.1).all() and (g_r < 1.5).all()
    assert_array_equal(catalog_mag(stars, "z"), stars["mag"].to_numpy())  # no z column


# --- calibrations ------------------------------------------------------------------


def test_calibrations_are_deterministic_and_differ_between_detectors() -> None:
    d0, d1 = SYN.detector("R22_S00"), SYN.detector("R22_S01")
    a, b = make_calibrations(SYN, d0, seed=0), make_calibrations(SYN, d0, seed=0)
    for plane in ("bias", "dark", "flat", "defects"):
        assert_array_equal(getattr(a, plane), getattr(b, plane))
    c = make_calibrations(SYN, d1, seed=0)
    assert not np.array_equal(a.flat, c.flat)
    assert not np.array_equal(a.defects, c.defects)


@pytest.mark.parametrize("name", ["R22_S00", "R22_S11"])
def test_calibration_properties(name: str) -> None:
    det = SYN.detector(name)
    cal = make_calibrations(SYN, det, seed=0)
    shape = (SYN.layout.ny, SYN.layout.nx)
    assert cal.shape == shape
    assert cal.bias.dtype == cal.dark.dtype == cal.flat.dtype == np.float32
    good = ~cal.defects
    assert_allclose(cal.flat[good].mean(dtype=np.float64), 1.0, rtol=1e-5)
    # Smooth pattern within ±5% (plus 0.5% pixel response), dead pixels near zero.
    assert np.percentile(cal.flat[good], 0.1) > 0.9
    assert np.percentile(cal.flat[good], 99.9) < 1.1
    assert cal.flat[good].std() > 0.004
    assert np.abs(cal.bias).max() < 15.0
    assert_allclose(np.median(cal.dark), SYN.layout.dark_current_e_per_s, rtol=0.02)
    hot = cal.dark > 1.0
    dead = cal.flat < 0.1
    assert hot.sum() >= 3 and dead.sum() >= 3
    assert cal.defects[hot].all() and cal.defects[dead].all()
    bad_columns = np.flatnonzero(cal.defects.sum(axis=0) > SYN.layout.ny // 4)
    assert len(bad_columns) == (1 if det.id % 2 == 0 else 0)


# --- rendering ---------------------------------------------------------------------


def test_render_is_deterministic_per_seed() -> None:
    a, b = simulate(seed=0), simulate(seed=1)
    inst, det = a.instrument, a.detector
    again, _ = render_detector(
        sky_catalog(), inst, det, a.wcs, a.obs, a.calibs, seed=0, cosmic_rays=20
    )
    for amp in det.amplifiers:
        assert_array_equal(again[amp.name], a.segments[amp.name])
        assert not np.array_equal(a.segments[amp.name], b.segments[amp.name])
    assert_array_equal(a.truth.image_e, b.truth.image_e)  # same sky, different noise


def test_raw_layout_bias_overscan_and_read_noise() -> None:
    sim = simulate(seed=0)
    layout = SYN.layout
    pre, nx, ny = layout.serial_prescan, layout.amp_nx, layout.amp_ny
    rn_adu = layout.read_noise_e / layout.gain_e_per_adu
    sky_adu = sim.truth.sky_e / layout.gain_e_per_adu
    for amp in sim.detector.amplifiers:
        seg = sim.segments[amp.name]
        assert seg.shape == layout.raw_amp_shape and seg.dtype == np.float32
        assert_array_equal(seg, np.rint(seg))  # integer ADU
        overscan = seg[:ny, pre + nx + 2 :]
        prescan = seg[:ny, :pre]
        parallel = seg[ny:, pre : pre + nx]
        data = seg[:ny, pre : pre + nx]
        # Bias level plus a drift of a few ADU; read noise only, no signal.
        for region in (overscan, prescan, parallel):
            assert abs(np.median(region) - amp.bias_level_adu) < 15
        row_level = np.median(overscan, axis=1)
        assert_allclose(np.std(overscan - row_level[:, None]), rn_adu, rtol=0.1)
        # The drift is really there (else the overscan test in test_isr proves nothing).
        assert np.ptp(row_level) > 2.0
        assert_allclose(np.median(data) - np.median(overscan), sky_adu, rtol=0.05)


def test_truth_image_flux_and_centroid_of_one_star() -> None:
    inst = SYN
    det = inst.detector("R22_S11")
    wcs = detector_wcs(inst, det, *BORESIGHT)
    cal = make_calibrations(inst, det, seed=0)
    x0, y0, mag = 200.37, 301.81, 19.0
    cat = star_at(wcs, x0, y0, mag)
    _, truth = render_detector(cat, inst, det, wcs, OBS, cal, seed=0, cosmic_rays=0)
    stars = truth.stars
    assert stars.num_rows == 1
    flux = 10 ** (-0.4 * (mag - OBS.zero_point_mag)) * OBS.exptime_s
    assert_allclose(stars["flux_e"][0].as_py(), flux, rtol=1e-12)
    assert_allclose([stars["x"][0].as_py(), stars["y"][0].as_py()], [x0, y0], atol=1e-6)
    star = truth.image_e.astype(np.float64) - truth.sky_e
    assert_allclose(star.sum(), flux, rtol=1e-4)  # pixel-integrated: no flux lost
    yy, xx = np.indices(star.shape)
    # Pixel integration keeps the centroid unbiased.
    assert_allclose((star * xx).sum() / star.sum(), x0, atol=2e-3)
    assert_allclose((star * yy).sum() / star.sum(), y0, atol=2e-3)
    sigma = fwhm_to_sigma(OBS.seeing_fwhm_arcsec, inst.pixel_scale_arcsec)
    var_x = (star * (xx - x0) ** 2).sum() / star.sum()
    assert_allclose(var_x, sigma**2 + 1 / 12, rtol=0.01)  # Gaussian ⊗ pixel box
    assert_allclose(truth.psf_sigma_px, sigma)


@pytest.mark.parametrize("mag", [19.0, 24.0])
def test_truth_snr_is_the_psf_optimal_snr(mag: float) -> None:
    inst = SYN
    det = inst.detector("R22_S11")
    wcs = detector_wcs(inst, det, *BORESIGHT)
    cal = make_calibrations(inst, det, seed=0)
    _, truth = render_detector(
        star_at(wcs, 250.5, 250.5, mag), inst, det, wcs, OBS, cal, seed=0, cosmic_rays=0
    )
    flux = truth.stars["flux_e"][0].as_py()
    sigma = truth.psf_sigma_px
    noise = truth.sky_e + np.mean(cal.dark) * OBS.exptime_s + inst.layout.read_noise_e**2
    # Continuous-Gaussian limits: background-limited F / sqrt(4 pi s^2 B), source-limited
    # sqrt(F); S/N^-2 adds the two, roughly.
    snr_bg = flux / math.sqrt(4 * math.pi * sigma**2 * noise)
    approx = 1 / math.sqrt(1 / snr_bg**2 + 1 / flux)
    assert_allclose(truth.stars["snr"][0].as_py(), approx, rtol=0.1)


def test_off_chip_stars_are_skipped_and_edge_stars_kept() -> None:
    inst = SYN
    det = inst.detector("R22_S11")
    wcs = detector_wcs(inst, det, *BORESIGHT)
    cal = make_calibrations(inst, det, seed=0)
    far = star_at(wcs, -300.0, 200.0, 18.0, star_id=1)
    edge = star_at(wcs, -2.0, 200.0, 18.0, star_id=2)  # centre off chip, wing on it
    cat = pa.concat_tables([far, edge])
    _, truth = render_detector(cat, inst, det, wcs, OBS, cal, seed=0, cosmic_rays=0)
    assert truth.stars.num_rows == 0
    light = truth.image_e - np.float32(truth.sky_e)
    assert light[:, :3].sum() > 100  # the edge star's wing
    assert np.abs(light[:, 20:]).max() < 1e-3


def test_saturation_cosmic_rays_and_dead_pixels() -> None:
    sim = simulate(seed=0, bright_star_at=(300.4, 140.6, 12.0))
    layout = SYN.layout
    sat_adu = layout.saturation_adu
    amp = next(a for a in sim.detector.amplifiers if a.name == "C01")
    seg = sim.segments["C01"]
    assert seg.max() == sat_adu
    assert sim.truth.saturated[140, 300]
    bright = sim.truth.stars.filter(pa.compute.equal(sim.truth.stars["id"], 10_000_000))
    assert bright["saturated"][0].as_py() and bright["snr"][0].as_py() > 1000
    n_sat = int(sim.truth.saturated.sum())
    assert 10 < n_sat < 2000
    # Cosmic rays: short tracks of a few pixels each, far above the sky.
    cr = sim.truth.cosmic_ray_mask
    assert 20 <= cr.sum() <= 20 * 12
    pre = layout.serial_prescan
    data = {a.name: sim.segments[a.name][: a.ny, pre : pre + a.nx] for a in sim.detector.amplifiers}
    assembled = np.zeros(cr.shape, dtype=np.float32)
    for a in sim.detector.amplifiers:
        assembled[a.slices] = data[a.name] - a.bias_level_adu
    sky_adu = sim.truth.sky_e / amp.gain_e_per_adu
    assert np.median(assembled[cr]) > sky_adu + 300
    # Dead pixels (flat 0.02) collect almost nothing.
    dead = sim.calibs.flat < 0.1
    assert np.median(assembled[dead]) < 0.2 * sky_adu


def test_observation_validates() -> None:
    with pytest.raises(ValueError, match="exptime_s"):
        SimulatedObservation(exptime_s=0.0)
    with pytest.raises(ValueError, match="seeing"):
        SimulatedObservation(seeing_fwhm_arcsec=-1.0)


def test_play_paces_the_timeline(tmp_path: object) -> None:
    """``play`` yields the timeline's messages, each no earlier than it is due."""
    import time

    from ppray.config import load_config
    from ppray.sim.observatory import SimulatedObservatory

    obs = SimulatedObservatory(load_config(env={}).rooted_at(str(tmp_path)), start_time=0.0)
    scale = 0.002  # 35 s between visits -> 70 ms
    start = time.monotonic()
    played = []
    for msg in obs.play(2, time_scale=scale):
        played.append((msg, time.monotonic() - start))

    def key(m: object) -> tuple[object, ...]:  # private_sndStamp is "now" at each call
        return (m.at_s, m.kind, m.visit.groupId, m.snap)  # type: ignore[attr-defined]

    assert [key(m) for m, _ in played] == [key(m) for m in obs.timeline(2)]
    assert all(elapsed >= m.at_s * scale - 1e-3 for m, elapsed in played)
