"""The realistic sky's PSF: what PsfField says is what the renderer draws.

Independent checks: the profiles against their definitions (Moffat, FWHM,
half-light radius), the pixel integration against brute-force sub-sampling, and
stars rendered on a detector against the truth through adaptive moments, a fit
of the profile's FWHM, their flux and centroid.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from numpy.testing import assert_allclose
from scipy.optimize import least_squares

from ppray.instrument import detector_wcs, load_instrument
from ppray.sim.mixture import MOFFAT_BETA, profile_mixture
from ppray.sim.psf import PsfField
from ppray.sim.realistic import render_objects

SYN = load_instrument("synthetic")
SHAPE = (SYN.layout.ny, SYN.layout.nx)
# Bright, well separated stars at the corners, edges and centre of a 512 x 512 detector.
POSITIONS = [(40.3, 45.8), (470.6, 38.1), (255.2, 256.7), (45.9, 466.4), (468.45, 470.05)]
FLUX_E = 1.0e6


def _field(seed: int = 7, e_max: float = 0.45) -> PsfField:
    return PsfField.random(np.random.default_rng(seed), SHAPE, 4.0, ellipticity_max=e_max)


def _stars(wcs: object, positions: list[tuple[float, float]], mag: float) -> pa.Table:
    xs, ys = zip(*positions, strict=True)
    ra, dec = wcs.all_pix2world(np.array(xs), np.array(ys), 0)  # type: ignore[attr-defined]
    n = len(positions)
    return pa.table(
        {
            "id": pa.array(np.arange(n), pa.int64()),
            "ra": pa.array(ra, pa.float64()),
            "dec": pa.array(dec, pa.float64()),
            "mag": pa.array(np.full(n, mag), pa.float64()),
            "size_arcsec": pa.array(np.zeros(n), pa.float64()),
        }
    )


def _render(psf: PsfField) -> np.ndarray:
    wcs = detector_wcs(SYN, SYN.detector("R22_S11"), 150.0, 2.2, 0.0)
    mag = 28.0 - 2.5 * math.log10(FLUX_E / 30.0)
    image, objects = render_objects(
        _stars(wcs, POSITIONS, mag),
        wcs,
        SHAPE,
        psf,
        band="r",
        zero_point_mag=28.0,
        exptime_s=30.0,
        noise_e2=900.0,
    )
    assert_allclose(objects.x, [p[0] for p in POSITIONS], atol=1e-6)
    assert_allclose(objects.flux_e, FLUX_E, rtol=1e-9)
    return image


def _continuous(psf: PsfField, x: float, y: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """The PSF at offsets (dx, dy), rebuilt from the truth API and the documented profile."""
    w, s = profile_mixture(psf.profile)
    fwhm, e, theta = psf.fwhm_px(x, y), psf.ellipticity(x, y), math.radians(psf.angle_deg(x, y))
    q = 1.0 - e
    u = dx * math.cos(theta) + dy * math.sin(theta)  # along the major axis
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    out = np.zeros(np.broadcast(dx, dy).shape)
    for wk, sk in zip(w, s, strict=True):
        sa, sb = fwhm * sk / math.sqrt(q), fwhm * sk * math.sqrt(q)
        out += wk * np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2)) / (2 * math.pi * sa * sb)
    return out


def _brute_force_stamp(
    psf: PsfField, x: float, y: float, size: int, xc: float, yc: float, sub: int = 40
) -> np.ndarray:
    """Pixel integrals by the midpoint rule on sub x sub points per pixel."""
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    pos = (np.arange(size)[:, None] + offs[None, :]).reshape(-1)
    fine = _continuous(psf, x, y, (pos - xc)[None, :], (pos - yc)[:, None])
    return fine.reshape(size, sub, size, sub).mean(axis=(1, 3))


def _adaptive_moments(img: np.ndarray, x0: float, y0: float) -> tuple[float, float, float]:
    """Adaptive (elliptical Gaussian-weighted) second moments; the pixel box taken off."""
    yy, xx = np.indices(img.shape, dtype=np.float64)
    mxx, mxy, myy, cx, cy = 4.0, 0.0, 4.0, x0, y0
    for _ in range(100):
        dx, dy = xx - cx, yy - cy
        det = mxx * myy - mxy * mxy
        w = img * np.exp(-0.5 * (myy * dx * dx - 2 * mxy * dx * dy + mxx * dy * dy) / det)
        f = w.sum()
        cx, cy = cx + (w * dx).sum() / f, cy + (w * dy).sum() / f
        new = (
            2 * (w * dx * dx).sum() / f,
            2 * (w * dx * dy).sum() / f,
            2 * (w * dy * dy).sum() / f,
        )
        if np.allclose(new, (mxx, mxy, myy), rtol=1e-10, atol=1e-12):
            break
        mxx, mxy, myy = new
    return mxx - 1.0 / 12.0, mxy, myy - 1.0 / 12.0


# --- the profiles ---------------------------------------------------------------


def test_moffat_profile_has_unit_fwhm_and_follows_a_moffat() -> None:
    w, s = profile_mixture("moffat")
    assert w.sum() == pytest.approx(1.0, abs=1e-12)

    def profile(r: np.ndarray) -> np.ndarray:
        return np.sum(w / s**2 * np.exp(-0.5 * (r[..., None] / s) ** 2), axis=-1)

    assert profile(np.array(0.5)) / profile(np.array(0.0)) == pytest.approx(0.5, abs=1e-10)
    alpha = 0.5 / math.sqrt(2 ** (1 / MOFFAT_BETA) - 1)
    r = np.linspace(0.0, 8.0, 400)
    moffat = (1 + (r / alpha) ** 2) ** -MOFFAT_BETA
    ratio = profile(r) / profile(np.array(0.0)) / moffat
    # Within 5% of the Moffat's peak-normalised profile out to 8 FWHM (then faster).
    assert np.abs(ratio - 1).max() < 0.05


@pytest.mark.parametrize("name", ["exponential", "devaucouleurs"])
def test_galaxy_profiles_have_unit_half_light_radius(name: str) -> None:
    w, s = profile_mixture(name)
    # Enclosed light by quadrature on a fine radial grid (independent of the closed form).
    r = np.linspace(0.0, 1.0, 20001)
    density = np.sum(w / (2 * math.pi * s**2) * np.exp(-0.5 * (r[:, None] / s) ** 2), axis=1)
    inner = np.sum(0.5 * (density[1:] * r[1:] + density[:-1] * r[:-1]) * np.diff(r)) * 2 * math.pi
    assert inner == pytest.approx(0.5, abs=1e-6)


# --- PsfField ---------------------------------------------------------------------


def test_random_field_varies_as_asked_and_is_deterministic() -> None:
    a, b, c = _field(3), _field(3), _field(4)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    assert PsfField.from_dict(a.to_dict()).to_dict() == a.to_dict()
    yy, xx = np.mgrid[0:512:16, 0:512:16].astype(np.float64)
    fwhm, e, angle = a.fwhm_px(xx, yy), a.ellipticity(xx, yy), a.angle_deg(xx, yy)
    assert np.abs(fwhm / 4.0 - 1).max() <= 0.08 + 1e-9
    assert np.abs(fwhm / 4.0 - 1).max() > 0.02
    assert 0.6 * 0.45 - 0.02 < e.max() <= 0.45 + 1e-9
    assert e.max() - e.min() > 0.1
    assert np.all((angle > -90) & (angle <= 90))
    assert np.ptp(angle[e > 0.1]) > 10.0  # the angle turns across the detector
    assert a.fwhm_px(10.0, 20.0) == pytest.approx(float(fwhm.reshape(-1)[0]), rel=0.1)
    assert isinstance(a.ellipticity(10.0, 20.0), float)


def test_constant_round_field() -> None:
    psf = PsfField.constant(3.0, SHAPE)
    assert psf.fwhm_px(0.0, 511.0) == psf.fwhm_px(300.0, 2.0) == 3.0
    assert psf.ellipticity(100.0, 100.0) == 0.0
    tilted = PsfField.constant(3.0, SHAPE, ellipticity=0.3, angle_deg=-60.0)
    assert tilted.ellipticity(5.0, 5.0) == pytest.approx(0.3)
    assert tilted.angle_deg(5.0, 5.0) == pytest.approx(-60.0)
    with pytest.raises(ValueError, match="ellipticity"):
        PsfField.constant(3.0, SHAPE, ellipticity=0.95)


@pytest.mark.parametrize(
    ("fwhm", "e", "angle", "dx", "dy"),
    [(2.4, 0.45, 30.0, 0.31, -0.27), (4.5, 0.15, -75.0, -0.5, 0.5), (3.0, 0.0, 0.0, 0.0, 0.1)],
)
def test_image_is_the_pixel_integral(
    fwhm: float, e: float, angle: float, dx: float, dy: float
) -> None:
    psf = PsfField.constant(fwhm, SHAPE, ellipticity=e, angle_deg=angle)
    size = 41
    img = psf.image(100.0, 100.0, size, dx, dy)
    brute = _brute_force_stamp(psf, 100.0, 100.0, size, size // 2 + dx, size // 2 + dy)
    assert np.abs(img - brute).max() < 2e-4 * brute.max()
    # Normalised over the plane: the stamp holds all but the light beyond it.
    assert 1.0 - 2e-3 < img.sum() < 1.0
    yy, xx = np.indices(img.shape)
    assert_allclose((img * xx).sum() / img.sum(), size // 2 + dx, atol=2e-3)
    assert_allclose((img * yy).sum() / img.sum(), size // 2 + dy, atol=2e-3)


def test_encircled_energy() -> None:
    psf = PsfField.constant(4.0, SHAPE, ellipticity=0.3, angle_deg=20.0)
    # The continuous PSF integrated on a fine grid inside each circle.
    step = 0.05
    g = np.arange(-30.0, 30.0, step) + step / 2
    fine = _continuous(psf, 0.0, 0.0, g[None, :], g[:, None])
    r = np.hypot(g[None, :], g[:, None])
    for radius in (1.5, 3.0, 6.0, 12.0):
        expected = fine[r < radius].sum() * step * step
        assert psf.encircled_energy(0.0, 0.0, radius) == pytest.approx(expected, abs=2e-3)
    ee = psf.encircled_energy(0.0, 0.0, np.array([2.0, 4.0, 8.0, 200.0]))
    assert np.all(np.diff(ee) > 0) and ee[-1] == pytest.approx(1.0, abs=1e-9)
    # Seen through pixels the PSF is a little wider.
    assert psf.encircled_energy(0.0, 0.0, 3.0, pixelized=True) < psf.encircled_energy(0.0, 0.0, 3.0)


# --- rendered stars against the truth ----------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> tuple[PsfField, np.ndarray]:
    psf = _field()
    return psf, _render(psf)


def test_rendered_stars_are_flux_times_the_truth_image(
    rendered: tuple[PsfField, np.ndarray],
) -> None:
    psf, image = rendered
    size = 61
    for x, y in POSITIONS:
        cx, cy = round(x), round(y)
        x0, y0 = cx - size // 2, cy - size // 2
        stamp = image[max(y0, 0) : y0 + size, max(x0, 0) : x0 + size]
        truth = FLUX_E * psf.image(x, y, size, x - cx, y - cy)
        truth = truth[max(-y0, 0) :, max(-x0, 0) :][: stamp.shape[0], : stamp.shape[1]]
        assert np.abs(stamp - truth).max() < 1e-5 * truth.max()


def test_rendered_stars_flux_and_centroid(rendered: tuple[PsfField, np.ndarray]) -> None:
    _, image = rendered
    x, y = POSITIONS[2]  # away from the edges
    win = image[int(y) - 120 : int(y) + 121, int(x) - 120 : int(x) + 121]
    assert FLUX_E * (1 - 1e-3) <= win.sum() <= FLUX_E
    yy, xx = np.indices(win.shape)
    assert (win * xx).sum() / win.sum() + int(x) - 120 == pytest.approx(x, abs=2e-3)
    assert (win * yy).sum() / win.sum() + int(y) - 120 == pytest.approx(y, abs=2e-3)


def test_rendered_shapes_match_ellipticity_and_angle(rendered: tuple[PsfField, np.ndarray]) -> None:
    psf, image = rendered
    measured = []
    for x, y in POSITIONS:
        cx, cy = round(x), round(y)
        stamp = image[max(cy - 25, 0) : cy + 26, max(cx - 25, 0) : cx + 26]
        mxx, mxy, myy = _adaptive_moments(stamp, x - max(cx - 25, 0), y - max(cy - 25, 0))
        spread = math.hypot(0.5 * (mxx - myy), mxy)
        lam_max, lam_min = 0.5 * (mxx + myy) + spread, 0.5 * (mxx + myy) - spread
        e = 1.0 - math.sqrt(lam_min / lam_max)
        angle = 0.5 * math.degrees(math.atan2(2 * mxy, mxx - myy))
        measured.append((e, angle))
        assert e == pytest.approx(psf.ellipticity(x, y), abs=0.01)
        if psf.ellipticity(x, y) > 0.1:
            turn = (angle - psf.angle_deg(x, y) + 90.0) % 180.0 - 90.0
            assert abs(turn) < 1.0
    # The field really varies over the detector (so the test above means something).
    assert np.ptp([m[0] for m in measured]) > 0.1


def test_rendered_fwhm_matches_the_truth(rendered: tuple[PsfField, np.ndarray]) -> None:
    """Fit the documented profile (free FWHM, shape, centre, flux) to rendered stars."""
    psf, image = rendered
    w, s = profile_mixture("moffat")
    offs = (np.arange(8) + 0.5) / 8 - 0.5
    for x, y in POSITIONS[1:3]:
        cx, cy = round(x), round(y)
        stamp = image[cy - 15 : cy + 16, cx - 15 : cx + 16]
        fine = (np.arange(31)[:, None] + offs[None, :]).reshape(-1) - 15

        def model(p: np.ndarray, fine: np.ndarray = fine) -> np.ndarray:
            flux, x0, y0, fwhm, e, theta = p
            dx, dy = fine[None, :] - x0, fine[:, None] - y0
            u = dx * math.cos(theta) + dy * math.sin(theta)
            v = -dx * math.sin(theta) + dy * math.cos(theta)
            q = 1 - e
            out = np.zeros((fine.size, fine.size))
            for wk, sk in zip(w, s, strict=True):
                sa, sb = fwhm * sk / math.sqrt(q), fwhm * sk * math.sqrt(q)
                out += wk * np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2)) / (2 * math.pi * sa * sb)
            return flux * out.reshape(31, 8, 31, 8).mean(axis=(1, 3))

        theta0 = math.radians(psf.angle_deg(x, y)) + 0.1
        start = np.array([FLUX_E, x - cx, y - cy, 3.5, 0.2, theta0])

        def residuals(p: np.ndarray, stamp: np.ndarray = stamp) -> np.ndarray:
            return (model(p) - stamp).ravel() / FLUX_E

        fit = least_squares(residuals, start, x_scale="jac")
        assert fit.x[3] == pytest.approx(psf.fwhm_px(x, y), rel=2e-3)
        assert fit.x[4] == pytest.approx(psf.ellipticity(x, y), abs=2e-3)
