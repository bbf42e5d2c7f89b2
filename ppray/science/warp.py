"""Resampling exposures onto another pixel grid (template warping).

The pixel-to-pixel mapping (target pixel -> sky -> source pixel) is evaluated
with astropy only on a coarse grid of target nodes (every ``grid_step`` px,
plus the last row and column) and interpolated bilinearly in between. Sky
projections are smooth on that scale: between two TAN grids 0.2 deg apart the
interpolation error is ~1e-5 px at a 64 px step, far below what matters, and the
full-resolution WCS calls (seconds per CCD) are avoided. Bilinear interpolation
on a regular grid is separable, so the fine coordinates are two small matrix
products, ``R_y @ C @ R_x.T``.

Resampling, per plane:

* ``image``: cubic B-spline (``scipy.ndimage`` order 3, prefiltered once on the
  needed sub-box), times the Jacobian determinant of the mapping (target pixel
  area over source pixel area), so that the values stay electrons *per pixel*
  and total fluxes are conserved when the pixel scales differ.
* ``variance``: the nearest source pixel's variance times the Jacobian
  squared, times the sum of the squared cubic-spline interpolation weights for
  the pixel's sub-pixel offset (1 on a source pixel, 0.57 half-way between four),
  so the per-pixel variance of independent input noise is right. The
  covariance that interpolation puts between neighbouring output pixels is
  not kept.
* ``mask``: the nearest source pixel's bits, after OR-ing each source pixel's
  bits into its neighbours within 2 px (the reach of the cubic kernel), so a
  bad pixel flags every output pixel it influences. The spline prefilter
  spreads a little of an outlier further (3% at 3 px): bad pixels should be
  interpolated over (as ISR and cosmic-ray repair do) before warping.

Target pixels that map outside the source (or onto its ``NO_DATA`` pixels)
get ``NO_DATA`` with NaN image and variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage

from ppray.image import Exposure, MaskBit

__all__ = ["PixelMap", "warp_templates", "warp_to"]

# The cubic spline reaches 2 px; its prefilter decays by 0.27 per px, so 12 px of
# extra source around the needed box make the cut-out's edges irrelevant (< 1e-6).
_SPLINE_REACH = 2
_PREFILTER_MARGIN = 12
_NO_DATA = np.uint32(MaskBit.NO_DATA)


class PixelMap:
    """Target-pixel -> source-pixel coordinates, evaluated on a coarse grid.

    Parameters
    ----------
    source_wcs, target_wcs
        WCS of the image to resample and of the grid to resample onto (0-based pixels).
    target_shape
        Numpy shape ``(ny, nx)`` of the target grid.
    grid_step
        Spacing of the coarse nodes (px).
    """

    def __init__(
        self, source_wcs: WCS, target_wcs: WCS, target_shape: tuple[int, int], grid_step: int = 64
    ) -> None:
        if grid_step < 2:
            raise ValueError(f"grid_step must be >= 2, not {grid_step}")
        ny, nx = target_shape
        self.shape = (int(ny), int(nx))
        self.nodes_y = _nodes(ny, grid_step)
        self.nodes_x = _nodes(nx, grid_step)
        gx, gy = np.meshgrid(self.nodes_x, self.nodes_y)
        ra, dec = target_wcs.all_pix2world(gx, gy, 0)
        with np.errstate(invalid="ignore"):
            sx, sy = source_wcs.all_world2pix(ra, dec, 0)
        self.x = np.asarray(sx, dtype=np.float64)
        self.y = np.asarray(sy, dtype=np.float64)
        # Jacobian determinant d(source)/d(target): target pixel area in source pixels.
        dxdv, dxdu = np.gradient(self.x, self.nodes_y, self.nodes_x)
        dydv, dydu = np.gradient(self.y, self.nodes_y, self.nodes_x)
        self.jacobian = np.abs(dxdu * dydv - dxdv * dydu)

    def fine(
        self, coarse: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)
    ) -> np.ndarray:
        """Bilinear interpolation of a coarse-node array onto target pixels ``[rows, cols]``."""
        ry = _interp_matrix(self.shape[0], self.nodes_y)[rows]
        rx = _interp_matrix(self.shape[1], self.nodes_x)[cols]
        return np.asarray(ry @ coarse.astype(np.float32) @ rx.T, dtype=np.float32)


def _nodes(n: int, step: int) -> np.ndarray:
    nodes = np.arange(0, max(n - 1, 1), step, dtype=np.float64)
    return np.append(nodes, float(max(n - 1, 0))) if nodes[-1] < n - 1 else nodes


def _interp_matrix(n: int, nodes: np.ndarray) -> np.ndarray:
    """``(n, len(nodes))`` matrix of linear-interpolation weights at pixels ``0..n-1``."""
    matrix = np.zeros((n, nodes.size), dtype=np.float32)
    if nodes.size == 1:
        matrix[:, 0] = 1.0
        return matrix
    pix = np.arange(n, dtype=np.float64)
    i = np.clip(np.searchsorted(nodes, pix, side="right") - 1, 0, nodes.size - 2)
    frac = (pix - nodes[i]) / (nodes[i + 1] - nodes[i])
    rows = np.arange(n)
    matrix[rows, i] = 1.0 - frac
    matrix[rows, i + 1] = frac
    return matrix


def _or_dilate(mask: np.ndarray, reach: int) -> np.ndarray:
    """Each pixel's bits OR-ed into every pixel within ``reach`` (a square), same shape."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for shift in range(1, min(reach, n - 1) + 1):
            lo = [slice(None), slice(None)]
            hi = [slice(None), slice(None)]
            lo[axis], hi[axis] = slice(0, n - shift), slice(shift, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _spline_noise_factor(offset: np.ndarray) -> np.ndarray:
    """Sum of squared 1-D cubic-spline interpolation weights, in place on ``offset``.

    ``offset`` is the coordinate minus its nearest integer; the sum depends on
    ``g = |offset| - offset²`` (= f (1 - f) for the fraction ``f`` above the
    floor), and a quadratic in ``g`` matches the exact sums within 0.002.
    """
    g = np.abs(offset, out=offset)
    g -= g * g
    factor = g * np.float32(-4.3816)
    factor += np.float32(0.1328)
    factor *= g
    factor += np.float32(0.9983)
    return factor


def _resample(
    source: Exposure, x: np.ndarray, y: np.ndarray, jac: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, variance and mask of ``source`` at source pixel coordinates ``(x, y)``."""
    sny, snx = source.shape
    inside = (x >= 0) & (x <= snx - 1) & (y >= 0) & (y <= sny - 1)
    if not inside.any():
        nan = np.full(x.shape, np.nan, dtype=np.float32)
        return nan, nan.copy(), np.full(x.shape, _NO_DATA, dtype=np.uint32)
    # Cut out (and prefilter) only the part of the source that is needed: the mapped
    # coordinates are smooth, so their clipped range bounds the inside region.
    x0 = max(math.floor(max(float(np.nanmin(x)), 0.0)) - _PREFILTER_MARGIN, 0)
    x1 = min(math.ceil(min(float(np.nanmax(x)), snx - 1.0)) + _PREFILTER_MARGIN + 1, snx)
    y0 = max(math.floor(max(float(np.nanmin(y)), 0.0)) - _PREFILTER_MARGIN, 0)
    y1 = min(math.ceil(min(float(np.nanmax(y)), sny - 1.0)) + _PREFILTER_MARGIN + 1, sny)
    box = (slice(y0, y1), slice(x0, x1))
    img = np.asarray(source.image[box], dtype=np.float32)
    src_mask = np.asarray(source.mask[box], dtype=np.uint32)
    unusable = ~np.isfinite(img) | ((src_mask & _NO_DATA) != 0)
    if unusable.any():
        # NaN would spread through the whole spline; zeros stay local (and are masked).
        img = np.where(unusable, np.float32(0.0), img)
        src_mask = src_mask | np.where(unusable, _NO_DATA, np.uint32(0))
    coeffs = ndimage.spline_filter(img, order=3, output=np.float32, mode="mirror")
    xs = x - np.float32(x0)
    ys = y - np.float32(y0)
    out_img = ndimage.map_coordinates(
        coeffs, [ys, xs], output=np.float32, order=3, mode="mirror", prefilter=False
    )
    out_img *= jac
    rx, ry = np.rint(xs), np.rint(ys)
    flat = np.clip(ry, 0, y1 - y0 - 1).astype(np.intp)
    flat *= x1 - x0
    flat += np.clip(rx, 0, x1 - x0 - 1).astype(np.intp)
    out_var = np.asarray(source.variance[box], dtype=np.float32).ravel().take(flat)
    out_var *= jac
    out_var *= jac
    xs -= rx
    ys -= ry
    out_var *= _spline_noise_factor(xs)
    out_var *= _spline_noise_factor(ys)
    if src_mask.any():
        out_mask = _or_dilate(src_mask, _SPLINE_REACH).ravel().take(flat)
    else:
        out_mask = np.zeros(x.shape, dtype=np.uint32)
    out_mask[~inside] |= _NO_DATA
    bad = (out_mask & _NO_DATA) != 0
    out_img[bad] = np.nan
    out_var[bad] = np.nan
    return out_img, out_var, out_mask


def warp_to(
    exposure: Exposure,
    target_wcs: WCS,
    target_shape: tuple[int, int],
    *,
    grid_step: int = 64,
) -> Exposure:
    """Resample an exposure onto another WCS and pixel grid.

    Parameters
    ----------
    exposure
        The exposure to resample (needs a ``wcs``); not modified.
    target_wcs
        WCS of the output grid (0-based pixels).
    target_shape
        Numpy shape ``(ny, nx)`` of the output.
    grid_step
        Spacing (px) of the coarse grid on which the WCS mapping is evaluated.

    Returns
    -------
    Exposure
        ``float32`` image and variance, ``uint32`` mask on the target grid (see the
        module docstring for how each plane is resampled), ``wcs=target_wcs`` and
        the input's metadata; ``NO_DATA`` (NaN image and variance) where the
        source does not cover.

    Raises
    ------
    ValueError
        If the exposure has no WCS.
    """
    if exposure.wcs is None:
        raise ValueError("warp_to needs an exposure with a WCS")
    mapping = PixelMap(exposure.wcs, target_wcs, target_shape, grid_step)
    if not (np.isfinite(mapping.x).all() and np.isfinite(mapping.y).all()):
        raise ValueError("the target grid does not project onto the source's WCS")
    img, var, mask = _resample(
        exposure, mapping.fine(mapping.x), mapping.fine(mapping.y), mapping.fine(mapping.jacobian)
    )
    return Exposure(
        image=img, variance=var, mask=mask, wcs=target_wcs, metadata=dict(exposure.metadata)
    )


def _cell_scores(mapping: PixelMap, source_shape: tuple[int, int]) -> np.ndarray:
    """Per coarse cell, the least distance (px) of its corners inside the source's edges."""
    sny, snx = source_shape
    with np.errstate(invalid="ignore"):
        d = np.minimum(
            np.minimum(mapping.x, snx - 1 - mapping.x), np.minimum(mapping.y, sny - 1 - mapping.y)
        )
    d = np.where(np.isfinite(d), d, -np.inf)
    return np.minimum(np.minimum(d[:-1, :-1], d[1:, :-1]), np.minimum(d[:-1, 1:], d[1:, 1:]))


def _cell_to_pixels(cells: np.ndarray, mapping: PixelMap) -> np.ndarray:
    """Broadcast per-cell values to the pixels whose cell (between nodes) they are."""
    ny, nx = mapping.shape
    iy = np.clip(
        np.searchsorted(mapping.nodes_y, np.arange(ny), side="right") - 1, 0, cells.shape[0] - 1
    )
    ix = np.clip(
        np.searchsorted(mapping.nodes_x, np.arange(nx), side="right") - 1, 0, cells.shape[1] - 1
    )
    return cells[iy[:, None], ix[None, :]]


def _bbox(selected: np.ndarray) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(selected.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(selected.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def warp_templates(
    patches: Sequence[Exposure],
    target_wcs: WCS,
    target_shape: tuple[int, int],
    *,
    grid_step: int = 64,
) -> Exposure:
    """Mosaic template patches onto a science exposure's grid.

    Each target pixel takes its value from one patch — the one it lies deepest
    inside (largest distance from the patch edges, judged per coarse cell) — so
    seams fall in the middle of the patches' overlaps and no pixel mixes two
    coadds' PSFs. Pixels whose chosen patch has no data there are filled from
    the other patches that cover them.

    Parameters
    ----------
    patches
        Template patch exposures with WCSs (e.g. from
        :meth:`ppray.templates.TemplateStore.load_region`); not modified.
    target_wcs, target_shape
        The science exposure's WCS and numpy shape ``(ny, nx)``.
    grid_step
        Coarse-grid spacing for the pixel mapping (px).

    Returns
    -------
    Exposure
        The warped template (see :func:`warp_to`), ``NO_DATA`` (NaN) where no
        patch covers; metadata of the first patch plus ``NPATCHES``.
    """
    image = np.full(target_shape, np.nan, dtype=np.float32)
    variance = np.full(target_shape, np.nan, dtype=np.float32)
    mask = np.full(target_shape, _NO_DATA, dtype=np.uint32)
    usable = [p for p in patches if p.wcs is not None]
    maps = [PixelMap(p.wcs, target_wcs, target_shape, grid_step) for p in usable]
    scores = (
        np.stack([_cell_scores(m, p.shape) for m, p in zip(maps, usable, strict=True)])
        if maps
        else np.zeros((0, 1, 1))
    )
    # A cell whose corners are all more than a cell's width outside a patch misses it.
    reach = -1.5 * grid_step
    order = np.argsort(-scores, axis=0, kind="stable") if maps else np.zeros((0, 1, 1), int)
    for rank in range(len(maps)):
        choice = np.take_along_axis(order, np.full((1, *order.shape[1:]), rank), axis=0)[0]
        score = np.take_along_axis(scores, choice[None], axis=0)[0]
        choice_px = _cell_to_pixels(np.where(score > reach, choice, -1), maps[0])
        todo = (mask & _NO_DATA) != 0
        for k, (patch, mapping) in enumerate(zip(usable, maps, strict=True)):
            want = todo & (choice_px == k)
            box = _bbox(want)
            if box is None:
                continue
            rows, cols = box
            img, var, msk = _resample(
                patch,
                mapping.fine(mapping.x, rows, cols),
                mapping.fine(mapping.y, rows, cols),
                mapping.fine(mapping.jacobian, rows, cols),
            )
            take = want[box] & ((msk & _NO_DATA) == 0)
            image[box][take] = img[take]
            variance[box][take] = var[take]
            mask[box][take] = msk[take]
        if not ((mask & _NO_DATA) != 0).any():
            break
    metadata = dict(usable[0].metadata) if usable else {}
    metadata["NPATCHES"] = len(usable)
    return Exposure(image=image, variance=variance, mask=mask, wcs=target_wcs, metadata=metadata)
