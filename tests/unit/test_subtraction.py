"""PSF-matched differencing of simulated science/template pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ppray.image import Exposure, MaskBit
from ppray.science.subtraction import SubtractionResult, subtract_images
from ppray.sim.render import _pixel_profile, fwhm_to_sigma

from .simdata_diff import EXPTIME_S, INJECTED_MAG, INJECTED_XY, SHAPE, make_pair

INJECTED_FLUX = 10.0 ** (-0.4 * (INJECTED_MAG - 28.0)) * EXPTIME_S
_YY, _XX = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]


def _psf_flux(image: np.ndarray, x: float, y: float, seeing_arcsec: float) -> float:
    """Least-squares amplitude of the (pixel-integrated Gaussian) PSF at a known position."""
    sigma = np.array([fwhm_to_sigma(seeing_arcsec, 0.2)])
    half = 10
    x0, wx = _pixel_profile(np.array([x]), sigma, half)
    y0, wy = _pixel_profile(np.array([y]), sigma, half)
    model = np.outer(wy[0], wx[0])
    data = image[y0[0] : y0[0] + 2 * half + 1, x0[0] : x0[0] + 2 * half + 1]
    return float((model * data).sum() / (model**2).sum())


def _chi_rms(result: SubtractionResult) -> float:
    """RMS of diff/sqrt(var) over unmasked pixels at least 15 px from injected sources."""
    diff = result.difference
    far = np.ones(SHAPE, dtype=bool)
    for x, y in INJECTED_XY:
        far &= (_XX - x) ** 2 + (_YY - y) ** 2 > 15.0**2
    good = far & (diff.mask == 0)
    assert good.mean() > 0.8
    chi = diff.image[good] / np.sqrt(diff.variance[good])
    return float(np.sqrt(np.mean(chi**2)))


def _check_injected(result: SubtractionResult, seeing_arcsec: float) -> None:
    for x, y in INJECTED_XY:
        flux = _psf_flux(result.difference.image, x, y, seeing_arcsec)
        assert flux == pytest.approx(INJECTED_FLUX, rel=0.05), (x, y, flux / INJECTED_FLUX)


@pytest.mark.parametrize("spatial_order", [0, 1])
def test_sharper_template_is_convolved_and_stars_vanish(spatial_order: int) -> None:
    pair = make_pair(1.0, 0.7)
    result = subtract_images(pair.science, pair.template, spatial_order=spatial_order)
    assert result.ok and result.convolved == "template", result.reason
    assert result.n_stamps >= 10
    assert result.kernel_sum == pytest.approx(1.0, abs=0.01)
    # The matching kernel is the Gaussian that takes 0.7" to 1.0".
    expected_fwhm = math.sqrt(1.0**2 - 0.7**2) / 0.2
    assert result.kernel_fwhm_px == pytest.approx(expected_fwhm, rel=0.1)
    assert result.psf_fwhm_px == pytest.approx(5.0, rel=0.05)
    assert _chi_rms(result) == pytest.approx(1.0, abs=0.1)
    _check_injected(result, 1.0)
    # At the bright stars of the template, nothing significant is left.
    diff = result.difference
    bright = np.argwhere(pair.template.image > 3000.0)
    chi = diff.image[bright[:, 0], bright[:, 1]] / np.sqrt(
        diff.variance[bright[:, 0], bright[:, 1]]
    )
    assert bright.shape[0] > 50 and np.abs(chi).max() < 6.0


def test_spatial_order_does_not_hurt() -> None:
    pair = make_pair(1.0, 0.7)
    constant = subtract_images(pair.science, pair.template, spatial_order=0)
    varying = subtract_images(pair.science, pair.template, spatial_order=1)
    assert abs(_chi_rms(varying) - _chi_rms(constant)) < 0.02
    np.testing.assert_allclose(varying.kernel.sum(), constant.kernel.sum(), rtol=0.01)


def test_unmatched_difference_fails_the_same_checks() -> None:
    """The chi check can fail: a plain science - template leaves the stars behind."""
    pair = make_pair(1.0, 0.7)
    result = subtract_images(pair.science, pair.template)
    plain = Exposure(
        pair.science.image - pair.template.image,
        pair.science.variance + pair.template.variance,
        result.difference.mask,
    )
    unmatched = SubtractionResult(plain, result.kernel, 1.0, 0.0, 5.0, 0, "none", True)
    assert _chi_rms(unmatched) > 1.5


def test_broader_template_convolves_the_science() -> None:
    pair = make_pair(0.7, 1.0)
    result = subtract_images(pair.science, pair.template)
    assert result.ok and result.convolved == "science"
    assert "science" in result.reason
    assert result.difference.metadata["DIFFCONV"] == "science"
    assert result.psf_fwhm_px == pytest.approx(5.0, rel=0.05)
    assert _chi_rms(result) == pytest.approx(1.0, abs=0.1)
    # The difference has the template's PSF and science flux units.
    _check_injected(result, 1.0)


def test_template_gap_is_masked_in_the_difference() -> None:
    pair = make_pair(1.0, 0.7)
    template = Exposure(
        pair.template.image.copy(),
        pair.template.variance.copy(),
        pair.template.mask.copy(),
        pair.template.wcs,
    )
    template.image[:, :150] = np.nan
    template.variance[:, :150] = np.nan
    template.mask[:, :150] |= np.uint32(MaskBit.NO_DATA)
    result = subtract_images(pair.science, template)
    assert result.ok
    diff = result.difference
    nodata = (diff.mask & MaskBit.NO_DATA) != 0
    # The gap grows by the kernel's half-width (10 px) and no further.
    assert nodata[:, :160].all() and not nodata[:, 161:].any()
    assert np.isnan(diff.image[nodata]).all() and np.isnan(diff.variance[nodata]).all()
    good = ~nodata & (diff.mask == 0)
    chi = diff.image[good] / np.sqrt(diff.variance[good])
    assert np.isfinite(chi).all()
    far = good[:, 161:] & ((_XX[:, 161:] - 260) ** 2 + (_YY[:, 161:] - 300) ** 2 > 225)
    assert far.sum() > 0
    # The injected sources in the covered part are still measured right.
    for x, y in INJECTED_XY[1:3]:
        flux = _psf_flux(diff.image, x, y, 1.0)
        assert flux == pytest.approx(INJECTED_FLUX, rel=0.05)


def test_scattered_defects_leave_the_stamps_usable() -> None:
    """Masked hot pixels and a bad column, as a certified defect mask has them, neither
    remove the stamps they fall in nor leak into the kernel fit."""
    pair = make_pair(1.0, 0.7)
    clean = subtract_images(pair.science, pair.template)
    rng = np.random.default_rng(7)
    science = Exposure(
        pair.science.image.copy(),
        pair.science.variance.copy(),
        pair.science.mask.copy(),
        pair.science.wcs,
    )
    hot = rng.random(SHAPE) < 1 / 300  # ~9 in every stamp and its kernel margin
    hot[:, 333] = True
    for x, y in INJECTED_XY:  # keep the injected sources' own pixels clean
        hot[(_XX - x) ** 2 + (_YY - y) ** 2 <= 36] = False
    science.image[hot] = 1e5  # hot: huge, but masked
    science.mask[hot] |= np.uint32(MaskBit.BAD)
    result = subtract_images(science, pair.template)
    assert result.ok, result.reason
    # A stamp whose star core is hit is still dropped (~15% here), not every stamp.
    assert result.n_stamps >= max(5, clean.n_stamps // 2), (result.n_stamps, clean.n_stamps)
    assert result.kernel_sum == pytest.approx(clean.kernel_sum, rel=0.01)
    assert result.chi2 == pytest.approx(clean.chi2, rel=0.3)
    assert (result.difference.mask[hot] & MaskBit.BAD).all()
    _check_injected(result, 1.0)


def test_without_stars_a_fallback_is_flagged() -> None:
    pair = make_pair(1.0, 0.7)
    empty = Exposure(
        np.zeros(SHAPE, np.float32), pair.template.variance, pair.template.mask, pair.template.wcs
    )
    result = subtract_images(pair.science, empty)
    assert not result.ok and "stamps" in result.reason
    assert result.n_stamps == 0
    np.testing.assert_allclose(
        result.difference.image[20:-20, 20:-20], pair.science.image[20:-20, 20:-20], atol=1e-3
    )


def test_bad_arguments() -> None:
    pair = make_pair(1.0, 0.7)
    with pytest.raises(ValueError, match="odd"):
        subtract_images(pair.science, pair.template, kernel_size=20)
    small = Exposure(
        pair.template.image[:100], pair.template.variance[:100], pair.template.mask[:100]
    )
    with pytest.raises(ValueError, match="shape"):
        subtract_images(pair.science, small)


def _field(sigmas: tuple[float, float, float], seed: int) -> Exposure:
    """A 1024² grid of bright stars whose Gaussian PSF has ``sigma_x = a + b u²`` and
    ``sigma_y = a + c v`` (``u, v`` the detector position in -1..1), sky noise 10 e."""
    a, b, c = sigmas
    n, half, sky_var = 1024, 12, 100.0
    rng = np.random.default_rng(seed)
    image = np.zeros((n, n))
    off = np.arange(-half, half + 1)
    for y in np.linspace(40, n - 41, 14).round().astype(int):
        for x in np.linspace(40, n - 41, 14).round().astype(int):
            u, v = 2.0 * x / (n - 1) - 1.0, 2.0 * y / (n - 1) - 1.0
            sx, sy = a + b * u * u, a + c * v
            star = np.outer(np.exp(-0.5 * (off / sy) ** 2), np.exp(-0.5 * (off / sx) ** 2))
            image[y - half : y + half + 1, x - half : x + half + 1] += 2e5 * star / star.sum()
    variance = sky_var + image
    image = image + rng.normal(0.0, np.sqrt(variance))
    return Exposure(image.astype(np.float32), variance.astype(np.float32),
                    np.zeros((n, n), np.uint32))  # fmt: skip


def test_the_kernel_varies_only_as_far_as_the_stamps_show() -> None:
    """Each spatial order costs a convolution of the whole image: a constant PSF gets
    order 0 however high the order allowed; one that changes across it keeps order 2,
    which subtracts its bright stars to the noise where order 0 could not."""
    template = _field((1.4, 0.0, 0.0), seed=1)
    constant = subtract_images(_field((2.0, 0.0, 0.0), seed=2), template, spatial_order=2)
    assert constant.ok and constant.kernel_order == 0, constant.reason
    assert constant.bright_star_residual() < 1.2
    varying_science = _field((2.0, 0.6, 0.3), seed=3)
    varying = subtract_images(varying_science, template, spatial_order=2)
    assert varying.ok and varying.kernel_order == 2, varying.reason
    assert varying.bright_star_residual() < 1.2
    forced = subtract_images(varying_science, template, spatial_order=0)
    assert forced.bright_star_residual() > 2.0
