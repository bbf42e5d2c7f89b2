"""PSF photometry and aperture corrections to total flux.

:func:`psf_flux` fits the local PSF's amplitude at fixed positions (linear least
squares with uniform weights: unbiased whatever the noise, with its error from
the variance plane); with a PSF model normalised to total flux
(:attr:`ppray.science.psf.PsfModel.flux_scale`) it measures total flux.
:func:`fit_psf_fluxes` fits the fluxes of neighbours together, so that the
pieces of a blend share its light instead of each taking all of it.

:func:`aperture_corrections` measures, on bright isolated stars, how much of a
star's light a circular aperture of the detection radius and a unit-sum PSF
stamp each miss compared with a large *reference* aperture that holds
(practically) all of it, as smooth functions of the position: a real PSF's
size and wings change across a detector, and so do the fractions. Both ratios
are at least 1 for a total flux; the PSF's one becomes the model's flux scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import sep
from astropy.stats import sigma_clip
from scipy.spatial import cKDTree

from ppray.image import Exposure
from ppray.science.psf import PsfLike, PsfModel, as_psf_model, poly_terms, poly_values
from ppray.science.psfmeasure import PSF_UNUSABLE_BITS, cut_stamps

__all__ = [
    "ApertureCorrection",
    "GroupFit",
    "aperture_corrections",
    "fit_psf_fluxes",
    "psf_flux",
]

# Outer radius of the reference aperture's local-background annulus, beyond it (px).
_ANNULUS_PX = 8.0
# Most sources fitted together (friends of friends beyond it keep single fits).
_MAX_GROUP = 24
# Gauss-Newton steps of a blend's joint fit of fluxes and positions.
_REFINE_STEPS = 6
# Fewest stars per polynomial term of a correction's spatial fit.
_STARS_PER_TERM = 8


def _local_models(
    psf: PsfModel, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PSF at each position, shifted to its sub-pixel offset: models and central pixels."""
    cx, cy = np.rint(x), np.rint(y)
    models = psf.images_at(x, y, dx=x - cx, dy=y - cy)
    return models, cx.astype(np.int64), cy.astype(np.int64)


def psf_flux(
    exposure: Exposure, x: np.ndarray, y: np.ndarray, psf: PsfLike
) -> tuple[np.ndarray, np.ndarray]:
    """PSF fluxes at fixed positions by linear least squares, each source alone.

    The local PSF, shifted to each position, is fitted to the pixels of a
    PSF-sized stamp with uniform weights, leaving out ``BAD``, ``SAT``, ``CR``
    and ``NO_DATA`` pixels: ``flux = sum(P d) / sum(P²)`` and
    ``flux_err² = sum(P² var) / sum(P²)²``. Uniform weights keep the flux
    unbiased (weights from a variance plane that holds each pixel's own noise
    bias it low) and are optimal where the sky dominates the noise.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (electrons).
    x, y
        0-based pixel positions (arrays of one shape).
    psf
        The PSF (a :class:`~ppray.science.psf.PsfModel`, an image or a Gaussian sigma).

    Returns
    -------
    flux, flux_err
        ``float64`` arrays (electrons, total flux for a total-flux-normalised
        model); NaN where the position is not finite or more than half the PSF's
        light falls on unusable or off-image pixels.
    """
    model = as_psf_model(psf)
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    out_shape = x.shape
    x, y = x.ravel(), y.ravel()
    flux = np.full(x.size, np.nan)
    err = np.full(x.size, np.nan)
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if finite.size == 0:
        return flux.reshape(out_shape), err.reshape(out_shape)
    xs, ys = x[finite], y[finite]
    half = model.half
    data, _, _ = cut_stamps(exposure.image, xs, ys, half, 0.0)
    var, _, _ = cut_stamps(exposure.variance, xs, ys, half, np.inf)
    msk, _, _ = cut_stamps(exposure.mask, xs, ys, half, int(PSF_UNUSABLE_BITS))
    usable = ((msk & PSF_UNUSABLE_BITS) == 0) & np.isfinite(var) & np.isfinite(data)
    models, _, _ = _local_models(model, xs, ys)
    model_u = np.where(usable, models, 0.0)
    sum_pp = np.einsum("nij,nij->n", model_u, model_u)
    sum_pd = np.einsum("nij,nij->n", model_u, np.where(usable, data, 0.0))
    sum_ppv = np.einsum("nij,nij->n", model_u * model_u, np.where(usable, var, 0.0))
    covered = model_u.sum(axis=(1, 2)) / np.maximum(models.sum(axis=(1, 2)), 1e-30)
    ok = (covered > 0.5) & (sum_pp > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = sum_pd / sum_pp
        e = np.sqrt(sum_ppv) / sum_pp
    flux[finite[ok]] = f[ok]
    err[finite[ok]] = e[ok]
    return flux.reshape(out_shape), err.reshape(out_shape)


@dataclass(frozen=True)
class GroupFit:
    """PSF fluxes (electrons) of sources fitted with their neighbours, and positions.

    ``x``, ``y`` are the inputs, moved (within ``max_shift_px``) where a blend's
    members were refined; ``refined`` says which.
    """

    flux: np.ndarray
    flux_err: np.ndarray
    x: np.ndarray
    y: np.ndarray
    refined: np.ndarray


def fit_psf_fluxes(
    exposure: Exposure,
    x: np.ndarray,
    y: np.ndarray,
    psf: PsfLike,
    *,
    group_within_fwhm: float | None = None,
    refine_within_fwhm: float = 0.0,
    max_shift_px: float = 1.5,
) -> GroupFit:
    """PSF fluxes at given positions, neighbours fitted together.

    Sources whose PSF stamps overlap (or, with ``group_within_fwhm``, that are
    closer than that many PSF FWHM) form groups (friends of friends, at most
    ``_MAX_GROUP``; a larger chain keeps its single fits); each
    group's fluxes come from one linear least-squares fit of the sum of their
    PSFs to the union of their stamps (uniform weights, as :func:`psf_flux`),
    so two stars a FWHM apart each get their own light, not both the pair's.
    An isolated source gets exactly :func:`psf_flux`'s answer.

    Members of a group closer than ``refine_within_fwhm`` PSF FWHM to another
    member (the pieces of a blend, whose detected centres are pulled by each
    other's light) also have their positions refined: a few Gauss-Newton steps of
    the joint fit of fluxes and positions (DAOPHOT's ALLSTAR idea), each position
    kept within ``max_shift_px`` of where it started.

    Returns
    -------
    GroupFit
        ``flux_err`` is the marginal error from the group's covariance; NaN as
        :func:`psf_flux` gives it for sources too masked to fit alone.
    """
    model = as_psf_model(psf)
    x = np.atleast_1d(np.asarray(x, dtype=np.float64)).ravel().copy()
    y = np.atleast_1d(np.asarray(y, dtype=np.float64)).ravel().copy()
    flux, err = psf_flux(exposure, x, y, model)
    refined = np.zeros(x.size, dtype=bool)
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    pairs = (
        cKDTree(np.c_[x[finite], y[finite]]).query_pairs(
            r=2.0 * model.half if group_within_fwhm is None else group_within_fwhm * model.fwhm_px,
            output_type="ndarray",
        )
        if finite.size >= 2
        else np.zeros((0, 2), dtype=np.int64)
    )
    close = refine_within_fwhm * model.fwhm_px
    for members in _groups(finite.size, pairs):
        # A chain of neighbours in a crowded field can percolate into hundreds: its
        # one fit would be a matrix of gigabytes. Such sources keep their single fits.
        if members.size < 2 or members.size > _MAX_GROUP:
            continue
        idx = finite[members]
        fitted = np.isfinite(flux[idx])  # sources too masked to fit alone stay NaN
        d = np.hypot(x[idx][:, None] - x[idx][None, :], y[idx][:, None] - y[idx][None, :])
        np.fill_diagonal(d, np.inf)
        move = (d.min(axis=1) < close) & fitted
        start = (x[idx].copy(), y[idx].copy())
        for _ in range(_REFINE_STEPS if move.any() else 1):
            solved = _fit_group(exposure, model, x[idx], y[idx], move)
            if solved is None:
                break
            f, e, dx, dy = solved
            flux[idx] = np.where(fitted, f, np.nan)
            err[idx] = np.where(fitted, e, np.nan)
            if not move.any():
                break
            x[idx] = np.clip(x[idx] + dx, start[0] - max_shift_px, start[0] + max_shift_px)
            y[idx] = np.clip(y[idx] + dy, start[1] - max_shift_px, start[1] + max_shift_px)
            refined[idx] |= move
            if np.all(np.hypot(dx, dy) < 1e-3):
                break
    return GroupFit(flux, err, x, y, refined)


def _fit_group(
    exposure: Exposure, model: PsfModel, x: np.ndarray, y: np.ndarray, move: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """One linear fit of a group: fluxes, their errors, and position steps of ``move``.

    The position columns are the PSF's derivatives times the current flux (a
    Gauss-Newton step); without any to move it is the plain joint flux fit.
    None when the group cannot be fitted (off the image, or two sources at one place).
    """
    half = model.half
    ny, nx = exposure.shape
    models, cx, cy = _local_models(model, x, y)
    y0, x0 = int(cy.min()) - half, int(cx.min()) - half
    y1, x1 = int(cy.max()) + half + 1, int(cx.max()) + half + 1
    ys0, xs0, ys1, xs1 = max(y0, 0), max(x0, 0), min(y1, ny), min(x1, nx)
    if ys1 <= ys0 or xs1 <= xs0:
        return None
    data = np.asarray(exposure.image[ys0:ys1, xs0:xs1], dtype=np.float64)
    var = np.asarray(exposure.variance[ys0:ys1, xs0:xs1], dtype=np.float64)
    usable = ((exposure.mask[ys0:ys1, xs0:xs1] & PSF_UNUSABLE_BITS) == 0) & np.isfinite(data)
    usable &= np.isfinite(var)
    n = x.size
    movers = np.flatnonzero(move)
    columns = [models]
    if movers.size:
        # d/dx of a source's model at x_k is minus the stamp's gradient along x.
        columns += [-np.gradient(models[movers], axis=2), -np.gradient(models[movers], axis=1)]
    stamps = np.concatenate(columns)
    owner = np.r_[np.arange(n), movers, movers]
    design = np.zeros((stamps.shape[0], y1 - y0, x1 - x0))
    for k in range(stamps.shape[0]):
        r, c = int(cy[owner[k]]) - half - y0, int(cx[owner[k]]) - half - x0
        design[k, r : r + 2 * half + 1, c : c + 2 * half + 1] = stamps[k]
    design = design[:, ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0]
    a = np.where(usable, design, 0.0).reshape(stamps.shape[0], -1)
    ata = a @ a.T
    if np.linalg.matrix_rank(ata) < ata.shape[0]:
        return None
    inv = np.linalg.inv(ata)
    coef = inv @ (a @ np.where(usable, data, 0.0).ravel())
    cov = inv @ (a * np.where(usable, var, 0.0).ravel()[None, :]) @ a.T @ inv
    f = coef[:n]
    e = np.sqrt(np.maximum(np.diag(cov)[:n], 0.0))
    dx, dy = np.zeros(n), np.zeros(n)
    m = movers.size
    if m:
        with np.errstate(divide="ignore", invalid="ignore"):
            step_x = coef[n : n + m] / f[movers]
            step_y = coef[n + m :] / f[movers]
        ok = np.isfinite(step_x) & np.isfinite(step_y) & (f[movers] > 0)
        dx[movers] = np.where(ok, np.clip(step_x, -0.5, 0.5), 0.0)
        dy[movers] = np.where(ok, np.clip(step_y, -0.5, 0.5), 0.0)
    return f, e, dx, dy


def _groups(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Connected components of ``n`` nodes joined by ``pairs`` (union-find)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(n)])
    order = np.argsort(roots, kind="stable")
    splits = np.flatnonzero(np.diff(roots[order])) + 1
    return np.split(order, splits)


@dataclass(frozen=True)
class ApertureCorrection:
    """Total flux over a measured flux, as a smooth function of the position.

    ``value(x, y) = sum_m coefficients[m] u^a v^b`` (terms of ``order`` over a
    detector of ``shape``). ``n_stars`` stars measured it; 0 means it comes from
    the PSF model alone (too few bright isolated stars).
    """

    coefficients: tuple[float, ...]
    order: int
    shape: tuple[int, int]
    n_stars: int

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The correction at pixel positions ``(x, y)``."""
        terms = poly_values(np.atleast_1d(x), np.atleast_1d(y), self.shape, self.order)
        return np.asarray(terms @ np.asarray(self.coefficients))

    @property
    def centre(self) -> float:
        """The correction at the detector's centre."""
        return float(self.coefficients[0])

    @classmethod
    def constant(cls, value: float, shape: tuple[int, int]) -> ApertureCorrection:
        return cls((float(value),), 0, shape, 0)


def _encircled(image: np.ndarray, radius: float) -> float:
    """Fraction of a centred PSF image's sum within ``radius`` px of its middle."""
    k = image.shape[0]
    half = k // 2
    yy, xx = np.mgrid[:k, :k]
    sub = 5
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    inside = np.zeros((k, k))
    for oy in offs:
        for ox in offs:
            inside += np.hypot(xx + ox - half, yy + oy - half) <= radius
    return float(np.sum(image * inside) / sub**2 / max(float(image.sum()), 1e-30))


def _smooth_fit(
    ratio: np.ndarray,
    error: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    max_order: int,
) -> tuple[np.ndarray, int]:
    """A robust, error-weighted low-order polynomial fit of ``ratio`` over the detector.

    A faint star's reference aperture is mostly sky noise: weighting by the
    ratio's error lets the bright stars set the level. Stars whose residual is
    an outlier in units of its error (a neighbour, a cosmic ray, a trail across
    the aperture or its annulus) are dropped between rounds.
    """
    order = max_order
    while order > 0 and ratio.size < _STARS_PER_TERM * len(poly_terms(order)):
        order -= 1
    terms = poly_values(x, y, shape, order)
    weight = 1.0 / np.maximum(error, 1e-6 * np.abs(ratio))
    keep = np.ones(ratio.size, dtype=bool)
    coef = np.zeros(terms.shape[1])
    for _ in range(5):
        coef = np.linalg.lstsq(
            terms[keep] * weight[keep, None], ratio[keep] * weight[keep], rcond=None
        )[0]
        pull = (ratio - terms @ coef) * weight
        clipped = sigma_clip(
            np.ma.masked_array(pull, ~keep), sigma=3.0, maxiters=1, stdfunc="mad_std"
        )
        new_keep = keep & ~np.ma.getmaskarray(clipped)
        if new_keep.sum() == keep.sum() or new_keep.sum() < terms.shape[1] + 2:
            break
        keep = new_keep
    return coef, order


def _reference_fluxes(
    exposure: Exposure,
    unit: PsfModel,
    stars: tuple[np.ndarray, np.ndarray],
    neighbours: list[np.ndarray],
    others: tuple[np.ndarray, np.ndarray, np.ndarray],
    ref: float,
    radius: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each star's flux in the reference and the detection aperture and the former's
    error (NaN if unusable).

    The PSF models of its neighbours (indices into ``others``: positions and
    fluxes) are subtracted first: in a field of any density a large aperture
    holds other stars.
    """
    xs, ys = stars
    ox, oy, oflux = others
    ny, nx = exposure.shape
    half = unit.half
    reach = math.ceil(ref + _ANNULUS_PX) + half + 1
    total = np.full(xs.size, np.nan)
    small = np.full(xs.size, np.nan)
    total_err = np.full(xs.size, np.nan)
    for k in range(xs.size):
        cx, cy = round(xs[k]), round(ys[k])
        y0, y1 = max(cy - reach, 0), min(cy + reach + 1, ny)
        x0, x1 = max(cx - reach, 0), min(cx + reach + 1, nx)
        cut = np.array(exposure.image[y0:y1, x0:x1], dtype=np.float64)
        cvar = np.ascontiguousarray(exposure.variance[y0:y1, x0:x1], dtype=np.float32)
        bad = (exposure.mask[y0:y1, x0:x1] & PSF_UNUSABLE_BITS) != 0
        near = neighbours[k]
        near = near[np.isfinite(oflux[near])]
        if near.size:
            models, mx, my = _local_models(unit, ox[near], oy[near])
            for m, px, py, f in zip(models, mx, my, oflux[near], strict=True):
                r0, c0 = int(py) - half - y0, int(px) - half - x0
                rs, cs = max(r0, 0), max(c0, 0)
                re, ce = min(r0 + 2 * half + 1, y1 - y0), min(c0 + 2 * half + 1, x1 - x0)
                if re > rs and ce > cs:
                    cut[rs:re, cs:ce] -= f * m[rs - r0 : re - r0, cs - c0 : ce - c0]
        cut32 = np.ascontiguousarray(cut, dtype=np.float32)
        fx, fy = np.array([xs[k] - x0]), np.array([ys[k] - y0])
        # What the background map left (faint stars below detection, the sky under
        # bright ones) is the annulus' level: a large aperture gathers a lot of it.
        t, te, tf = sep.sum_circle(
            cut32,
            fx,
            fy,
            ref,
            var=np.where(bad, np.float32(0.0), cvar),
            mask=bad,
            subpix=5,
            bkgann=(ref + 2.0, ref + _ANNULUS_PX),
        )
        a, _, af = sep.sum_circle(cut32, fx, fy, radius, mask=bad, subpix=5)
        if (int(tf[0]) | int(af[0])) & (sep.APER_TRUNC | sep.APER_HASMASKED):
            continue
        total[k], small[k], total_err[k] = float(t[0]), float(a[0]), float(te[0])
    return total, small, total_err


def aperture_corrections(
    exposure: Exposure,
    sources: pa.Table,
    psf: PsfModel,
    aperture_radius_px: float,
    *,
    reference_radius_px: float | None = None,
    min_snr: float = 50.0,
    min_stars: int = 20,
    spatial_order: int = 2,
) -> tuple[PsfModel, ApertureCorrection]:
    """The PSF model normalised to total flux, and the aperture flux's correction to total.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (electrons).
    sources
        Detections (``x``, ``y``, ``snr``, ``flags``, ``flux``).
    psf
        The PSF model (unit-stamp normalised, from
        :func:`ppray.science.psfmeasure.measure_psf`).
    aperture_radius_px
        Radius of the detection apertures to correct (px).
    reference_radius_px
        The large aperture taken to hold all of a star's light (default 5 PSF FWHM,
        at least 3 times ``aperture_radius_px``).
    min_snr
        Lowest S/N (in the detection aperture) of the stars used.
    min_stars
        Fewest stars for a measured correction: a large aperture gathers light
        from faint neighbours and cosmic rays, which only a median over many
        stars shrugs off.
    spatial_order
        Highest polynomial order of the corrections over the detector.

    Returns
    -------
    psf, aperture
        The model with its flux scale (total over unit-stamp PSF flux) and the
        :class:`ApertureCorrection` for ``aperture_radius_px`` fluxes. With fewer
        than ``min_stars`` usable stars (or an ``ok=False`` PSF) the PSF keeps
        scale 1 and the aperture correction is ``1 / (fraction of the PSF
        stamp inside the aperture)``, with ``n_stars`` 0.
    """
    shape = exposure.shape
    model_value = 1.0 / max(_encircled(psf.image, aperture_radius_px), 1e-6)
    fallback = (psf, ApertureCorrection.constant(model_value, shape))
    if not psf.ok or sources.num_rows == 0:
        return fallback
    ref = (
        float(reference_radius_px)
        if reference_radius_px is not None
        else max(5.0 * psf.fwhm_px, 3.0 * aperture_radius_px)
    )
    outer = ref + _ANNULUS_PX
    x = sources["x"].to_numpy(zero_copy_only=False)
    y = sources["y"].to_numpy(zero_copy_only=False)
    snr = sources["snr"].to_numpy(zero_copy_only=False)
    flags = sources["flags"].to_numpy(zero_copy_only=False)
    flux = sources["flux"].to_numpy(zero_copy_only=False)
    ny, nx = shape
    finite = np.isfinite(x) & np.isfinite(y)
    cand = np.flatnonzero(
        finite & (snr > min_snr) & (flags == 0) & (x > outer) & (x < nx - 1 - outer) & (y > outer)
        & (y < ny - 1 - outer)
    )  # fmt: skip
    if cand.size < min_stars:
        return fallback
    # The ratio is to the unit-stamp flux, whatever scale the model came with.
    unit = psf.with_flux_scale(np.ones(1), 0)
    idx = np.flatnonzero(finite)
    tree = cKDTree(np.c_[x[idx], y[idx]])
    # No neighbour within 2 FWHM (a blend) or brighter than half the star in reach.
    chosen, neighbours = [], []
    for i, near in zip(
        cand, tree.query_ball_point(np.c_[x[cand], y[cand]], outer + unit.half + 1.0), strict=True
    ):
        j = idx[np.asarray(near, dtype=np.int64)]
        j = j[j != i]
        d = np.hypot(x[j] - x[i], y[j] - y[i])
        if np.any(d < 2.0 * psf.fwhm_px) or np.any(np.nan_to_num(flux[j]) > 0.5 * flux[i]):
            continue
        chosen.append(i)
        neighbours.append(j)
    sel = np.asarray(chosen, dtype=np.int64)
    if sel.size < min_stars:
        return fallback
    xs, ys = x[sel], y[sel]
    pflux, _ = psf_flux(exposure, xs, ys, unit)
    # Neighbours as indices into one array of their positions and PSF fluxes.
    others, inverse = np.unique(
        np.concatenate([*neighbours, np.zeros(0, np.int64)]), return_inverse=True
    )
    splits = np.cumsum([n.size for n in neighbours])[:-1]
    local = np.split(inverse, splits) if neighbours else []
    oflux, _ = psf_flux(exposure, x[others], y[others], unit)
    total, small, total_err = _reference_fluxes(
        exposure, unit, (xs, ys), local, (x[others], y[others], oflux), ref, aperture_radius_px
    )
    good = np.isfinite(pflux) & (pflux > 0) & (small > 0) & (total > 0) & (total_err > 0)
    if good.sum() < min_stars:
        return fallback
    n = int(good.sum())
    # The light beyond the PSF's stamp changes little across a detector: a plane.
    psf_coef, psf_order = _smooth_fit(
        total[good] / pflux[good],
        total_err[good] / pflux[good],
        xs[good],
        ys[good],
        shape,
        min(spatial_order, 1),
    )
    if not (np.all(np.isfinite(psf_coef)) and psf_coef[0] > 0):
        return fallback
    scaled = psf.with_flux_scale(psf_coef, psf_order)
    # The aperture's share of the light follows the PSF's size, which changes a lot:
    # its shape across the detector comes from the PSF model (well constrained by
    # all its stars), its level from the stars' reference apertures (one median).
    model = _model_aperture_correction(scaled, radius_px=aperture_radius_px)
    level_coef, _ = _smooth_fit(
        (total[good] / small[good]) / model.at(xs[good], ys[good]),
        total_err[good] / small[good] / model.at(xs[good], ys[good]),
        xs[good],
        ys[good],
        shape,
        0,
    )
    level = float(level_coef[0])
    if not (math.isfinite(level) and level > 0):
        return fallback
    coefficients = tuple(float(c) * level for c in model.coefficients)
    return scaled, ApertureCorrection(coefficients, model.order, shape, n)


def _model_aperture_correction(
    psf: PsfModel, radius_px: float, grid: int = 9
) -> ApertureCorrection:
    """Total over aperture flux as the PSF model says, across the detector.

    Evaluated on a ``grid`` x ``grid`` net and fitted with the model's own order
    (the aperture's share of a PSF image is a smooth function of its pixels).
    """
    ny, nx = psf.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, grid), np.linspace(0, ny - 1, grid))
    x, y = gx.ravel(), gy.ravel()
    images = psf.images_at(x, y)
    values = np.array([1.0 / max(_encircled(im, radius_px) * im.sum(), 1e-6) for im in images])
    order = max(psf.order, psf.flux_scale_order)
    terms = poly_values(x, y, (ny, nx), order)
    coef = np.linalg.lstsq(terms, values, rcond=None)[0]
    return ApertureCorrection(tuple(float(c) for c in coef), order, (ny, nx), 0)
