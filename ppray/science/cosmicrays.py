"""Cosmic-ray detection (L.A.Cosmic via ``astroscrappy``) and repair.

:func:`find_cosmic_rays` runs van Dokkum's (2001) Laplacian edge detection on a
post-ISR exposure. Cosmic rays are sharper than anything the optics can make,
so a pixel is a cosmic ray when its Laplacian is ``sigclip`` times above the
noise *and* ``objlim`` times above the image's "fine structure" (what a
PSF-sized object would give). The fine structure is built by convolving with
the PSF (astroscrappy's ``fsmode="convolve"``), so the caller's PSF FWHM sets
what counts as too sharp to be a star.

:func:`mask_cosmic_rays` sets ``MaskBit.CR`` and, by default, replaces each CR
pixel by the median of its good neighbours, so that background estimation, PSF
measurement and detection downstream are not thrown off by kilo-electron
spikes.
"""

from __future__ import annotations

import math
from typing import Any

import astroscrappy
import numpy as np

from ppray.image import Exposure, MaskBit
from ppray.science.stats import FWHM_PER_SIGMA

__all__ = ["find_cosmic_rays", "mask_cosmic_rays"]

# Pixels astroscrappy must neither flag nor use: their values mean nothing (BAD,
# NO_DATA) or are clipped flat tops whose edges look sharp (SAT).
_IGNORE = np.uint32(MaskBit.BAD | MaskBit.SAT | MaskBit.NO_DATA)
# Pixels a repair must not draw from.
_NOT_NEIGHBOUR = np.uint32(MaskBit.BAD | MaskBit.SAT | MaskBit.NO_DATA | MaskBit.CR)
# Half-sides of the neighbourhoods tried, smallest first, when repairing a pixel:
# long tracks leave no good pixel in a 5x5 box around their middle.
_REPAIR_HALVES = (2, 3, 5, 8)
# Context around each tile: astroscrappy's widest filters (7x7 medians on a 2x
# subsampled image, the PSF kernel) reach less than this.
_TILE_MARGIN = 24


def _candidate_tiles(
    image: np.ndarray,
    variance: np.ndarray,
    ignore: np.ndarray,
    psf_fwhm_px: float,
    nsigma: float,
    tile: int,
    margin: int,
) -> list[tuple[slice, slice]]:
    """Tiles holding a pixel too sharp and too bright to be a star or noise, or near one.

    A pixel's excess over the mean of its four neighbours is at most ``1 -
    exp(-1 / (2 sigma²))`` of its height above the sky for a Gaussian PSF, and
    about a half or more for a one-pixel-wide track; a candidate must be past
    halfway between the two, and ``nsigma`` above the noise.
    """
    ny, nx = image.shape
    img = np.where(ignore, np.float32(0.0), image)
    pad = np.pad(img, 1, mode="edge")
    mean4 = pad[:-2, 1:-1] + pad[2:, 1:-1]
    mean4 += pad[1:-1, :-2]
    mean4 += pad[1:-1, 2:]
    mean4 *= np.float32(0.25)
    excess = img - mean4
    sky = float(np.median(img[:: max(ny // 256, 1), :: max(nx // 256, 1)]))
    sigma = psf_fwhm_px / FWHM_PER_SIGMA
    star_fraction = 1.0 - math.exp(-1.0 / (2.0 * sigma * sigma))
    fraction = min(0.5 * (star_fraction + 0.5), 0.45)
    cand = excess > np.float32(nsigma * 1.118) * np.sqrt(variance)
    cand &= excess > np.float32(fraction) * (img - np.float32(sky))
    cand &= ~ignore
    rows, cols = np.nonzero(cand)
    if rows.size == 0:
        return []
    nty, ntx = -(-ny // tile), -(-nx // tile)
    hit = np.zeros((nty, ntx), dtype=bool)
    # A candidate near a tile's edge marks the neighbouring tile too: its track
    # (and astroscrappy's growth of it) may continue there.
    for dr in (-margin, 0, margin):
        for dc in (-margin, 0, margin):
            r = np.clip(rows + dr, 0, ny - 1) // tile
            c = np.clip(cols + dc, 0, nx - 1) // tile
            hit[r, c] = True
    return [
        (slice(ty * tile, min((ty + 1) * tile, ny)), slice(tx * tile, min((tx + 1) * tile, nx)))
        for ty, tx in zip(*np.nonzero(hit), strict=True)
    ]


def find_cosmic_rays(
    exposure: Exposure,
    *,
    psf_fwhm_px: float,
    niter: int = 2,
    sigclip: float = 5.0,
    sigfrac: float = 0.3,
    objlim: float = 4.0,
    tile_size_px: int = 128,
) -> np.ndarray:
    """Find cosmic-ray pixels with astroscrappy's L.A.Cosmic.

    Parameters
    ----------
    exposure
        A post-ISR exposure in electrons, with or without its background
        subtracted; it is not modified. Its variance plane is the noise model.
    psf_fwhm_px
        FWHM of the PSF (pixels), for the fine-structure kernel; an estimate
        (e.g. the seeing forecast) is enough: it need only tell stars from
        single-pixel spikes.
    niter
        L.A.Cosmic iterations; 1-2 find nearly all of a CCD's tracks at a third
        of the cost of astroscrappy's default 4.
    sigclip
        Laplacian-to-noise threshold for a CR pixel.
    sigfrac
        Fraction of ``sigclip`` for growing into neighbouring pixels.
    objlim
        Minimum contrast between the Laplacian and the fine structure; higher
        protects more of the cores of bright stars.
    tile_size_px
        Run L.A.Cosmic only on tiles of this side that hold a candidate (0: on
        the whole image). A candidate is a pixel at least ``2 * sigclip`` sigma
        above the mean of its four neighbours and sharper than the PSF allows;
        on a CCD with a few hundred tracks this does a fraction of the work.
        Tracks with no pixel that bright (a few hundred electrons on a dark sky)
        are missed on tiles without another candidate.

    Returns
    -------
    numpy.ndarray
        ``bool`` mask of the image's shape, ``True`` on cosmic-ray pixels. Never
        ``True`` on ``BAD``, ``SAT`` or ``NO_DATA`` pixels.

    Raises
    ------
    ValueError
        For a non-positive ``psf_fwhm_px`` or ``niter``.
    """
    if not psf_fwhm_px > 0 or niter < 1:
        raise ValueError(f"psf_fwhm_px and niter must be > 0, not {psf_fwhm_px}, {niter}")
    ignore = (exposure.mask & _IGNORE) != 0
    image = np.asarray(exposure.image, dtype=np.float32)
    variance = np.asarray(exposure.variance, dtype=np.float32)
    good_var = np.isfinite(variance) & (variance > 0)
    if not good_var.all():
        ignore = ignore | ~good_var
    if ignore.all():
        return np.zeros(image.shape, dtype=bool)
    # NO_DATA pixels carry infinite variance; astroscrappy median-filters the noise
    # model, so they get a typical value instead of poisoning their neighbours.
    typical_var = float(np.median(variance[good_var][:: max(1, good_var.sum() // 100_000)]))
    if not good_var.all():
        variance = np.where(good_var, variance, np.float32(typical_var))
    finite = np.isfinite(image)
    if not finite.all():
        ignore = ignore | ~finite
        image = np.where(finite, image, np.float32(0.0))
    # The image is already in electrons (gain 1) and the variance plane is the
    # noise model; readnoise only matters to astroscrappy's fallback noise model,
    # so give it the quietest pixels' noise.
    readnoise = math.sqrt(max(float(np.percentile(variance[good_var][::97], 1.0)), 1e-6))
    # The kernel must hold the PSF's wings: 3 FWHM, odd.
    psfsize = 2 * round(1.5 * psf_fwhm_px) + 1
    kwargs: dict[str, Any] = {
        "sigclip": sigclip,
        "sigfrac": sigfrac,
        "objlim": objlim,
        "gain": 1.0,
        "readnoise": readnoise,
        # Saturation is already in the mask plane; astroscrappy's own cut would
        # mask the bright (unsaturated) tops of CR tracks too.
        "satlevel": float(np.finfo(np.float32).max),
        "niter": niter,
        "sepmed": True,
        "cleantype": "meanmask",
        "fsmode": "convolve",
        "psfmodel": "gauss",
        "psffwhm": float(psf_fwhm_px),
        "psfsize": int(psfsize),
    }
    crmask = np.zeros(image.shape, dtype=bool)
    if tile_size_px <= 0:
        tiles = [(slice(0, image.shape[0]), slice(0, image.shape[1]))]
    else:
        tiles = _candidate_tiles(
            image, variance, ignore, psf_fwhm_px, 2.0 * sigclip, tile_size_px, _TILE_MARGIN
        )
    ny, nx = image.shape
    for rows, cols in tiles:
        # Each tile runs with a margin of context so that medians and the Laplacian
        # see the same neighbourhood as on the whole image; only its core is kept.
        r0, r1 = max(rows.start - _TILE_MARGIN, 0), min(rows.stop + _TILE_MARGIN, ny)
        c0, c1 = max(cols.start - _TILE_MARGIN, 0), min(cols.stop + _TILE_MARGIN, nx)
        found, _ = astroscrappy.detect_cosmics(
            np.ascontiguousarray(image[r0:r1, c0:c1]),
            inmask=np.ascontiguousarray(ignore[r0:r1, c0:c1]),
            invar=np.ascontiguousarray(variance[r0:r1, c0:c1]),
            **kwargs,
        )
        crmask[rows, cols] = np.asarray(found, dtype=bool)[
            rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0
        ]
    crmask = np.asarray(crmask, dtype=bool)
    crmask &= ~ignore
    return crmask


def _neighbour_medians(
    values: np.ndarray, usable: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: int
) -> np.ndarray:
    """Median of the usable pixels in a ``(2 half + 1)²`` box about each pixel (NaN if none)."""
    ny, nx = values.shape
    offsets = np.arange(-half, half + 1)
    r = rows[:, None, None] + offsets[None, :, None]
    c = cols[:, None, None] + offsets[None, None, :]
    inside = (r >= 0) & (r < ny) & (c >= 0) & (c < nx)
    r = np.clip(r, 0, ny - 1)
    c = np.clip(c, 0, nx - 1)
    box = np.where(inside & usable[r, c], values[r, c], np.nan).reshape(rows.size, -1)
    out = np.full(rows.size, np.nan, dtype=np.float64)
    has = np.isfinite(box).any(axis=1)
    if has.any():
        out[has] = np.nanmedian(box[has], axis=1)
    return out


def mask_cosmic_rays(exposure: Exposure, cr_mask: np.ndarray, *, repair: bool = True) -> Exposure:
    """Set ``MaskBit.CR`` on cosmic-ray pixels and (optionally) repair them.

    Parameters
    ----------
    exposure
        The exposure; it is not modified.
    cr_mask
        ``bool`` mask of cosmic-ray pixels, e.g. from :func:`find_cosmic_rays`.
    repair
        Replace each CR pixel's image and variance by the median of the good
        (not ``BAD``, ``SAT``, ``NO_DATA`` or CR) pixels in a 5x5 box about it,
        widening the box up to 17x17 for long tracks; pixels with no good
        neighbour even then keep their values.

    Returns
    -------
    Exposure
        A new exposure with new ``image``, ``variance`` and ``mask`` arrays
        (``mask`` has ``CR`` set), the same ``wcs`` and a copy of ``metadata``
        with ``NCRPIX``, the number of CR pixels.

    Raises
    ------
    ValueError
        When ``cr_mask`` does not have the image's shape.
    """
    cr_mask = np.asarray(cr_mask, dtype=bool)
    if cr_mask.shape != exposure.image.shape:
        raise ValueError(f"cr_mask shape {cr_mask.shape} != image shape {exposure.image.shape}")
    mask = exposure.mask | (cr_mask.astype(np.uint32) * np.uint32(MaskBit.CR))
    image = np.array(exposure.image, dtype=np.float32, copy=True)
    variance = np.array(exposure.variance, dtype=np.float32, copy=True)
    rows, cols = np.nonzero(cr_mask)
    if repair and rows.size:
        usable = (mask & _NOT_NEIGHBOUR) == 0
        todo = np.arange(rows.size)
        for half in _REPAIR_HALVES:
            img_med = _neighbour_medians(image, usable, rows[todo], cols[todo], half)
            var_med = _neighbour_medians(variance, usable, rows[todo], cols[todo], half)
            done = np.isfinite(img_med) & np.isfinite(var_med)
            image[rows[todo[done]], cols[todo[done]]] = img_med[done]
            variance[rows[todo[done]], cols[todo[done]]] = var_med[done]
            todo = todo[~done]
            if todo.size == 0:
                break
    metadata = dict(exposure.metadata)
    metadata["NCRPIX"] = int(rows.size)
    return Exposure(image=image, variance=variance, mask=mask, wcs=exposure.wcs, metadata=metadata)
