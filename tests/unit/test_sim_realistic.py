"""The realistic sky: blends, galaxies, trails, bleeding stars, truth, determinism.

Small synthetic detectors (512 x 512). The pipeline on full LSSTCam CCDs of this
sky, against its truth: ``test_realistic_sky.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from numpy.testing import assert_array_equal

from ppray.config import RealisticSkyConfig, load_config
from ppray.instrument import detector_wcs, load_instrument
from ppray.layout import (
    bleed_truth_key,
    psf_truth_key,
    streaks_truth_key,
    template_psf_truth_key,
    truth_key,
)
from ppray.refcat import RefcatStore
from ppray.sim.artifacts import Streak, bleed_columns, bleed_mask_from_runs
from ppray.sim.mixture import profile_mixture
from ppray.sim.observatory import SimulatedObservatory
from ppray.sim.psf import PsfField
from ppray.sim.realistic import REALISTIC_TRUTH_COLUMNS, render_objects, render_realistic
from ppray.sim.realsky import make_realistic_catalog
from ppray.sim.render import SimulatedObservation, make_calibrations
from ppray.sim.sky import make_star_catalog
from ppray.templates import TemplateStore, Tiling

SYN = load_instrument("synthetic")
DET = SYN.detector("R22_S11")
SHAPE = (SYN.layout.ny, SYN.layout.nx)
WCS0 = detector_wcs(SYN, DET, 150.0, 2.2, 0.0)
CALIBS = make_calibrations(SYN, DET, seed=0)
OBS = SimulatedObservation(exptime_s=30.0, seeing_fwhm_arcsec=0.8, sky_e_per_px_per_s=30.0)
PSF = PsfField.random(np.random.default_rng(11), SHAPE, 4.0)
NOMINAL_FWHM = 0.9


def _catalog(positions: list[tuple[float, float]], mags: list[float], **columns: list) -> pa.Table:
    n = len(positions)
    xy = np.array(positions, dtype=np.float64).reshape(n, 2)
    ra, dec = WCS0.all_pix2world(xy[:, 0], xy[:, 1], 0)
    data = {
        "id": pa.array(np.arange(n), pa.int64()),
        "ra": pa.array(ra, pa.float64()),
        "dec": pa.array(dec, pa.float64()),
        "mag": pa.array(mags, pa.float64()),
        "size_arcsec": pa.array(np.zeros(n), pa.float64()),
        "kind": pa.array(columns.pop("kind", ["star"] * n), pa.string()),
        "blend_group": pa.array(columns.pop("blend_group", [-1] * n), pa.int64()),
    }
    for name in ("sersic_n", "hlr_arcsec", "ellipticity", "angle_deg"):
        data[name] = pa.array(columns.pop(name, [0.0] * n), pa.float64())
    assert not columns
    return pa.table(data)


def _render(catalog: pa.Table, **kwargs: object) -> tuple[dict[str, np.ndarray], object]:
    options: dict[str, object] = {"seed": 0, "cosmic_rays": 0} | kwargs
    return render_realistic(catalog, SYN, DET, WCS0, OBS, CALIBS, PSF, **options)  # type: ignore[arg-type]


# --- the catalog -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sky() -> pa.Table:
    return make_realistic_catalog(
        150.0,
        2.2,
        0.15,
        RealisticSkyConfig(),
        density_per_deg2=60_000.0,
        nominal_fwhm_arcsec=NOMINAL_FWHM,
        seed=0,
    )


def test_catalog_keeps_the_simple_stars_and_is_deterministic(sky: pa.Table) -> None:
    stars = make_star_catalog(150.0, 2.2, 0.15, density_per_deg2=60_000.0, seed=0)
    head = sky.slice(0, stars.num_rows)
    for name in stars.column_names:
        assert head[name].equals(stars[name]), name
    assert_array_equal(sky["id"].to_numpy(), np.arange(sky.num_rows))
    again = make_realistic_catalog(
        150.0, 2.2, 0.15, RealisticSkyConfig(), density_per_deg2=60_000.0,
        nominal_fwhm_arcsec=NOMINAL_FWHM, seed=0,
    )  # fmt: skip
    assert again.equals(sky)
    other = make_realistic_catalog(
        150.0, 2.2, 0.15, RealisticSkyConfig(), density_per_deg2=60_000.0,
        nominal_fwhm_arcsec=NOMINAL_FWHM, seed=1,
    )  # fmt: skip
    assert not other.equals(sky)


def test_catalog_blends_at_the_asked_separations(sky: pa.Table) -> None:
    group = sky["blend_group"].to_numpy()
    ids = sky["id"].to_numpy()
    companions = np.flatnonzero((group >= 0) & (group != ids))
    primaries = group[companions]
    n_stars = make_star_catalog(150.0, 2.2, 0.15, density_per_deg2=60_000.0, seed=0).num_rows
    frac = primaries.size / n_stars
    assert abs(frac - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n_stars)
    assert_array_equal(group[primaries], primaries)  # both members name the primary
    ra, dec, mag = (sky[c].to_numpy() for c in ("ra", "dec", "mag"))
    dra = (ra[companions] - ra[primaries]) * np.cos(np.radians(dec[primaries]))
    sep = np.hypot(dra, dec[companions] - dec[primaries]) * 3600.0 / NOMINAL_FWHM
    assert sep.min() >= 1.0 - 1e-3 and sep.max() <= 3.0 + 1e-3
    dmag = mag[companions] - mag[primaries]
    assert dmag.min() >= 0.0 and dmag.max() <= 2.0


def test_catalog_bright_stars_and_galaxies(sky: pa.Table) -> None:
    kind = np.array(sky["kind"].to_pylist())
    mag = sky["mag"].to_numpy()
    bright = (kind == "star") & (mag < 13.0)
    area = 2 * math.pi * (1 - math.cos(math.radians(0.15))) * (180 / math.pi) ** 2
    assert abs(bright.sum() - 60 * area) < 5 * math.sqrt(60 * area)
    assert mag[bright].min() >= 10.0
    gal = kind == "galaxy"
    hlr, e = sky["hlr_arcsec"].to_numpy(), sky["ellipticity"].to_numpy()
    sersic = sky["sersic_n"].to_numpy()
    assert hlr[gal].min() >= 0.3 and hlr[gal].max() <= 2.0 and (hlr[~gal] == 0).all()
    assert e[gal].max() < 0.7 and set(np.unique(sersic[gal])) == {1.0, 4.0}
    assert (sersic[~gal] == 0).all()
    assert abs(np.mean(sersic[gal] == 4.0) - 0.3) < 0.05
    # Galaxies are common only among faint objects.
    assert not gal[mag < 18.0].any()
    assert gal[(mag > 18.0) & (mag < 20.0)].mean() < 0.2 < 0.3 < gal[mag > 23.0].mean()


# --- rendering ---------------------------------------------------------------------


def test_rendering_is_deterministic_and_truth_complete() -> None:
    cat = _catalog([(100.3, 120.7), (300.1, 310.9)], [19.0, 20.0])
    segs_a, truth_a = _render(cat, seed=3, cosmic_rays=5)
    segs_b, truth_b = _render(cat, seed=3, cosmic_rays=5)
    segs_c, truth_c = _render(cat, seed=4, cosmic_rays=5)
    for amp in DET.amplifiers:
        assert_array_equal(segs_a[amp.name], segs_b[amp.name])
        assert not np.array_equal(segs_a[amp.name], segs_c[amp.name])
    assert truth_a.stars.equals(truth_b.stars)  # type: ignore[attr-defined]
    assert_array_equal(truth_a.image_e, truth_c.image_e)  # type: ignore[attr-defined]
    stars = truth_a.stars  # type: ignore[attr-defined]
    assert stars.column_names[11:] == list(REALISTIC_TRUTH_COLUMNS)
    assert stars["psf_fwhm_px"].to_pylist() == pytest.approx(
        PSF.fwhm_px(np.array([100.3, 300.1]), np.array([120.7, 310.9])).tolist()
    )
    assert stars["nearest_id"].to_pylist() == [1, 0]
    # image_e is the objects drawn through the PSF, plus the sky.
    image, _ = render_objects(
        cat, WCS0, SHAPE, PSF, band="r", zero_point_mag=28.0, exptime_s=30.0, noise_e2=1.0
    )
    sky_e = truth_a.sky_e  # type: ignore[attr-defined]
    assert np.abs(truth_a.image_e - sky_e - image).max() < 1e-3  # type: ignore[attr-defined]


def test_blended_pairs_are_rendered_with_their_truth() -> None:
    # A primary and a companion 1.5 nominal FWHM away, 1 mag fainter.
    sep_px = 1.5 * NOMINAL_FWHM / SYN.pixel_scale_arcsec
    cat = _catalog(
        [(250.2, 250.4), (250.2 + sep_px * 0.6, 250.4 + sep_px * 0.8)],
        [19.0, 20.0],
        blend_group=[0, 0],
    )
    _, truth = _render(cat)
    stars = truth.stars  # type: ignore[attr-defined]
    assert stars["blend_group"].to_pylist() == [0, 0]
    assert stars["nearest_sep_px"].to_pylist() == pytest.approx([sep_px, sep_px])
    light = truth.image_e - truth.sky_e  # type: ignore[attr-defined]
    # Blended: the light between the two is far above half the companion's peak / 10.
    mid = light[round(250.4 + sep_px * 0.4), round(250.2 + sep_px * 0.3)]
    assert mid > 0.1 * stars["peak_e"][1].as_py()


def test_galaxy_shape_and_flux_through_a_rotated_camera() -> None:
    """An exponential galaxy's moments: its profile's, turned onto the pixels, plus the PSF's."""
    wcs = detector_wcs(SYN, DET, 150.0, 2.2, 25.0)
    hlr, e, pa_deg = 1.5, 0.5, 30.0
    ((ra, dec),) = wcs.all_pix2world([[255.3, 256.6]], 0)
    cat = pa.table(
        {
            "id": [0], "ra": [float(ra)], "dec": [float(dec)], "mag": [18.0],
            "size_arcsec": [0.0], "kind": ["galaxy"], "blend_group": [-1],
            "sersic_n": [1.0], "hlr_arcsec": [hlr], "ellipticity": [e], "angle_deg": [pa_deg],
        }
    )  # fmt: skip
    psf = PsfField.constant(1.0, SHAPE, profile="gaussian")
    image, objects = render_objects(
        cat, wcs, SHAPE, psf, band="r", zero_point_mag=28.0, exptime_s=30.0, noise_e2=900.0
    )
    flux = objects.flux_e[0]
    assert flux * (1 - 1e-3) <= image.sum() <= flux
    yy, xx = np.indices(SHAPE)
    x0, y0 = (image * xx).sum() / flux, (image * yy).sum() / flux
    assert (x0, y0) == pytest.approx((255.3, 256.6), abs=5e-3)
    mxx = (image * (xx - x0) ** 2).sum() / image.sum()
    myy = (image * (yy - y0) ** 2).sum() / image.sum()
    mxy = (image * (xx - x0) * (yy - y0)).sum() / image.sum()
    # Expected: the major axis is where a step along position angle PA lands on the pixels.
    w, s = profile_mixture("exponential")
    var_px = float(np.sum(w * s**2)) * (hlr / SYN.pixel_scale_arcsec) ** 2
    step = 1.0 / 3600.0
    ra2 = ra + step * math.sin(math.radians(pa_deg)) / math.cos(math.radians(dec))
    ((xa, ya),) = wcs.all_world2pix([[ra2, dec + step * math.cos(math.radians(pa_deg))]], 0)
    theta = math.atan2(ya - 256.6, xa - 255.3)
    q = 1 - e
    psf_var = (1.0 / (2 * math.sqrt(2 * math.log(2)))) ** 2 + 1 / 12
    a2, b2 = var_px / q, var_px * q
    c, sn = math.cos(theta), math.sin(theta)
    expected = (
        a2 * c * c + b2 * sn * sn + psf_var,
        (a2 - b2) * c * sn,
        a2 * sn * sn + b2 * c * c + psf_var,
    )
    assert (mxx, mxy, myy) == pytest.approx(expected, rel=0.02, abs=0.02 * var_px)


@pytest.mark.parametrize("steep", [False, True])
def test_streak_is_where_the_truth_says(steep: bool) -> None:
    # From off the detector to a point on it, shallow (walked by columns) or steep (rows).
    ends = (-50.0, 80.0, 400.0, 350.0)
    x0, y0, x1, y1 = (ends[1], ends[0], ends[3], ends[2]) if steep else ends
    streak = Streak(x0=x0, y0=y0, x1=x1, y1=y1, flux_e_per_px=500.0, streak_id=7)
    _, truth = _render(_catalog([], []), streaks=[streak])
    table = truth.streaks  # type: ignore[attr-defined]
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["streak_id"] == 7 and row["ends_on_detector"]
    start = (row["y0"], row["x0"]) if steep else (row["x0"], row["y0"])
    assert start == pytest.approx((-0.5, 80.0 + 49.5 * 270.0 / 450.0))
    assert (row["x1"], row["y1"]) == (x1, y1)
    light = (truth.image_e - truth.sky_e).astype(np.float64)  # type: ignore[attr-defined]
    yy, xx = np.indices(SHAPE)
    # Distance of every pixel to the segment.
    d = np.array([streak.x1 - streak.x0, streak.y1 - streak.y0])
    length = math.hypot(*d)
    t = np.clip(((xx - streak.x0) * d[0] + (yy - streak.y0) * d[1]) / length**2, 0, 1)
    dist = np.hypot(xx - streak.x0 - t * d[0], yy - streak.y0 - t * d[1])
    assert light[dist > 60].max() == 0.0  # nothing far from the trail
    along = t * length
    on_line = (dist < 1) & (along > 60) & (along < length - 20)
    assert light[on_line].min() > 0.5 * row["peak_e"]
    assert light.max() == pytest.approx(row["peak_e"], rel=0.1)
    # Far from its ends, the trail holds flux_e_per_px per pixel of length.
    middle = (along > 100) & (along < 400) & (dist < 60)
    assert light[middle].sum() / 300.0 == pytest.approx(500.0, rel=5e-3)
    # The cross-section's FWHM is the truth's width: the area above half the peak of
    # a strip 20 px long, over 20.
    strip = light[(along > 200) & (along < 220) & (dist < 60)]
    width_est = np.count_nonzero(strip > 0.5 * strip.max()) / 20.0
    assert width_est == pytest.approx(row["width_px"], rel=0.15)


def test_bleed_conserves_charge_along_columns() -> None:
    yy, xx = np.indices((400, 60))
    star = 4e7 * np.exp(-0.5 * ((xx - 30.3) ** 2 + (yy - 200.6) ** 2) / 2.0**2) / (8 * math.pi)
    electrons = (star + 900.0).astype(np.float32)
    total = electrons.sum(dtype=np.float64)
    mask, lost = bleed_columns(electrons, 160_000.0)
    assert lost == 0.0
    assert electrons.sum(dtype=np.float64) == pytest.approx(total, rel=1e-6)
    assert electrons.max() <= 160_000.0
    cols = np.flatnonzero(mask.any(axis=0))
    assert 30 in cols and cols.max() - cols.min() < 10
    rows = np.flatnonzero(mask[:, 30])
    assert rows.min() < 200 - 20 and rows.max() > 200 + 20  # up and down
    assert_array_equal(rows, np.arange(rows.min(), rows.max() + 1))  # one run
    # What reaches the ends of a column is lost, and said so.
    edge = np.full((10, 1), 100.0, dtype=np.float32)
    edge[0, 0] = 5000.0
    _, lost = bleed_columns(edge, 1000.0)
    assert lost == 2000.0  # half went down, off the detector


def test_bright_star_bleeds_in_the_raw() -> None:
    cat = _catalog([(300.4, 250.6)], [10.5])
    segs_bleed, truth = _render(cat)
    segs_plain, plain = _render(cat, bleed=False)
    mask = truth.bleed_mask  # type: ignore[attr-defined]
    assert not plain.bleed_mask.any()  # type: ignore[attr-defined]
    rows = np.flatnonzero(mask[:, 300])
    assert rows.min() < 250 - 30 and rows.max() > 250 + 30
    assert np.ptp(np.flatnonzero(mask.any(axis=0))) < 15
    # The trail saturates the raw, and the raws differ only where charge bled.
    assert truth.saturated[mask].mean() > 0.9  # type: ignore[attr-defined]
    star = truth.stars.to_pylist()[0]  # type: ignore[attr-defined]
    assert star["saturated"] and star["bleeding"]
    for amp in DET.amplifiers:
        pre = SYN.layout.serial_prescan
        data_b = segs_bleed[amp.name][: amp.ny, pre : pre + amp.nx]
        data_p = segs_plain[amp.name][: amp.ny, pre : pre + amp.nx]
        differ = data_b != data_p
        assert not (differ & ~mask[amp.slices]).any()


# --- the observatory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def observatory(tmp_path_factory: pytest.TempPathFactory) -> SimulatedObservatory:
    root = tmp_path_factory.mktemp("realistic")
    base = load_config(env={})
    cfg = base.rooted_at(str(root)).with_overrides(
        detectors=("R22_S11",),
        template_patch_deg=0.05,
        sim={
            **base.sim.model_dump(),
            "catalog_radius_deg": 0.03,
            "sky": "realistic",
            "realistic": {"n_streaks": 2, "streak_flux_e_per_px": (2e4, 3e4)},
        },
    )
    obs = SimulatedObservatory(cfg, start_time=1.7e9)
    obs.write_reference_data()
    obs.expose(obs.visit(0))
    return obs


def test_observatory_writes_the_truth(observatory: SimulatedObservatory) -> None:
    obs = observatory
    visit = obs.visit(0)
    group = visit.groupId
    stars = obs.raw_store.read_parquet(truth_key(group, "R22_S11"))
    assert stars.column_names[11:] == list(REALISTIC_TRUTH_COLUMNS)
    kinds = set(stars["kind"].to_pylist())
    assert {"star", "galaxy"} <= kinds <= {"star", "galaxy", "new", "variable", "moving"}
    psf = PsfField.from_dict(obs.raw_store.read_json(psf_truth_key(group, "R22_S11")))
    assert psf.to_dict() == obs.science_psf(visit, "R22_S11").to_dict()
    trails = obs.raw_store.read_parquet(streaks_truth_key(group, "R22_S11"))
    assert trails.num_rows == 2  # forced, each through a simulated detector
    runs = obs.raw_store.read_parquet(bleed_truth_key(group, "R22_S11"))
    assert runs.schema.names == ["x", "y0", "y1"]
    mask = bleed_mask_from_runs(runs, SHAPE)
    bleeding = stars.filter(stars["bleeding"])
    for x, y in zip(bleeding["x"].to_pylist(), bleeding["y"].to_pylist(), strict=True):
        assert mask[round(y), round(x)]
    # The reference catalog holds the stars, not the galaxies.
    refcat = RefcatStore(obs.config.refcat_root).load_region(
        [(149.9, 2.1), (150.1, 2.1), (150.1, 2.3), (149.9, 2.3)]
    )
    assert refcat is not None and set(refcat["kind"].to_pylist()) == {"star"}


def test_science_and_template_psfs_differ(observatory: SimulatedObservatory) -> None:
    obs = observatory
    visit = obs.visit(0)
    science = obs.science_psf(visit, "R22_S11")
    scale = SYN.pixel_scale_arcsec
    assert science.fwhm_px(*science.center_px) == pytest.approx(obs.seeing_arcsec(visit) / scale)
    yy, xx = np.mgrid[0:512:32, 0:512:32].astype(np.float64)
    assert science.ellipticity(xx, yy).max() > 0.6 * 0.4 - 0.01
    tiling = Tiling(patch_size_deg=0.05)
    patches = TemplateStore(obs.config.template_root, tiling).patches("r")
    assert len(patches) >= 2
    for patch in patches:
        tpsf = PsfField.from_dict(obs.raw_store.read_json(template_psf_truth_key("r", patch.name)))
        assert tpsf.to_dict() == obs.template_psf(patch).to_dict()
        _, shape = tiling.patch_wcs(patch)
        ty, tx = np.mgrid[0 : shape[0] : 100, 0 : shape[1] : 100].astype(np.float64)
        assert (0.6 / scale) * 0.95 < tpsf.fwhm_px(tx, ty).min()
        assert tpsf.fwhm_px(tx, ty).max() < (0.7 / scale) * 1.05
        assert tpsf.ellipticity(tx, ty).max() <= 0.1 + 1e-9
        assert tpsf.to_dict()["g1_coeffs"] != science.to_dict()["g1_coeffs"]
    # Neighbouring patches agree where they overlap: one field over the sky.
    a, b = patches[0], patches[1]
    wa, _ = tiling.patch_wcs(a)
    wb, _ = tiling.patch_wcs(b)
    ra, dec = 0.5 * (np.array(tiling.center(a)) + np.array(tiling.center(b)))
    (xa, ya), (xb, yb) = wa.all_world2pix([[ra, dec]], 0)[0], wb.all_world2pix([[ra, dec]], 0)[0]
    pa_, pb = obs.template_psf(a), obs.template_psf(b)
    assert pa_.fwhm_px(xa, ya) == pytest.approx(pb.fwhm_px(xb, yb), rel=1e-3)
    assert pa_.ellipticity(xa, ya) == pytest.approx(pb.ellipticity(xb, yb), abs=1e-3)


def test_trails_are_in_the_science_only(observatory: SimulatedObservatory) -> None:
    obs = observatory
    visit = obs.visit(0)
    trails = obs.raw_store.read_parquet(streaks_truth_key(visit.groupId, "R22_S11")).to_pylist()
    wcs = obs.true_wcs(visit, "R22_S11")
    store = TemplateStore(obs.config.template_root, Tiling(patch_size_deg=0.05))
    checked = 0
    for trail in trails:
        t = np.linspace(0.2, 0.8, 50)
        x = trail["x0"] + t * (trail["x1"] - trail["x0"])
        y = trail["y0"] + t * (trail["y1"] - trail["y0"])
        ra, dec = wcs.all_pix2world(x, y, 0)
        for patch in store.patches("r"):
            template = store.read(patch, "r")
            px, py = template.wcs.all_world2pix(ra, dec, 0)
            ok = (px > 0) & (px < template.image.shape[1] - 1)
            ok &= (py > 0) & (py < template.image.shape[0] - 1)
            if ok.sum() < 10:
                continue
            values = template.image[np.rint(py[ok]).astype(int), np.rint(px[ok]).astype(int)]
            assert np.median(values) < 0.01 * trail["peak_e"]
            checked += 1
    assert checked >= 1


def test_observatory_draws_are_deterministic_per_seed(
    observatory: SimulatedObservatory, tmp_path: Path
) -> None:
    obs = observatory
    twin = SimulatedObservatory(obs.config.rooted_at(str(tmp_path)), start_time=1.7e9)
    other = SimulatedObservatory(
        obs.config.with_overrides(sim={**obs.sim.model_dump(), "seed": 1}), start_time=1.7e9
    )
    v0, v1 = obs.visit(0), obs.visit(1)
    assert twin.catalog.equals(obs.catalog)
    assert twin.science_psf(v0, "R22_S11").to_dict() == obs.science_psf(v0, "R22_S11").to_dict()
    assert obs.science_psf(v1, "R22_S11").to_dict() != obs.science_psf(v0, "R22_S11").to_dict()
    assert other.science_psf(v0, "R22_S11").to_dict() != obs.science_psf(v0, "R22_S11").to_dict()
    assert twin.sky_streaks(v0, 0).equals(obs.sky_streaks(v0, 0))
    assert not obs.sky_streaks(v0, 1).equals(obs.sky_streaks(v0, 0))  # a trail per snap
    patch = Tiling(patch_size_deg=0.05).patch_of(150.0, 2.2)
    assert twin.template_psf(patch).to_dict() == obs.template_psf(patch).to_dict()
    # The raws of a visit are the same bytes.
    twin.expose(v0)
    for key in obs.raw_keys(v0, 0):
        assert twin.raw_store.read_bytes(key) == obs.raw_store.read_bytes(key)


def test_the_simple_sky_stays_the_default(tmp_path: Path) -> None:
    cfg = load_config(env={}).rooted_at(str(tmp_path))
    assert cfg.sim.sky == "simple"
    obs = SimulatedObservatory(cfg)
    assert "kind" not in obs.catalog.column_names
