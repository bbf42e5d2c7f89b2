"""The PSF model of one detector: a pixel image that varies across the detector.

A real PSF is elongated and changes in size, shape and direction across a
detector (optics, focus, guiding, the atmosphere). :class:`PsfModel` follows
PSFEx: the PSF is a ``stamp_size`` square pixel image, centred on its middle
pixel, each of whose pixels is a polynomial of order ``order`` in the
normalised detector coordinates ``u, v`` (-1 to 1 across the detector),
``P(x, y) = sum_m c_m u^a v^b``. Order 0 is a constant PSF; a model made from
a Gaussian sigma or one image is constant.

Normalisation: every image the model returns (:meth:`PsfModel.images_at`) sums
to 1 over the stamp divided by the model's *flux scale* at that position, the
ratio of a star's total light (what a large reference aperture holds) to its
PSF flux with a unit-sum stamp. With that scale in the model, a PSF fit
(:func:`ppray.science.psfphot.psf_flux`, DIA and forced photometry alike)
measures total flux directly; it is 1 until an aperture correction has
measured it (:func:`ppray.science.psfphot.aperture_corrections`).

Sub-pixel positions: stamps are shifted with a Lanczos-3 kernel
(:func:`shift_images`), as PSFEx resamples its model; for a PSF of FWHM >= 2 px
that is accurate to a few 1e-3 of the peak.

Size and shape (:meth:`PsfModel.shape_at`): the FWHM as if round is
``2 sqrt(A / pi)`` with ``A`` the area above half the peak (measured on the
image upsampled 8x, with the pixel's own ``1/12 px²`` per axis taken off in
quadrature, so it is the PSF's FWHM, not its pixelised image's); the
ellipticity ``1 - b/a`` and angle come from adaptive second moments, which for
any profile with elliptical isophotes give the isophotes' axis ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.special import erf

from ppray.science.stats import FWHM_PER_SIGMA

__all__ = [
    "PsfLike",
    "PsfModel",
    "PsfShape",
    "adaptive_moments",
    "as_psf_model",
    "gaussian_psf_image",
    "normalized_psf_image",
    "pixel_gaussian",
    "poly_terms",
    "poly_values",
    "shift_images",
]

_LANCZOS_A = 3
_MOMENT_ITERATIONS = 30
_UPSAMPLE = 8
# The half-maximum area of a pixelised Gaussian exceeds the Gaussian's by the pixel's
# variance, 1/12 px² per axis: (FWHM_PER_SIGMA²/12) px² on the squared FWHM.
_PIXEL_FWHM2 = FWHM_PER_SIGMA**2 / 12.0


def poly_terms(order: int) -> list[tuple[int, int]]:
    """Exponents ``(a, b)`` of ``u^a v^b`` for a 2-D polynomial of ``order``, constant first."""
    if order < 0:
        raise ValueError(f"order must be >= 0, not {order}")
    return [(a, n - a) for n in range(order + 1) for a in range(n, -1, -1)]


def poly_values(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """The polynomial terms ``u^a v^b`` at pixel positions, ``(n, n_terms)``.

    ``u, v`` are the positions normalised to -1..1 across a detector of ``shape``
    (``(ny, nx)``, 0-based pixel centres).
    """
    ny, nx = shape
    u = (np.asarray(x, dtype=np.float64) - (nx - 1) / 2.0) / max((nx - 1) / 2.0, 1.0)
    v = (np.asarray(y, dtype=np.float64) - (ny - 1) / 2.0) / max((ny - 1) / 2.0, 1.0)
    return np.stack([u**a * v**b for a, b in poly_terms(order)], axis=-1)


def pixel_gaussian(offset: np.ndarray, sigma: float, half: int) -> np.ndarray:
    """Pixel-integrated 1-D Gaussians over pixels ``-half..half`` around sub-pixel ``offset``.

    Returns ``(len(offset), 2 * half + 1)``: differences of the error function at the
    pixel edges, so each row sums to the enclosed flux and is centred on its offset.
    """
    edges = np.arange(-half, half + 2, dtype=np.float64) - 0.5
    cdf = erf((edges[None, :] - offset[:, None]) / (math.sqrt(2.0) * sigma))
    return np.asarray(0.5 * np.diff(cdf, axis=1))


def gaussian_psf_image(fwhm_px: float, stamp_size: int = 25) -> np.ndarray:
    """A round Gaussian PSF integrated over pixels, centred on the middle pixel, sum 1.

    Parameters
    ----------
    fwhm_px
        FWHM (pixels).
    stamp_size
        Side of the (odd) stamp.

    Returns
    -------
    numpy.ndarray
        ``float64`` ``(stamp_size, stamp_size)``.
    """
    profile = pixel_gaussian(np.zeros(1), fwhm_px / FWHM_PER_SIGMA, stamp_size // 2)[0]
    image = np.outer(profile, profile)
    return image / image.sum()


def normalized_psf_image(psf: np.ndarray) -> np.ndarray:
    """A PSF image checked (square, odd, finite, positive sum) and scaled to unit sum.

    Raises
    ------
    ValueError
        Saying which of those it is not.
    """
    kernel = np.asarray(psf, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 != 1:
        raise ValueError(f"a PSF image must be square with an odd size, not {kernel.shape}")
    if not (np.isfinite(kernel).all() and kernel.sum() > 0):
        raise ValueError("a PSF image must be finite with a positive sum")
    return kernel / kernel.sum()


def _lanczos_matrices(offset: np.ndarray, size: int) -> np.ndarray:
    """``(n, size, size)`` 1-D resampling matrices that move a profile by ``offset`` px.

    Row ``i`` samples the input at ``i - offset`` with a Lanczos-3 kernel; rows are
    normalised to sum 1 so that a constant stays constant near the stamp's edge.
    """
    grid = np.arange(size, dtype=np.float64)
    t = grid[None, :, None] - offset[:, None, None] - grid[None, None, :]
    weights = np.sinc(t) * np.sinc(t / _LANCZOS_A) * (np.abs(t) < _LANCZOS_A)
    sums = weights.sum(axis=2, keepdims=True)
    return np.asarray(weights / np.where(sums != 0, sums, 1.0))


def shift_images(images: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Shift each image of ``(n, k, k)`` by ``(dx, dy)`` px (content moves towards +x, +y).

    Lanczos-3 resampling, separable, one small matrix product per axis and image;
    meant for shifts within a pixel or two (the PSF stamps' sub-pixel offsets).
    """
    images = np.asarray(images, dtype=np.float64)
    n, ky, kx = images.shape
    dx = np.broadcast_to(np.asarray(dx, dtype=np.float64), (n,))
    dy = np.broadcast_to(np.asarray(dy, dtype=np.float64), (n,))
    if not (np.any(dx) or np.any(dy)):
        return images.copy()
    my = _lanczos_matrices(dy, ky)
    mx = _lanczos_matrices(dx, kx)
    return np.asarray(my @ images @ mx.transpose(0, 2, 1))


def adaptive_moments(
    images: np.ndarray,
    sigma0: float,
    usable: np.ndarray | None = None,
    *,
    recentre: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Adaptive second moments of stamps, about their middle pixel or their centroid.

    The weight is an elliptical Gaussian that follows the measured shape (HSM's
    iteration): for a Gaussian object the weighted moments converge to half
    its covariance, so twice them is returned.

    Parameters
    ----------
    images
        ``(n, k, k)`` stamps.
    sigma0
        Starting weight sigma (px).
    usable
        ``(n, k, k)`` pixels that count (default: all).
    recentre
        Move the weight's centre to the weighted centroid each iteration (for
        stars; PSF images are centred already). The centroid stays within a
        quarter of the stamp.

    Returns
    -------
    ixx, iyy, ixy, ok, xc, yc
        The covariance (px²; NaN where it failed), whether it converged, and the
        centroid's offset from the middle pixel (px; 0 unless ``recentre``).
    """
    stamps = np.asarray(images, dtype=np.float64)
    n, size, _ = stamps.shape
    half = size // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    gx, gy = off[None, None, :], off[None, :, None]
    use = np.ones_like(stamps) if usable is None else usable.astype(np.float64)
    wxx = np.full(n, sigma0**2)
    wyy = wxx.copy()
    wxy = np.zeros(n)
    xc, yc = np.zeros(n), np.zeros(n)
    lo, hi = 0.05, float(half) ** 2
    good = np.ones(n, dtype=bool)
    mxx = myy = mxy = np.full(n, np.nan)
    for _ in range(_MOMENT_ITERATIONS):
        det = wxx * wyy - wxy**2
        axx, ayy, axy = ((w / det)[:, None, None] for w in (wyy, wxx, wxy))
        dx, dy = gx - xc[:, None, None], gy - yc[:, None, None]
        w = np.exp(-0.5 * (axx * dx**2 + ayy * dy**2 - 2.0 * axy * dx * dy)) * use * stamps
        i0 = w.sum(axis=(1, 2))
        good &= i0 > 0
        i0 = np.where(i0 > 0, i0, 1.0)
        mx = (w * dx).sum(axis=(1, 2)) / i0 if recentre else np.zeros(n)
        my = (w * dy).sum(axis=(1, 2)) / i0 if recentre else np.zeros(n)
        mxx = (w * dx**2).sum(axis=(1, 2)) / i0 - mx**2
        myy = (w * dy**2).sum(axis=(1, 2)) / i0 - my**2
        mxy = (w * dx * dy).sum(axis=(1, 2)) / i0 - mx * my
        good &= (mxx > 0) & (myy > 0) & (mxx * myy - mxy**2 > 0)
        new_xx = np.where(good, np.clip(2.0 * mxx, lo, hi), wxx)
        new_yy = np.where(good, np.clip(2.0 * myy, lo, hi), wyy)
        lim = 0.99 * np.sqrt(new_xx * new_yy)
        new_xy = np.where(good, np.clip(2.0 * mxy, -lim, lim), wxy)
        change = np.abs(new_xx - wxx) + np.abs(new_yy - wyy) + np.abs(new_xy - wxy)
        change += np.abs(mx) + np.abs(my)
        wxx, wyy, wxy = new_xx, new_yy, new_xy
        xc = np.clip(xc + np.where(good, mx, 0.0), -half / 2, half / 2)
        yc = np.clip(yc + np.where(good, my, 0.0), -half / 2, half / 2)
        if np.all(change[good] < 1e-6 * (wxx + wyy)[good]):
            break
    ixx, iyy, ixy = (np.where(good, 2.0 * m, np.nan) for m in (mxx, myy, mxy))
    return ixx, iyy, ixy, good, xc, yc


@dataclass(frozen=True)
class PsfShape:
    """Size and shape of the PSF at some positions (arrays of one length).

    ``fwhm_px`` is as if round (the geometric mean of the major and minor axes'
    FWHM); ``ellipticity`` is ``1 - b/a``; ``angle_deg`` the major axis' angle
    from +x towards +y; ``ixx, iyy, ixy`` the PSF's adaptive second moments
    (px²) with the pixel's ``1/12`` taken off.
    """

    fwhm_px: np.ndarray
    ellipticity: np.ndarray
    angle_deg: np.ndarray
    ixx: np.ndarray
    iyy: np.ndarray
    ixy: np.ndarray


def _half_max_fwhm(images: np.ndarray) -> np.ndarray:
    """FWHM as if round from the area above half the peak, the pixel taken off."""
    out = np.empty(images.shape[0])
    for i, image in enumerate(images):
        fine = ndimage.zoom(image, _UPSAMPLE, order=3, mode="nearest", grid_mode=True)
        area = np.count_nonzero(fine >= 0.5 * fine.max()) / _UPSAMPLE**2
        fwhm2 = 4.0 * area / math.pi - _PIXEL_FWHM2
        out[i] = math.sqrt(fwhm2) if fwhm2 > 0 else math.nan
    return out


def _shape_of(images: np.ndarray, sigma0: float) -> PsfShape:
    ixx, iyy, ixy, *_ = adaptive_moments(images, sigma0)
    ixx, iyy = ixx - 1.0 / 12.0, iyy - 1.0 / 12.0
    mean = 0.5 * (ixx + iyy)
    rad = np.sqrt(0.25 * (ixx - iyy) ** 2 + ixy**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ellipticity = 1.0 - np.sqrt(np.maximum(mean - rad, 0.0) / (mean + rad))
    angle = np.degrees(0.5 * np.arctan2(2.0 * ixy, ixx - iyy))
    return PsfShape(_half_max_fwhm(images), ellipticity, angle, ixx, iyy, ixy)


@dataclass(frozen=True, eq=False)
class PsfModel:
    """The PSF of one detector, possibly varying across it (module docstring).

    Attributes
    ----------
    fwhm_px, ellipticity
        At the detector's centre (:class:`PsfShape`); ``fwhm_px`` as if round.
    sigma_px
        ``fwhm_px / FWHM_PER_SIGMA``: the sigma of a Gaussian of that FWHM.
    n_stars
        Stars that built the model (0 for a fallback or a model made from an image).
    image
        The PSF at the detector's centre, ``(stamp_size, stamp_size)``, as
        :meth:`images_at` returns it.
    ok
        Whether it was measured; ``False`` for a fallback.
    reason
        Empty when ``ok``; otherwise why the fallback.
    ixx, iyy, ixy
        Second moments at the centre (px², the pixel's ``1/12`` taken off).
    coefficients
        ``(n_terms, k, k)``: the polynomial coefficients of every pixel (unit-sum
        stamps), terms in :func:`poly_terms` order.
    shape
        ``(ny, nx)`` of the detector the coordinates are normalised over.
    flux_scale
        Polynomial coefficients (terms of ``flux_scale_order``) of the ratio of
        total to unit-stamp PSF flux; ``(1.0,)`` until measured.
    """

    fwhm_px: float
    sigma_px: float
    ellipticity: float
    n_stars: int
    image: np.ndarray
    ok: bool
    reason: str = ""
    ixx: float = math.nan
    iyy: float = math.nan
    ixy: float = 0.0
    coefficients: np.ndarray | None = None
    shape: tuple[int, int] = (1, 1)
    flux_scale: tuple[float, ...] = (1.0,)
    flux_scale_order: int = 0

    @property
    def half(self) -> int:
        """Half-width of the stamp (px)."""
        return int(self.image.shape[0] // 2)

    @property
    def order(self) -> int:
        """Spatial order of the pixel polynomials (0: constant)."""
        if self.coefficients is None:
            return 0
        n = self.coefficients.shape[0]
        return round((math.sqrt(8 * n + 1) - 3) / 2)

    @property
    def varies(self) -> bool:
        """Whether the PSF changes across the detector (shape or flux scale)."""
        return self.order > 0 or self.flux_scale_order > 0

    def scale_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Total flux over unit-stamp PSF flux at ``(x, y)`` (1 until measured)."""
        terms = poly_values(np.atleast_1d(x), np.atleast_1d(y), self.shape, self.flux_scale_order)
        return np.asarray(terms @ np.asarray(self.flux_scale))

    def unit_images_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Unit-sum, centred PSF stamps at positions ``(x, y)``: ``(n, k, k)``."""
        x, y = np.atleast_1d(x), np.atleast_1d(y)
        if self.coefficients is None or self.order == 0:
            base = self.image if self.coefficients is None else self.coefficients[0]
            images = np.broadcast_to(base, (x.size, *base.shape)).astype(np.float64)
        else:
            terms = poly_values(x, y, self.shape, self.order)
            images = np.tensordot(terms, self.coefficients, axes=1)
        sums = images.sum(axis=(1, 2))
        return np.asarray(images / np.where(sums > 0, sums, 1.0)[:, None, None])

    def images_at(
        self,
        x: np.ndarray,
        y: np.ndarray,
        dx: np.ndarray | None = None,
        dy: np.ndarray | None = None,
        half: int | None = None,
    ) -> np.ndarray:
        """PSF stamps at ``(x, y)``, shifted by sub-pixel ``(dx, dy)``, total-flux normalised.

        Parameters
        ----------
        x, y
            Where on the detector (0-based px); arrays of one length.
        dx, dy
            The star's offset from the stamp's central pixel (default 0).
        half
            Half-width of the returned stamps (default the model's): larger ones
            are zero-padded, smaller ones cut.

        Returns
        -------
        numpy.ndarray
            ``(n, 2 half + 1, 2 half + 1)``, each summing to ``1 / scale_at(x, y)``
            over the model's own stamp.
        """
        x, y = np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(y)
        images = self.unit_images_at(x, y) / self.scale_at(x, y)[:, None, None]
        if dx is not None or dy is not None:
            zeros = np.zeros(x.size)
            images = shift_images(
                images,
                zeros if dx is None else np.asarray(dx),
                zeros if dy is None else np.asarray(dy),
            )
        if half is not None and half != self.half:
            if half > self.half:
                pad = half - self.half
                images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
            else:
                cut = self.half - half
                images = images[:, cut:-cut, cut:-cut]
        return images

    def shape_at(self, x: np.ndarray, y: np.ndarray) -> PsfShape:
        """FWHM, ellipticity, angle and moments of the PSF at ``(x, y)``."""
        return _shape_of(self.unit_images_at(x, y), max(self.sigma_px, 0.5))

    def with_flux_scale(self, coefficients: np.ndarray, order: int) -> PsfModel:
        """This model, total-flux normalised by a measured scale polynomial."""
        coefficients = np.atleast_1d(np.asarray(coefficients, dtype=np.float64))
        if coefficients.size != len(poly_terms(order)):
            raise ValueError(f"{coefficients.size} flux-scale coefficients for order {order}")
        new = replace(
            self, flux_scale=tuple(float(c) for c in coefficients), flux_scale_order=order
        )
        centre = np.array([(self.shape[1] - 1) / 2.0]), np.array([(self.shape[0] - 1) / 2.0])
        return replace(new, image=new.images_at(*centre)[0])

    @classmethod
    def from_coefficients(
        cls,
        coefficients: np.ndarray,
        shape: tuple[int, int],
        *,
        n_stars: int = 0,
        ok: bool = True,
        reason: str = "",
    ) -> PsfModel:
        """A model from per-pixel polynomial coefficients ``(n_terms, k, k)``."""
        coefficients = np.asarray(coefficients, dtype=np.float64)
        k = coefficients.shape[-1]
        if coefficients.ndim != 3 or coefficients.shape[1] != k or k % 2 != 1:
            raise ValueError(
                f"coefficients must be (n_terms, k, k) with k odd, not {coefficients.shape}"
            )
        if math.sqrt(8 * coefficients.shape[0] + 1) % 1:
            raise ValueError(f"{coefficients.shape[0]} is not a number of polynomial terms")
        centre_x, centre_y = np.array([(shape[1] - 1) / 2.0]), np.array([(shape[0] - 1) / 2.0])
        probe = cls(
            math.nan, math.nan, math.nan, n_stars, coefficients[0], ok, reason,
            coefficients=coefficients, shape=shape,
        )  # fmt: skip
        image = probe.unit_images_at(centre_x, centre_y)
        # A first sigma for the moments' weight: from the plain second moments.
        off = np.arange(k, dtype=np.float64) - k // 2
        var = 0.5 * float(
            (image[0].sum(axis=0) * off**2).sum() + (image[0].sum(axis=1) * off**2).sum()
        )
        s = _shape_of(image, math.sqrt(max(var, 0.25)))
        fwhm = float(s.fwhm_px[0])
        return replace(
            probe,
            fwhm_px=fwhm,
            sigma_px=fwhm / FWHM_PER_SIGMA,
            ellipticity=float(s.ellipticity[0]),
            image=image[0],
            ixx=float(s.ixx[0]),
            iyy=float(s.iyy[0]),
            ixy=float(s.ixy[0]),
        )

    @classmethod
    def fit(
        cls,
        images: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        shape: tuple[int, int],
        order: int,
        *,
        ok: bool = True,
        reason: str = "",
    ) -> PsfModel:
        """The model whose pixels are the least-squares polynomials through ``images``.

        For a PSF known at a few positions (e.g. a matching kernel convolved with
        the science PSF on a grid): ``images`` ``(n, k, k)`` at ``(x, y)`` on a
        detector of ``shape``; ``n`` must be at least the number of terms of ``order``.
        """
        images = np.asarray(images, dtype=np.float64)
        terms = poly_values(np.asarray(x), np.asarray(y), shape, order)
        if terms.shape[0] < terms.shape[1]:
            raise ValueError(f"{terms.shape[0]} images cannot fit order {order}")
        coef = np.linalg.lstsq(terms, images.reshape(images.shape[0], -1), rcond=None)[0]
        coefficients = coef.reshape(terms.shape[1], *images.shape[1:])
        return cls.from_coefficients(coefficients, shape, ok=ok, reason=reason)

    @classmethod
    def constant(
        cls, image: np.ndarray, *, n_stars: int = 0, ok: bool = True, reason: str = ""
    ) -> PsfModel:
        """The same PSF image everywhere (checked and normalised to unit sum)."""
        return cls.from_coefficients(
            normalized_psf_image(image)[None], (1, 1), n_stars=n_stars, ok=ok, reason=reason
        )

    @classmethod
    def gaussian(
        cls, fwhm_px: float, stamp_size: int = 25, *, ok: bool = True, reason: str = ""
    ) -> PsfModel:
        """A round Gaussian PSF of ``fwhm_px`` everywhere (e.g. a fallback)."""
        if not fwhm_px > 0:
            raise ValueError(f"fwhm_px must be > 0, not {fwhm_px!r}")
        sigma = fwhm_px / FWHM_PER_SIGMA
        return cls(
            fwhm_px=float(fwhm_px),
            sigma_px=float(sigma),
            ellipticity=0.0,
            n_stars=0,
            image=gaussian_psf_image(fwhm_px, stamp_size),
            ok=ok,
            reason=reason,
            ixx=sigma**2,
            iyy=sigma**2,
            ixy=0.0,
        )


PsfLike = float | np.ndarray | PsfModel
"""What the photometry and DIA functions accept as a PSF: a Gaussian sigma (px),
one pixel image (odd square, centred), or a :class:`PsfModel`."""


def as_psf_model(psf: PsfLike, stamp_half: int | None = None) -> PsfModel:
    """A :class:`PsfModel` from anything :data:`PsfLike`.

    A Gaussian sigma becomes a round Gaussian on a stamp reaching ``stamp_half``
    px (default ``ceil(5 sigma)``, at least 2).
    """
    if isinstance(psf, PsfModel):
        return psf
    if np.ndim(psf) == 0:
        sigma = float(psf)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"PSF sigma must be finite and > 0, not {psf!r}")
        half = stamp_half if stamp_half is not None else max(math.ceil(5.0 * sigma), 2)
        return PsfModel.gaussian(sigma * FWHM_PER_SIGMA, 2 * half + 1)
    return PsfModel.constant(np.asarray(psf))
