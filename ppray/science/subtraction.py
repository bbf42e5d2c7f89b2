"""PSF-matched image differencing (Alard & Lupton 1998, Alard 2000).

:func:`subtract_images` takes a science exposure and a template already warped
to its grid (:func:`ppray.science.warp.warp_templates`), both background
subtracted and in the same units, and returns their difference.

Direction
    Matching can only blur, so the sharper image is convolved to the other's
    PSF: normally the template (``difference = science - K*template``, the
    difference has the science PSF). When the template is the broader one (bad
    template seeing, or excellent science seeing), the science image is
    convolved instead, ``difference = (K*science + b - template) / sum(K)``, which
    has the template's PSF; dividing by the kernel sum keeps fluxes in science
    units. ``SubtractionResult.convolved`` says which. Widths are compared with
    adaptive second moments of the stamps' stars in each image.

Kernel
    ``K(u; x, y) = a_0 B_0(u) + sum_k sum_m a_km P_m(x, y) B_k(u)``: basis
    functions ``B_k`` are Gaussians times polynomials ``exp(-|u|²/2s²) u^i v^j``
    (``i + j <= degree`` per Gaussian; by default sigmas ``s`` of 0.5, 1 and 2
    times the matching sigma ``sqrt(sigma_ref² - sigma_src²)``, degrees 4, 2,
    2). ``B_0`` (the first Gaussian) sums to 1 and every other basis function
    is made to sum to 0, so the kernel sum ``a_0`` (the photometric scaling) is
    the same everywhere while the kernel's shape varies as polynomials ``P_m``
    of order up to ``spatial_order`` in the normalised detector coordinates: the
    order with the least Bayesian information criterion on the stamps, so a
    PSF that does not change across the detector costs no extra convolutions. A
    differential background polynomial of ``background_order`` is fitted with it.

Fit
    On stamps around bright stars found in the template (peaks with S/N over
    ``min_peak_snr``, spread over a 4x4 grid of the detector, non-overlapping,
    with a clean core and few masked pixels), by weighted linear least squares
    over all stamp pixels at once (weights ``1/(var_sci + var_tmpl)``, 0 on masked
    pixels and within the kernel's reach of one).
    Stamps whose mean chi² is an outlier (``clip_sigma`` robust sigmas above
    the median: variable stars, transients, blends with a cosmic ray) are dropped
    and the fit repeated. The basis convolutions of the stamps are separable
    1-D passes.

Convolution of the whole image
    ``K*I = sum_m P_m(x, y) (K_m * I)`` with ``K_m = sum_k a_km B_k``: one FFT
    convolution (``scipy.fft``, one forward transform shared by all) per spatial term, not per basis
    function, exact for a kernel whose polynomial is evaluated at the output pixel.

Variance and mask
    ``var_diff = var_ref + K_c² * var_src`` with ``K_c`` the kernel at the
    detector centre: it neglects the kernel's spatial variation in the variance
    and the covariance the convolution puts between neighbouring pixels (the
    per-pixel variance is right; the noise is correlated on the kernel's scale).
    The mask is the OR of both masks, the convolved image's ``BAD``, ``SAT``,
    ``CR``, ``NO_DATA`` and ``EDGE`` bits first dilated by the kernel's
    half-width; pixels within that half-width of the border get ``EDGE``.
    ``NO_DATA`` pixels (e.g. where no template covers) have NaN image and variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
from astropy.stats import mad_std
from scipy import ndimage

from ppray.image import Exposure, MaskBit
from ppray.science._fft import convolve_same
from ppray.science.psf import PsfModel, poly_values
from ppray.science.stats import FWHM_PER_SIGMA

__all__ = ["SubtractionResult", "subtract_images"]

# Pixels that carry no usable information for the fit.
_UNUSABLE = np.uint32(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NO_DATA | MaskBit.EDGE)
# Bits that a convolution spreads over the kernel's footprint.
_SPREAD = (MaskBit.BAD, MaskBit.SAT, MaskBit.CR, MaskBit.NO_DATA, MaskBit.EDGE)
_GRID = 4  # stamps are spread over a _GRID x _GRID grid of the detector
_STAMPS_PER_TERM = 5  # fewest stamps per term of the kernel's spatial polynomial
_MOMENT_ITERATIONS = 15


@dataclass(frozen=True, eq=False)
class SubtractionResult:
    """The difference image and how it was made.

    Attributes
    ----------
    difference
        Difference exposure (electrons, science units), ``wcs`` of the science.
    kernel
        The matching kernel at the detector centre, ``(kernel_size, kernel_size)``.
    kernel_sum
        Photometric scaling of the kernel (the same everywhere).
    kernel_fwhm_px
        FWHM of the central kernel from its second moments (px).
    psf_fwhm_px
        FWHM of the difference image's PSF (the unconvolved image's, from the
        stamps' adaptive moments, as pixelised), or NaN if not measured.
    n_stamps
        Stamps used in the final fit.
    convolved
        ``"template"`` or ``"science"`` (see the module docstring).
    ok
        ``False`` when the kernel could not be fitted and a fallback was used.
    reason
        Empty when ``ok`` and nothing notable; otherwise what happened.
    chi2
        Mean chi² per pixel of the kept stamps after the fit.
    background
        Coefficients of the differential background polynomial.
    """

    difference: Exposure
    kernel: np.ndarray
    kernel_sum: float
    kernel_fwhm_px: float
    psf_fwhm_px: float
    n_stamps: int
    convolved: str
    ok: bool
    reason: str = ""
    chi2: float = math.nan
    background: tuple[float, ...] = field(default_factory=tuple)
    kernel_terms: np.ndarray | None = None
    kernel_order: int = 0
    stamp_xy: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))

    def bright_star_residual(self, difference: Exposure | None = None, half: int = 4) -> float:
        """How well bright stars subtract: the median over the stamps' stars of the rms
        of ``difference / sigma`` within ``half`` px of each (1 is the noise).

        Measured on ``difference`` (default this result's), e.g. after its own
        background is subtracted; NaN without stamps.
        """
        image = difference or self.difference
        xs, ys = self.stamp_xy
        values = []
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            cut = image.image[y - half : y + half + 1, x - half : x + half + 1]
            var = image.variance[y - half : y + half + 1, x - half : x + half + 1]
            ok = np.isfinite(cut) & np.isfinite(var) & (var > 0)
            if ok.sum() > half * half:
                values.append(math.sqrt(float(np.mean(cut[ok] ** 2 / var[ok]))))
        return float(np.median(values)) if values else math.nan

    def kernel_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The matching kernel at pixel positions ``(x, y)``: ``(n, k, k)``."""
        terms = self.kernel_terms if self.kernel_terms is not None else self.kernel[None]
        values = poly_values(np.atleast_1d(x), np.atleast_1d(y), self.difference.shape,
                             self.kernel_order)  # fmt: skip
        return np.asarray(np.tensordot(values, terms, axes=1))

    def difference_psf(self, science_psf: PsfModel, grid: int = 5) -> PsfModel:
        """The difference image's PSF, given the science image's.

        With the template convolved it is the science PSF. With the science
        convolved it is the template's, which the kernel made of the science
        PSF: ``K * P_sci / sum(K)`` at the points of a ``grid`` x ``grid`` net,
        fitted across the detector as the science model is (same order and flux
        scale: the normalised kernel keeps the PSF's sum).
        """
        if self.convolved == "template":
            return science_psf
        ny, nx = self.difference.shape
        gx, gy = np.meshgrid(np.linspace(0, nx - 1, grid), np.linspace(0, ny - 1, grid))
        x, y = gx.ravel(), gy.ravel()
        psfs = science_psf.unit_images_at(x, y)
        kernels = self.kernel_at(x, y)
        half = science_psf.half
        images = np.stack(
            [
                ndimage.convolve(p, k / k.sum(), mode="constant") if k.sum() > 0 else p
                for p, k in zip(psfs, kernels, strict=True)
            ]
        )
        order = min(max(science_psf.order, self.kernel_order), 2)
        model = PsfModel.fit(images[:, : 2 * half + 1, : 2 * half + 1], x, y, (ny, nx), order,
                             ok=science_psf.ok, reason=science_psf.reason)  # fmt: skip
        return model.with_flux_scale(np.asarray(science_psf.flux_scale),
                                     science_psf.flux_scale_order)  # fmt: skip


def _poly_terms(order: int) -> list[tuple[int, int]]:
    return [(a, n - a) for n in range(order + 1) for a in range(n, -1, -1)]


def _norm_coords(n: int) -> np.ndarray:
    half = max((n - 1) / 2.0, 1.0)
    return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) / half


def _clean(exposure: Exposure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and variance with unusable pixels zeroed (float32), and the unusable mask."""
    img = np.asarray(exposure.image, dtype=np.float32)
    var = np.asarray(exposure.variance, dtype=np.float32)
    bad = (exposure.mask & _UNUSABLE) != 0
    with np.errstate(invalid="ignore"):
        if not (np.isfinite(img.sum()) and np.isfinite(var.sum())):
            bad |= ~(np.isfinite(img) & np.isfinite(var))
    if bad.any():
        img = np.where(bad, np.float32(0.0), img)
        var = np.where(bad, np.float32(0.0), var)
    return img, var, bad


def _find_peaks(image: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows, columns of local maxima (3x3) above ``level``, brightest first."""
    ny, nx = image.shape
    idx = np.flatnonzero(image.ravel() > level)
    iy, ix = np.divmod(idx, nx)
    keep = (iy > 0) & (iy < ny - 1) & (ix > 0) & (ix < nx - 1)
    iy, ix = iy[keep], ix[keep]
    val = image[iy, ix]
    peak = np.ones(iy.size, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                peak &= val >= image[iy + dy, ix + dx]
    order = np.argsort(-val[peak], kind="stable")
    return iy[peak][order], ix[peak][order]


# A stamp is used if its star's core (this many px around the peak) is clean and at
# most this fraction of it is masked: real detectors' hot, cold and dead pixels and
# bad columns would otherwise leave few stamps on a sparse field. Masked pixels and
# those the kernel spreads them to get no weight in the fit (_stamp_weights).
_CORE_HALF = 3
_MAX_BAD_FRACTION = 0.1


def _select_stamps(
    ref_img: np.ndarray,
    bad: np.ndarray,
    level: float,
    half: int,
    max_stamps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Centres of non-overlapping stamps on bright peaks, spread over the detector.

    A stamp's star core must be clean and at most ``_MAX_BAD_FRACTION`` of it masked.
    """
    ny, nx = ref_img.shape
    iy, ix = _find_peaks(ref_img, level)
    inside = (iy >= half) & (iy < ny - half) & (ix >= half) & (ix < nx - half)
    iy, ix = iy[inside], ix[inside]
    cell = (iy * _GRID // ny) * _GRID + ix * _GRID // nx
    quota = max(1, math.ceil(max_stamps / _GRID**2))
    chosen: list[int] = []
    taken_y: list[int] = []
    taken_x: list[int] = []
    per_cell = np.zeros(_GRID**2, dtype=int)
    for limit in (quota, max_stamps):
        for i in range(iy.size):
            if len(chosen) >= max_stamps:
                break
            if per_cell[cell[i]] >= limit or i in chosen:
                continue
            y, x = int(iy[i]), int(ix[i])
            if (
                taken_y
                and np.min(np.maximum(np.abs(np.array(taken_y) - y), np.abs(np.array(taken_x) - x)))
                <= 2 * half
            ):
                continue
            if bad[y - _CORE_HALF : y + _CORE_HALF + 1, x - _CORE_HALF : x + _CORE_HALF + 1].any():
                continue
            if bad[y - half : y + half + 1, x - half : x + half + 1].mean() > _MAX_BAD_FRACTION:
                continue
            chosen.append(i)
            taken_y.append(y)
            taken_x.append(x)
            per_cell[cell[i]] += 1
    return np.array(taken_y, dtype=np.intp), np.array(taken_x, dtype=np.intp)


def _stamp_weights(
    bad: np.ndarray, ys: np.ndarray, xs: np.ndarray, shalf: int, khalf: int
) -> np.ndarray:
    """Per stamp pixel: False where it is masked or within the kernel's reach of a mask.

    The convolved image is wrong up to ``khalf`` px from a zeroed (masked) pixel.
    """
    ext = shalf + khalf
    size = 2 * khalf + 1
    out = []
    for y, x in zip(ys, xs, strict=True):
        cut = bad[y - ext : y + ext + 1, x - ext : x + ext + 1]
        if cut.any():
            cut = ndimage.maximum_filter(cut, size=size, mode="constant", cval=False)
        out.append(~cut[khalf : khalf + 2 * shalf + 1, khalf : khalf + 2 * shalf + 1])
    return np.stack(out)


def _cut(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, half: int) -> np.ndarray:
    return np.stack(
        [
            image[y - half : y + half + 1, x - half : x + half + 1]
            for y, x in zip(ys, xs, strict=True)
        ]
    ).astype(np.float64)


def _moment_sigma(stamps: np.ndarray) -> np.ndarray:
    """Adaptive (Gaussian-weighted, iterated) moment sigma (px) of each stamp's star."""
    n, size, _ = stamps.shape
    off = np.arange(size, dtype=np.float64) - size // 2
    u, v = off[None, None, :], off[None, :, None]
    sig2 = np.full(n, 4.0)
    cx = np.zeros(n)
    cy = np.zeros(n)
    for _ in range(_MOMENT_ITERATIONS):
        r2 = (u - cx[:, None, None]) ** 2 + (v - cy[:, None, None]) ** 2
        wi = np.exp(-r2 / (2.0 * sig2[:, None, None])) * stamps
        s = wi.sum(axis=(1, 2))
        s = np.where(s > 0, s, np.nan)
        cx = np.clip(np.nan_to_num((wi * u).sum(axis=(1, 2)) / s), -2.0, 2.0)
        cy = np.clip(np.nan_to_num((wi * v).sum(axis=(1, 2)) / s), -2.0, 2.0)
        m2 = 0.5 * (wi * r2).sum(axis=(1, 2)) / s
        # For a Gaussian of sigma² under a weight of sigma_w², m2 = 1/(1/sigma² + 1/sigma_w²).
        with np.errstate(divide="ignore", invalid="ignore"):
            new = 1.0 / (1.0 / m2 - 1.0 / sig2)
        sig2 = np.where(np.isfinite(new) & (new > 0), np.clip(new, 0.09, 400.0), np.nan)
        sig2 = np.where(np.isnan(sig2), 4.0, sig2) if np.isnan(sig2).all() else sig2
    return np.sqrt(sig2)


@dataclass(frozen=True)
class _Basis:
    """Separable raw basis functions ``gx ⊗ gy`` and the linear map to the final basis."""

    gauss: list[tuple[float, int, int]]  # (sigma, i, j) per raw basis function
    taps: dict[tuple[float, int], np.ndarray]  # (sigma, power) -> 1-D taps
    transform: np.ndarray  # final basis k = sum_r transform[k, r] raw r

    def images(self) -> np.ndarray:
        raw = np.stack([np.outer(self.taps[(s, j)], self.taps[(s, i)]) for s, i, j in self.gauss])
        return np.tensordot(self.transform, raw, axes=1)


def _make_basis(sigmas: tuple[float, ...], degrees: tuple[int, ...], half: int) -> _Basis:
    off = np.arange(-half, half + 1, dtype=np.float64)
    gauss, taps = [], {}
    for s, deg in zip(sigmas, degrees, strict=True):
        for p in range(deg + 1):
            taps[(s, p)] = np.exp(-0.5 * (off / s) ** 2) * (off / s) ** p
        gauss += [(s, i, n - i) for n in range(deg + 1) for i in range(n, -1, -1)]
    raw = np.stack([np.outer(taps[(s, j)], taps[(s, i)]) for s, i, j in gauss])
    n = len(gauss)
    transform = np.eye(n)
    sums = raw.sum(axis=(1, 2))
    transform[0] /= sums[0]
    for k in range(1, n):
        # Zero-sum: subtract the (unit-sum) first Gaussian; then unit L2 norm for conditioning.
        transform[k] -= sums[k] * transform[0]
        transform[k] /= np.linalg.norm(np.tensordot(transform[k], raw, axes=1))
    return _Basis(gauss, taps, transform)


def _convolve_stamps(stamps: np.ndarray, basis: _Basis, half: int) -> np.ndarray:
    """``(n, K, s, s)`` convolutions of (kernel-padded) stamps with the final basis."""
    xpass = {
        key: ndimage.convolve1d(stamps, t, axis=2, mode="constant") for key, t in basis.taps.items()
    }
    inner = (slice(None), slice(half, -half), slice(half, -half))
    raw = np.stack(
        [
            ndimage.convolve1d(xpass[(s, i)], basis.taps[(s, j)], axis=1, mode="constant")[inner]
            for s, i, j in basis.gauss
        ],
        axis=1,
    )
    return np.tensordot(raw, basis.transform, axes=([1], [1])).transpose(0, 3, 1, 2)


def _dilate(mask: np.ndarray, half: int) -> np.ndarray:
    """The mask with the spreading bits dilated by ``half`` px (a square)."""
    out = mask.copy()
    for bit in _SPREAD:
        plane = (mask & np.uint32(bit)) != 0
        if not plane.any():
            continue
        grown = ndimage.maximum_filter1d(plane.view(np.uint8), 2 * half + 1, axis=0)
        grown = ndimage.maximum_filter1d(grown, 2 * half + 1, axis=1)
        out |= np.where(grown != 0, np.uint32(bit), np.uint32(0))
    return out


def _fallback_kernel(sigma: float, half: int) -> np.ndarray:
    off = np.arange(-half, half + 1, dtype=np.float64)
    if sigma < 0.3:
        kernel = np.zeros((2 * half + 1, 2 * half + 1))
        kernel[half, half] = 1.0
        return kernel
    g = np.exp(-0.5 * (off / sigma) ** 2)
    kernel = np.outer(g, g)
    return kernel / kernel.sum()


def _kernel_fwhm(kernel: np.ndarray) -> float:
    half = kernel.shape[0] // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    total = kernel.sum()
    if total <= 0:
        return math.nan
    r2 = off[None, :] ** 2 + off[:, None] ** 2
    return FWHM_PER_SIGMA * math.sqrt(max(float((kernel * r2).sum() / total) / 2.0, 0.0))


def _normal_equations(
    design: np.ndarray, target: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-stamp ``A^T W A`` and ``A^T W b``: ``(n, p, p)`` and ``(n, p)``."""
    aw = (design * weight[:, :, None]).transpose(0, 2, 1)
    return aw @ design, (aw @ target[:, :, None])[:, :, 0]


def _solve(ata: np.ndarray, atb: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(ata, atb)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(ata, atb, rcond=None)[0]


def _fit_kernel(
    design: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    clip_sigma: float,
    ata: np.ndarray,
    atb: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares over all kept stamps, dropping outlier stamps (at most 3 rounds).

    ``ata``, ``atb``: the stamps' normal equations (:func:`_normal_equations`).
    Returns the coefficients, which stamps were kept and every stamp's mean chi².
    """
    keep = np.ones(design.shape[0], dtype=bool)
    coef = _solve(ata.sum(axis=0), atb.sum(axis=0))
    chi2 = np.zeros(design.shape[0])
    # Not astropy's sigma_clip: the kernel is refitted to the kept stamps between
    # rounds (every round clips new chi² values), only the high side is clipped, and
    # a clip that would leave fewer than 3 stamps is not applied.
    for _ in range(4):
        coef = _solve(ata[keep].sum(axis=0), atb[keep].sum(axis=0))
        resid = target - design @ coef
        # Per stamp, over the pixels that count (masked ones have no weight).
        chi2 = (resid**2 * weight).sum(axis=1) / np.maximum((weight > 0).sum(axis=1), 1)
        med = float(np.median(chi2[keep]))
        spread = float(mad_std(chi2[keep]))
        new_keep = keep & (chi2 <= med + clip_sigma * max(spread, 0.02 * med))
        if new_keep.sum() == keep.sum() or new_keep.sum() < 3:
            break
        keep = new_keep
    return coef, keep, chi2


def _order_columns(
    nbasis: int, spatial: list[tuple[int, int]], n_bg: int, order: int
) -> np.ndarray:
    """The design's columns of a kernel varying only to ``order`` (and the background's).

    Columns are the constant ``B_0``, then ``B_k P_m`` basis-major, then the background.
    """
    low = [m for m, (a, b) in enumerate(spatial) if a + b <= order]
    varied = [1 + k * len(spatial) + m for k in range(nbasis - 1) for m in low]
    first_bg = 1 + (nbasis - 1) * len(spatial)
    return np.array([0, *varied, *range(first_bg, first_bg + n_bg)])


def _chosen_order(
    ata: np.ndarray,
    atb: np.ndarray,
    btb: float,
    n_pixels: int,
    nbasis: int,
    spatial: list[tuple[int, int]],
    n_bg: int,
) -> int:
    """The spatial order with the least Bayesian information criterion on the stamps.

    ``chi² + p ln(n)`` (``p`` free parameters, ``n`` weighted pixels; ``ata``, ``atb``,
    ``btb`` the kept stamps' summed normal equations and weighted target power): a
    higher order is taken only when it lowers the stamps' chi² by more than its extra
    terms would by fitting noise. A constant PSF gives order 0; a PSF whose shape
    changes across the detector (and so the kernel's) keeps the terms it needs.
    """
    order = max((a + b for a, b in spatial), default=0)
    best, best_bic = order, math.inf
    for o in range(order + 1):
        cols = _order_columns(nbasis, spatial, n_bg, o)
        a_o, b_o = ata[np.ix_(cols, cols)], atb[cols]
        c = _solve(a_o, b_o)
        chi2 = btb - 2.0 * float(c @ b_o) + float(c @ a_o @ c)
        bic = chi2 + cols.size * math.log(max(n_pixels, 2))
        if bic < best_bic:
            best, best_bic = o, bic
    return best


def _poly_image(
    coef: np.ndarray, terms: list[tuple[int, int]], xn: np.ndarray, yn: np.ndarray
) -> np.ndarray:
    out = np.zeros((yn.size, xn.size), dtype=np.float32)
    for c, (a, b) in zip(coef, terms, strict=True):
        out += (np.float32(c) * (yn[:, None] ** b) * (xn[None, :] ** a)).astype(np.float32)
    return out


def subtract_images(
    science: Exposure,
    template: Exposure,
    *,
    kernel_size: int = 21,
    spatial_order: int = 2,
    background_order: int = 1,
    basis_sigmas: tuple[float, ...] | None = None,
    basis_degrees: tuple[int, ...] = (4, 2, 2),
    min_peak_snr: float = 30.0,
    max_stamps: int = 100,
    stamp_half: int | None = None,
    clip_sigma: float = 3.0,
    workers: int | None = None,
) -> SubtractionResult:
    """PSF-match a template to a science exposure (or the reverse) and difference them.

    Parameters
    ----------
    science
        Calibrated, background-subtracted science exposure (electrons); not modified.
    template
        Template on the science grid (:func:`ppray.science.warp.warp_templates`),
        background-subtracted, in the science's units; ``NO_DATA`` where missing.
    kernel_size
        Side of the matching kernel (odd, px).
    spatial_order
        Order of the polynomial in detector ``x, y`` by which the kernel's shape varies.
    background_order
        Order of the fitted differential background polynomial.
    basis_sigmas
        Sigmas (px) of the basis Gaussians; default 0.5, 1 and 2 times the
        matching sigma (at least 0.7 px), measured from the stamps.
    basis_degrees
        Polynomial degree for each basis Gaussian.
    min_peak_snr
        Stamps are centred on template peaks above this many noise sigmas.
    max_stamps
        Most stamps to fit.
    stamp_half
        Half-size of the fitted stamps (px); default ``kernel_size // 2 + 5``.
    clip_sigma
        Stamps whose chi² is this many robust sigmas above the median are dropped.
    workers
        FFT threads (default 1).

    Returns
    -------
    SubtractionResult
        The difference exposure and the kernel's summary (module docstring). With
        fewer than 3 usable stamps a Gaussian kernel of the measured matching
        width (or a delta) is used and ``ok`` is ``False``.

    Raises
    ------
    ValueError
        For different shapes or an even or too small ``kernel_size``.
    """
    if science.shape != template.shape:
        raise ValueError(f"science {science.shape} and template {template.shape} differ in shape")
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 3, not {kernel_size}")
    if len(basis_degrees) != len(basis_sigmas or (0.0, 0.0, 0.0)):
        raise ValueError("basis_degrees needs one degree per basis sigma")
    khalf = kernel_size // 2
    shalf = stamp_half if stamp_half is not None else khalf + 5
    ext = shalf + khalf
    ny, nx = science.shape
    sci, var_sci, bad_sci = _clean(science)
    tmp, var_tmp, bad_tmp = _clean(template)
    bad = bad_sci | bad_tmp
    sub = (slice(None, None, 7), slice(None, None, 7))
    good_sub = ~bad[sub]
    noise = (
        math.sqrt(
            float(np.median(var_sci[sub][good_sub])) + float(np.median(var_tmp[sub][good_sub]))
        )
        if good_sub.any()
        else math.inf
    )
    ys, xs = _select_stamps(tmp, bad, min_peak_snr * noise, ext, max_stamps)
    reasons = []

    sig_sci = sig_tmp = math.nan
    if ys.size:
        sig_sci = float(np.nanmedian(_moment_sigma(_cut(sci, ys, xs, shalf))))
        sig_tmp = float(np.nanmedian(_moment_sigma(_cut(tmp, ys, xs, shalf))))
    convolve_template = not sig_tmp > sig_sci
    if convolve_template:
        src, var_src, ref, src_mask, ref_mask = tmp, var_tmp, sci, template.mask, science.mask
        sig_src, sig_ref = sig_tmp, sig_sci
    else:
        src, var_src, ref, src_mask, ref_mask = sci, var_sci, tmp, science.mask, template.mask
        sig_src, sig_ref = sig_sci, sig_tmp
        reasons.append("template broader than science: convolved the science image")
    sigma_match = math.sqrt(max(sig_ref**2 - sig_src**2, 0.0)) if ys.size else 0.0

    xn, yn = _norm_coords(nx), _norm_coords(ny)
    # Each order of the kernel's variation needs stamps to pin it: with too few, the
    # extra terms trade the photometric scaling against the background (a sparse
    # 512 px field at order 2 got the kernel sum 6% wrong).
    order = spatial_order
    while order > 0 and ys.size < _STAMPS_PER_TERM * len(_poly_terms(order)):
        order -= 1
    if order < spatial_order and ys.size >= 3:
        reasons.append(f"only {ys.size} stamps: kernel varies to order {order}")
    spatial = _poly_terms(order)
    bg_terms = _poly_terms(background_order)
    ok = ys.size >= 3
    chi2 = math.nan
    n_used = 0
    bg_coef = np.zeros(len(bg_terms))
    if ok:
        sigmas = basis_sigmas or tuple(max(sigma_match, 0.7) * f for f in (0.5, 1.0, 2.0))
        basis = _make_basis(tuple(sigmas), tuple(basis_degrees), khalf)
        conv = _convolve_stamps(_cut(src, ys, xs, ext), basis, khalf)
        n, nbasis = conv.shape[:2]
        off = np.arange(-shalf, shalf + 1)
        px = xn[np.clip(xs[:, None] + off[None, :], 0, nx - 1)]  # (n, s)
        py = yn[np.clip(ys[:, None] + off[None, :], 0, ny - 1)]
        poly_s = np.stack([py[:, :, None] ** b * px[:, None, :] ** a for a, b in spatial], -1)
        poly_b = np.stack([py[:, :, None] ** b * px[:, None, :] ** a for a, b in bg_terms], -1)
        npix = (2 * shalf + 1) ** 2
        conv_flat = conv.transpose(0, 2, 3, 1).reshape(n, npix, nbasis)
        poly_s = poly_s.reshape(n, npix, -1)
        varied = conv_flat[:, :, 1:, None] * poly_s[:, :, None, :]
        design = np.concatenate(
            [conv_flat[:, :, :1], varied.reshape(n, npix, -1), poly_b.reshape(n, npix, -1)], axis=2
        )
        target = _cut(ref, ys, xs, shalf).reshape(n, npix)
        var_st = (_cut(var_sci, ys, xs, shalf) + _cut(var_tmp, ys, xs, shalf)).reshape(n, npix)
        weight = np.where(var_st > 0, 1.0 / np.where(var_st > 0, var_st, 1.0), 0.0)
        weight *= _stamp_weights(bad, ys, xs, shalf, khalf).reshape(n, npix)
        ata, atb = _normal_equations(design, target, weight)
        coef, keep, chi2s = _fit_kernel(design, target, weight, clip_sigma, ata, atb)
        # Each spatial term costs one convolution of the whole image: the kernel varies
        # only to the order the stamps show it does.
        ata_k, atb_k = ata[keep].sum(axis=0), atb[keep].sum(axis=0)
        btb = float(np.sum(target[keep] ** 2 * weight[keep]))
        n_pix = int(np.count_nonzero(weight[keep]))
        chosen = _chosen_order(ata_k, atb_k, btb, n_pix, nbasis, spatial, len(bg_terms))
        if chosen < order:
            columns = _order_columns(nbasis, spatial, len(bg_terms), chosen)
            coef = _solve(ata_k[np.ix_(columns, columns)], atb_k[columns])
            resid = target - design[:, :, columns] @ coef
            chi2s = (resid**2 * weight).sum(axis=1) / np.maximum((weight > 0).sum(axis=1), 1)
            spatial = _poly_terms(chosen)
        n_used, chi2 = int(keep.sum()), float(chi2s[keep].mean())
        images = basis.images()
        a = coef[1 : 1 + (nbasis - 1) * len(spatial)].reshape(nbasis - 1, len(spatial))
        kernels = [np.tensordot(a[:, m], images[1:], axes=1) for m in range(len(spatial))]
        kernels[0] = kernels[0] + coef[0] * images[0]
        bg_coef = coef[1 + (nbasis - 1) * len(spatial) :]
    else:
        reasons.append(f"only {ys.size} usable stamps: fallback Gaussian kernel")
        kernels = [_fallback_kernel(sigma_match, khalf)]
        spatial = _poly_terms(0)

    kernel_c = kernels[0]  # the normalised coordinates are 0 at the centre
    with scipy.fft.set_workers(workers or 1):
        matched = np.zeros((ny, nx), dtype=np.float32)
        parts = convolve_same(src, kernels)
        for (a_pow, b_pow), part in zip(spatial, parts, strict=True):
            if a_pow or b_pow:
                part *= (yn[:, None] ** b_pow).astype(np.float32)
                part *= (xn[None, :] ** a_pow).astype(np.float32)
            matched += part
        del parts
        (var_matched,) = convolve_same(var_src, [kernel_c**2])
    matched += _poly_image(bg_coef, bg_terms, xn, yn)
    ksum = float(kernel_c.sum())
    mask = ref_mask | _dilate(src_mask, khalf)
    edge = np.zeros((ny, nx), dtype=bool)
    edge[:khalf], edge[-khalf:], edge[:, :khalf], edge[:, -khalf:] = True, True, True, True
    mask[edge] |= np.uint32(MaskBit.EDGE)
    with np.errstate(invalid="ignore"):
        if convolve_template:
            diff = np.asarray(science.image, dtype=np.float32) - matched
            var = np.asarray(science.variance, dtype=np.float32) + var_matched
        else:
            scale = np.float32(1.0 / ksum) if ksum > 0 else np.float32(1.0)
            diff = (matched - np.asarray(template.image, dtype=np.float32)) * scale
            var = (var_matched + np.asarray(template.variance, dtype=np.float32)) * scale**2
        invalid = ~(np.isfinite(diff) & np.isfinite(var))
    mask[invalid] |= np.uint32(MaskBit.NO_DATA)
    nodata = (mask & np.uint32(MaskBit.NO_DATA)) != 0
    diff[nodata] = np.nan
    var[nodata] = np.nan
    metadata = dict(science.metadata)
    metadata["DIFFCONV"] = "template" if convolve_template else "science"
    difference = Exposure(
        diff.astype(np.float32),
        var.astype(np.float32),
        mask.astype(np.uint32),
        science.wcs,
        metadata,
    )
    return SubtractionResult(
        difference=difference,
        kernel=kernel_c,
        kernel_sum=ksum,
        kernel_fwhm_px=_kernel_fwhm(kernel_c),
        psf_fwhm_px=FWHM_PER_SIGMA * sig_ref if ys.size else math.nan,
        n_stamps=n_used,
        stamp_xy=(xs.copy(), ys.copy()),
        convolved="template" if convolve_template else "science",
        ok=ok,
        reason="; ".join(reasons),
        chi2=chi2,
        background=tuple(float(c) for c in bg_coef),
        kernel_terms=np.stack(kernels),
        kernel_order=max(a + b for a, b in spatial),
    )
