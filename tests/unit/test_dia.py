"""DIA detection and measurement against synthetic difference images with known sources."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from astropy.wcs import WCS
from scipy import ndimage
from scipy.spatial import cKDTree

from ppray.image import Exposure, MaskBit
from ppray.science.dia import (
    DIA_SOURCE_SCHEMA,
    FLAG_EDGE,
    FLAG_NO_DATA,
    SNR_SCALE_KEY,
    detect_dia_sources,
    psf_snr_image,
    snr_noise_scale,
)
from ppray.science.psf import PsfModel
from ppray.sim.psf import PsfField

from .simdata_dia import PSF_SIGMA_PX, flux_for_snr, make_difference, trail_points

SHAPE = (1024, 1024)
SPACING = 40  # px between injected sources: isolated, so one source is one detection
DIPOLE_XY = (500.0, 520.0)
DIPOLE_SEPARATION = 4.0  # ~1 FWHM: lobes overlap, as for a small misregistration
TRAIL_XY = (300.0, 700.0)
TRAIL_LENGTH, TRAIL_ANGLE = 20.0, 30.0


@dataclass(frozen=True)
class Scene:
    exposure: Exposure
    x: np.ndarray  # point sources only
    y: np.ndarray
    flux: np.ndarray
    snr: np.ndarray
    table: pa.Table


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_numpy(zero_copy_only=False))


@pytest.fixture(scope="module")
def scene() -> Scene:
    rng = np.random.default_rng(0)
    grid = np.arange(SPACING, SHAPE[0] - SPACING + 1, SPACING, dtype=np.float64)
    gx, gy = (a.ravel() for a in np.meshgrid(grid, grid))
    # Keep the dipole and the trail clear of point sources.
    clear = (np.hypot(gx - DIPOLE_XY[0], gy - DIPOLE_XY[1]) > 2 * SPACING) & (
        np.hypot(gx - TRAIL_XY[0], gy - TRAIL_XY[1]) > 2 * SPACING
    )
    x = gx[clear] + rng.uniform(-0.5, 0.5, clear.sum())
    y = gy[clear] + rng.uniform(-0.5, 0.5, clear.sum())
    snr = np.exp(rng.uniform(math.log(5.0), math.log(60.0), x.size))
    sign = np.where(rng.uniform(size=x.size) < 0.3, -1.0, 1.0)
    flux = sign * flux_for_snr(snr)
    dipole_f = flux_for_snr(60.0)
    h = DIPOLE_SEPARATION / 2
    tx, ty, tf = trail_points(*TRAIL_XY, TRAIL_LENGTH, TRAIL_ANGLE, flux_for_snr(80.0))
    all_x = np.concatenate([x, [DIPOLE_XY[0] + h, DIPOLE_XY[0] - h], tx])
    all_y = np.concatenate([y, [DIPOLE_XY[1], DIPOLE_XY[1]], ty])
    all_f = np.concatenate([flux, [dipole_f, -dipole_f], tf])
    sim = make_difference(SHAPE, all_x, all_y, all_f, seed=0)
    table = detect_dia_sources(sim.exposure, PSF_SIGMA_PX)
    return Scene(sim.exposure, x, y, flux, snr, table)


def _match(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """For each injected point source: distance to and index of the nearest detection."""
    t = scene.table
    tree = cKDTree(np.column_stack([_column(t, "x"), _column(t, "y")]))
    dist, index = tree.query(np.column_stack([scene.x, scene.y]))
    return dist, index


def test_schema_and_order(scene: Scene) -> None:
    t = scene.table
    assert t.schema == DIA_SOURCE_SCHEMA
    assert t.num_rows > 300
    np.testing.assert_array_equal(_column(t, "diaSourceIndex"), np.arange(t.num_rows))
    y, x = _column(t, "y"), _column(t, "x")
    assert np.all((np.diff(y) > 0) | ((np.diff(y) == 0) & (np.diff(x) >= 0)))
    assert np.isnan(_column(t, "ra")).all()  # no WCS


def test_completeness_above_snr_10(scene: Scene) -> None:
    dist, _ = _match(scene)
    bright = scene.snr >= 10
    assert bright.sum() > 200
    completeness = float(np.mean(dist[bright] < 1.0))
    assert completeness >= 0.95, completeness
    # The matched filter still finds most sources at S/N 5-7 (the design note: ~60%).
    faint = scene.snr < 7
    assert np.mean(dist[faint] < 1.0) >= 0.4


def test_psf_flux_unbiased_and_errors_match_scatter(scene: Scene) -> None:
    dist, index = _match(scene)
    ok = (dist < 1.0) & (scene.snr >= 10)
    flux = _column(scene.table, "psfFlux")[index[ok]]
    err = _column(scene.table, "psfFluxErr")[index[ok]]
    ratio = np.median(flux / scene.flux[ok])
    assert abs(ratio - 1.0) < 0.03, ratio
    pull = (flux - scene.flux[ok]) / err
    assert 0.8 <= np.std(pull) <= 1.2, np.std(pull)
    assert abs(np.median(pull)) < 0.3
    ap = _column(scene.table, "apFlux")[index[ok]] / scene.flux[ok]
    assert abs(np.median(ap) - 1.0) < 0.05


def test_centroids_and_their_errors(scene: Scene) -> None:
    dist, index = _match(scene)
    ok = (dist < 1.0) & (scene.snr >= 10)
    t = scene.table
    for axis, truth in (("x", scene.x), ("y", scene.y)):
        pull = (_column(t, axis)[index[ok]] - truth[ok]) / _column(t, f"{axis}Err")[index[ok]]
        assert 0.7 <= np.std(pull) <= 1.3, (axis, np.std(pull))
        assert abs(np.mean(pull)) < 0.2


def test_negative_sources_flagged(scene: Scene) -> None:
    dist, index = _match(scene)
    ok = dist < 1.0
    negative = _column(scene.table, "isNegative")[index[ok]]
    np.testing.assert_array_equal(negative, scene.flux[ok] < 0)
    assert negative.sum() > 50
    snr = _column(scene.table, "snr")[index[ok]]
    np.testing.assert_array_equal(snr < 0, scene.flux[ok] < 0)


def test_dipole_merged_and_flagged(scene: Scene) -> None:
    t = scene.table
    is_dipole = _column(t, "isDipole")
    assert is_dipole.sum() == 1
    (i,) = np.flatnonzero(is_dipole)
    assert math.hypot(_column(t, "x")[i] - DIPOLE_XY[0], _column(t, "y")[i] - DIPOLE_XY[1]) < 1.0
    # Overlapping lobes push the filtered peaks apart (here 4 px -> ~5.6 px): no dipole
    # model is fitted, so the length is only a rough one.
    assert DIPOLE_SEPARATION - 0.5 < _column(t, "dipoleLength")[i] < 1.6 * DIPOLE_SEPARATION
    assert abs(_column(t, "dipoleAngle")[i]) < 10.0  # the positive lobe is at +x
    assert abs(_column(t, "dipoleFluxDiff")[i]) < 0.2 * _column(t, "dipoleMeanFlux")[i]
    # Nothing else lies within 2 FWHM of the dipole: both lobes were merged.
    near = np.hypot(_column(t, "x") - DIPOLE_XY[0], _column(t, "y") - DIPOLE_XY[1]) < 10
    assert near.sum() == 1


def test_trail_flagged(scene: Scene) -> None:
    t = scene.table
    trailed = np.flatnonzero(_column(t, "isTrailed"))
    d = np.hypot(_column(t, "x")[trailed] - TRAIL_XY[0], _column(t, "y")[trailed] - TRAIL_XY[1])
    assert (d < TRAIL_LENGTH / 2).sum() == 1
    i = trailed[np.argmin(d)]
    assert abs(_column(t, "trailLength")[i] - TRAIL_LENGTH) < 0.3 * TRAIL_LENGTH
    assert abs(_column(t, "trailAngle")[i] - TRAIL_ANGLE) < 5.0
    # Isolated point sources are not trails.
    dist, index = _match(scene)
    points = _column(t, "isTrailed")[index[dist < 1.0]]
    assert points.sum() == 0


def test_false_detections_on_pure_noise() -> None:
    """The matched filter's noise rate: measured 0.83 per 2048² (either sign) over 12 seeds.

    That is ~3.3 per 4k x 4k at 5 sigma; the issue asks for fewer than 5.
    """
    sim = make_difference((2048, 2048), np.zeros(0), np.zeros(0), np.zeros(0), seed=0)
    table = detect_dia_sources(sim.exposure, PSF_SIGMA_PX)
    assert table.num_rows <= 3
    snr = psf_snr_image(sim.exposure, PSF_SIGMA_PX)
    # The S/N image of pure noise has unit variance (the filter is normalised right).
    assert abs(float(np.std(snr[64:-64, 64:-64])) - 1.0) < 0.02
    high = detect_dia_sources(sim.exposure, PSF_SIGMA_PX, threshold_sigma=8.0)
    assert high.num_rows == 0
    assert high.schema == DIA_SOURCE_SCHEMA


def _scale(table: pa.Table) -> float:
    return float((table.schema.metadata or {})[SNR_SCALE_KEY])


def test_correlated_noise_is_measured_and_divided_out() -> None:
    """Noise smoothed over ~2 px keeps its per-pixel variance but fools the filter.

    The variance plane is right pixel by pixel, so an uncorrected filter finds
    many times the white-noise rate of false sources; dividing by the S/N
    image's measured scatter brings it back, and the errors grow by as much.
    """
    white = make_difference((1024, 1024), np.zeros(0), np.zeros(0), np.zeros(0), seed=3)
    noise = white.exposure.image - white.model
    smooth = ndimage.gaussian_filter(noise, 0.8)
    smooth *= np.float32(np.std(noise) / np.std(smooth))  # the same per-pixel variance
    exposure = dataclasses.replace(white.exposure, image=smooth.astype(np.float32))
    raw = detect_dia_sources(exposure, PSF_SIGMA_PX, threshold_sigma=4.5, snr_scale=1.0)
    fixed = detect_dia_sources(exposure, PSF_SIGMA_PX, threshold_sigma=4.5)
    base = detect_dia_sources(white.exposure, PSF_SIGMA_PX, threshold_sigma=4.5)
    assert _scale(raw) == 1.0
    # Unit-variance noise smoothed by s and filtered by a PSF of p:
    # the S/N variance is 4 pi p² s² / (p² + s²).
    p2, s2 = PSF_SIGMA_PX**2, 0.8**2
    assert _scale(fixed) == pytest.approx(math.sqrt(4 * math.pi * p2 * s2 / (p2 + s2)), rel=0.05)
    assert abs(_scale(base) - 1.0) < 0.03
    assert raw.num_rows >= 5 * max(base.num_rows, 2)
    assert fixed.num_rows <= max(2 * base.num_rows, 3)
    snr = psf_snr_image(exposure, PSF_SIGMA_PX)
    measured = snr_noise_scale(snr, np.zeros(snr.shape, dtype=bool), 8)
    assert measured == pytest.approx(float(np.std(snr[32:-32, 32:-32])), rel=0.03)


def test_snr_scale_inflates_errors_not_fluxes(scene: Scene) -> None:
    one = detect_dia_sources(scene.exposure, PSF_SIGMA_PX, snr_scale=1.0)
    two = detect_dia_sources(scene.exposure, PSF_SIGMA_PX, snr_scale=2.0, threshold_sigma=2.5)
    # Every source found at S/N 5 is found at 2.5 after dividing by 2, measured the same.
    xy = cKDTree(np.c_[_column(two, "x"), _column(two, "y")])
    dist, index = xy.query(np.c_[_column(one, "x"), _column(one, "y")])
    assert np.all(dist < 1e-9)
    for name in ("psfFlux", "apFlux", "x", "y"):
        np.testing.assert_allclose(_column(two, name)[index], _column(one, name), rtol=1e-12)
    for name in ("psfFluxErr", "apFluxErr", "xErr", "yErr"):
        np.testing.assert_allclose(_column(two, name)[index], 2 * _column(one, name), rtol=1e-9)
    with pytest.raises(ValueError, match="snr_scale"):
        detect_dia_sources(scene.exposure, PSF_SIGMA_PX, snr_scale=0.0)


def test_masks_edges_and_pixel_psf() -> None:
    x = np.array([100.0, 300.0, 3.0, 200.0])
    y = np.array([100.0, 300.0, 200.0, 60.0])
    flux = flux_for_snr(np.array([40.0, 40.0, 40.0, 40.0]))
    sim = make_difference((400, 400), x, y, flux, seed=0)
    exp = sim.exposure
    image, mask = exp.image.copy(), exp.mask.copy()
    # An all-NaN block flagged NO_DATA next to the source at (300, 300), and a BAD
    # column full of garbage: neither may produce detections or NaN measurements.
    image[305:340, 280:320] = np.nan
    mask[305:340, 280:320] |= np.uint32(MaskBit.NO_DATA)
    image[:, 150] = 1e6
    mask[:, 150] |= np.uint32(MaskBit.BAD)
    masked = Exposure(image, exp.variance.copy(), mask)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [1.0, 1.0]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    masked.wcs = wcs
    t = detect_dia_sources(masked, PSF_SIGMA_PX)
    assert t.num_rows == 4, t.to_pydict()
    assert np.isfinite(_column(t, "psfFlux")).all()
    tree = cKDTree(np.column_stack([_column(t, "x"), _column(t, "y")]))
    dist, index = tree.query(np.column_stack([x, y]))
    assert (dist < 0.5).all()
    flags = _column(t, "flags")[index]
    assert flags[1] & FLAG_NO_DATA and not flags[0] & FLAG_NO_DATA
    assert flags[2] & FLAG_EDGE and not flags[0] & FLAG_EDGE
    ra, dec = wcs.all_pix2world(_column(t, "x"), _column(t, "y"), 0)
    np.testing.assert_allclose(_column(t, "ra"), ra, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_column(t, "dec"), dec, rtol=0, atol=1e-12)
    # Mask-free sources measure the same whether the PSF comes as a sigma or as pixels.
    off = np.arange(-8, 9)
    g = np.exp(-0.5 * (off / PSF_SIGMA_PX) ** 2)
    by_sigma = detect_dia_sources(exp, PSF_SIGMA_PX)
    by_image = detect_dia_sources(exp, np.outer(g, g))
    assert by_image.num_rows == by_sigma.num_rows == 4
    np.testing.assert_allclose(_column(by_image, "x"), _column(by_sigma, "x"), atol=0.05)
    np.testing.assert_allclose(
        _column(by_image, "psfFlux"), _column(by_sigma, "psfFlux"), rtol=0.02
    )
    # Stateless and deterministic.
    again = detect_dia_sources(exp, PSF_SIGMA_PX)
    for name in DIA_SOURCE_SCHEMA.names:  # NaN-aware, unlike Table.equals
        np.testing.assert_array_equal(_column(again, name), _column(by_sigma, name))


def test_rejects_bad_arguments() -> None:
    sim = make_difference((64, 64), np.zeros(0), np.zeros(0), np.zeros(0), seed=0)
    with pytest.raises(ValueError, match="sigma"):
        detect_dia_sources(sim.exposure, 0.0)
    with pytest.raises(ValueError, match="odd"):
        detect_dia_sources(sim.exposure, np.ones((4, 4)))
    with pytest.raises(ValueError, match="threshold"):
        detect_dia_sources(sim.exposure, PSF_SIGMA_PX, threshold_sigma=0.0)


@pytest.mark.parametrize("angle_deg", [0.0, 35.0, 90.0])
def test_an_elongated_psf_does_not_make_point_sources_trailed(angle_deg: float) -> None:
    """Point sources of an ellipticity-0.4 PSF: none trailed with the PSF model; a round
    Gaussian of the same FWHM (what DIA used to get) calls the bright ones trails."""
    shape = (512, 512)
    field = PsfField.constant(4.0, shape, ellipticity=0.4, angle_deg=angle_deg)
    rng = np.random.default_rng(3)
    grid = np.arange(40, 480, 40, dtype=np.float64)
    gx, gy = (a.ravel() for a in np.meshgrid(grid, grid))
    gx, gy = gx + rng.uniform(-0.5, 0.5, gx.size), gy + rng.uniform(-0.5, 0.5, gy.size)
    flux = np.geomspace(800.0, 60_000.0, gx.size)  # S/N ~10 to ~500
    image = np.zeros(shape)
    half = 15
    for x, y, f in zip(gx, gy, flux, strict=True):
        cx, cy = round(x), round(y)
        image[cy - half : cy + half + 1, cx - half : cx + half + 1] += f * field.image(
            x, y, 2 * half + 1, x - cx, y - cy
        )
    variance = np.full(shape, 100.0) + image
    noisy = image + rng.standard_normal(shape) * np.sqrt(variance)
    diff = Exposure(
        noisy.astype(np.float32),
        variance.astype(np.float32),
        np.zeros(shape, dtype=np.uint32),
        None,
    )
    model = PsfModel.constant(field.image(256.0, 256.0, 31))
    found = detect_dia_sources(diff, model)
    assert found.num_rows >= 0.95 * gx.size
    assert not _column(found, "isTrailed").any(), _column(found, "snr")[_column(found, "isTrailed")]
    round_psf = detect_dia_sources(diff, model.sigma_px)
    assert _column(round_psf, "isTrailed").sum() >= 5  # what the model fixes


def _elongation_model(strength: float, shape: tuple[int, int]) -> PsfModel:
    """A PSF model round at the centre whose x-width changes along x by ``strength``:
    ``P(u) = G + strength * u * (G_wide - G)`` (``u`` -1..1 across the detector)."""
    off = np.arange(-12, 13, dtype=np.float64)

    def gauss(sx: float, sy: float) -> np.ndarray:
        g = np.outer(np.exp(-0.5 * (off / sy) ** 2), np.exp(-0.5 * (off / sx) ** 2))
        return g / g.sum()

    base, wide = gauss(2.0, 2.0), gauss(3.2, 2.0)
    return PsfModel.from_coefficients(
        np.stack([base, strength * (wide - base), np.zeros_like(base)]), shape
    )


def test_a_psf_that_barely_varies_is_one_filter_and_one_that_varies_is_followed() -> None:
    """A model varying by its fit's noise gives the one-filter S/N image exactly; one that
    varies gets, at a source where it differs, more S/N than the central PSF would."""
    shape = (1024, 1024)
    rng = np.random.default_rng(5)
    x = 1000.0
    strong = _elongation_model(1.0, shape)
    star = strong.images_at(np.array([x]), np.array([512.0]))[0]
    image = rng.normal(0.0, 10.0, shape).astype(np.float32)
    h = star.shape[0] // 2
    image[512 - h : 512 + h + 1, int(x) - h : int(x) + h + 1] += 3000.0 * star
    exposure = Exposure(image, np.full(shape, 100.0, np.float32), np.zeros(shape, np.uint32))
    central = PsfModel.constant(strong.unit_images_at(np.array([511.5]), np.array([511.5]))[0])
    faint = _elongation_model(1e-3, shape)
    faint_central = faint.unit_images_at(np.array([511.5]), np.array([511.5]))[0]
    np.testing.assert_array_equal(
        psf_snr_image(exposure, faint), psf_snr_image(exposure, PsfModel.constant(faint_central))
    )
    followed = psf_snr_image(exposure, strong)[512, int(x)]
    one_filter = psf_snr_image(exposure, central)[512, int(x)]
    assert followed > 1.01 * one_filter, (followed, one_filter)
