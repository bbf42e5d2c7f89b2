"""The template store: deep coadds on a fixed tiling of the sky into patches.

Tiling
------
The sphere is cut into ``n_dec = ceil(180 / patch_size_deg)`` rings of equal
height in declination; ring ``i`` is cut into ``n_ra`` equal cells in right
ascension, with ``n_ra`` chosen so that no cell is wider on the sky than
``patch_size_deg`` (the two polar rings are one cell each). Each cell is a
patch: its own gnomonic (TAN) grid, tangent at the cell centre, north up and
east left, at ``pixel_scale_arcsec``, big enough to hold the whole cell plus
``overlap_deg`` all around. Neighbouring patches therefore overlap by twice
that, so a source near a cell boundary sits wholly inside at least one patch.
A :class:`PatchId` is ``(dec_index, ra_index)`` and names the patch in storage
as ``DDDD_RRRR``.

Store layout
------------
A :class:`TemplateStore` keeps one FITS file (:func:`ppray.imageio.exposure_to_fits`:
image, variance, mask, WCS) per patch and band under
``templates/{band}/{DDDD_RRRR}.fits`` of a :class:`ppray.storage.Storage`, and the
tiling's parameters in ``templates/tiling.json``, so readers and writers cannot
disagree about the grid.

Template units
--------------
Templates are background-subtracted and in electrons *for an exposure of
``EXPTIME`` seconds* (a metadata key), at the science visits' zero point, so a
template warped to a science grid is directly comparable to a science exposure of
that length; their variance is that of the coadd (small: ``1/N`` of a visit's).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from astropy.wcs import WCS

from ppray.errors import NonRetriableError
from ppray.image import Exposure, MaskBit
from ppray.imageio import exposure_from_fits, exposure_to_fits
from ppray.layout import template_key
from ppray.science.warp import warp_to
from ppray.storage import Storage

__all__ = [
    "DEFAULT_TILING",
    "PatchId",
    "TemplateStore",
    "Tiling",
    "build_template",
    "patches_for_footprint",
]

# Pixels that must not enter a coadd.
_EXCLUDE = np.uint32(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NO_DATA | MaskBit.EDGE)


class PatchId(NamedTuple):
    """A patch of the tiling: ring index in declination and cell index in right ascension."""

    dec_index: int
    ra_index: int

    @property
    def name(self) -> str:
        """Storage name, ``DDDD_RRRR``."""
        return f"{self.dec_index:04d}_{self.ra_index:04d}"

    @classmethod
    def parse(cls, name: str) -> PatchId:
        """The patch of a :attr:`name`; :class:`ValueError` for anything else."""
        parts = name.split("_")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not a patch name: {name!r}")
        return cls(int(parts[0]), int(parts[1]))


@dataclass(frozen=True)
class Tiling:
    """Parameters of the sky tiling (see the module docstring).

    Attributes
    ----------
    patch_size_deg
        Nominal side of a patch's cell (degrees).
    overlap_deg
        Margin added around each cell (degrees).
    pixel_scale_arcsec
        Pixel scale of the patch grids.
    """

    patch_size_deg: float = 0.2
    overlap_deg: float = 0.01
    pixel_scale_arcsec: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.patch_size_deg <= 90:
            raise ValueError(f"patch_size_deg must be in (0, 90], not {self.patch_size_deg!r}")
        if not 0 <= self.overlap_deg < self.patch_size_deg:
            raise ValueError("overlap_deg must be >= 0 and smaller than patch_size_deg")
        if not self.pixel_scale_arcsec > 0:
            raise ValueError("pixel_scale_arcsec must be > 0")

    @property
    def n_dec(self) -> int:
        return math.ceil(180.0 / self.patch_size_deg - 1e-9)

    @property
    def ring_height_deg(self) -> float:
        return 180.0 / self.n_dec

    def ring_dec_range(self, dec_index: int) -> tuple[float, float]:
        lo = -90.0 + dec_index * self.ring_height_deg
        return lo, lo + self.ring_height_deg

    def n_ra(self, dec_index: int) -> int:
        """Cells in ring ``dec_index``: 1 at the poles, else no cell wider than a patch."""
        if dec_index <= 0 or dec_index >= self.n_dec - 1:
            return 1
        lo, hi = self.ring_dec_range(dec_index)
        widest = math.cos(math.radians(min(abs(lo), abs(hi)) if lo * hi > 0 else 0.0))
        return max(1, math.ceil(360.0 * widest / self.patch_size_deg - 1e-9))

    def patch_of(self, ra_deg: float, dec_deg: float) -> PatchId:
        """The patch whose cell holds a sky position."""
        i = min(int((dec_deg + 90.0) // self.ring_height_deg), self.n_dec - 1)
        n = self.n_ra(i)
        return PatchId(i, min(int((ra_deg % 360.0) // (360.0 / n)), n - 1))

    def center(self, patch: PatchId) -> tuple[float, float]:
        """Centre (ra, dec) of a patch's cell, degrees (the poles for the polar caps)."""
        if patch.dec_index <= 0:
            return 0.0, -90.0
        if patch.dec_index >= self.n_dec - 1:
            return 0.0, 90.0
        lo, hi = self.ring_dec_range(patch.dec_index)
        return (patch.ra_index + 0.5) * 360.0 / self.n_ra(patch.dec_index), 0.5 * (lo + hi)

    def _check(self, patch: PatchId) -> None:
        if not (
            0 <= patch.dec_index < self.n_dec and 0 <= patch.ra_index < self.n_ra(patch.dec_index)
        ):
            raise ValueError(f"no patch {patch} in {self}")

    def cell_boundary(self, patch: PatchId, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Points (ra, dec) along the edges of a patch's cell (``n`` per edge)."""
        self._check(patch)
        lo, hi = self.ring_dec_range(patch.dec_index)
        width = 360.0 / self.n_ra(patch.dec_index)
        ra0 = patch.ra_index * width
        t = np.linspace(0.0, 1.0, n)
        if self.n_ra(patch.dec_index) == 1:
            # A polar cap: its boundary is the ring's equatorward edge.
            edge = hi if patch.dec_index == 0 else lo
            ra = np.linspace(0.0, 360.0, 4 * n, endpoint=False)
            return ra, np.full(ra.size, edge)
        ra = np.concatenate(
            [ra0 + width * t, np.full(n, ra0 + width), ra0 + width * t, np.full(n, ra0)]
        )
        dec = np.concatenate(
            [np.full(n, lo), lo + (hi - lo) * t, np.full(n, hi), lo + (hi - lo) * t]
        )
        return ra, dec

    def patch_wcs(self, patch: PatchId) -> tuple[WCS, tuple[int, int]]:
        """A patch's TAN WCS (0-based pixels) and numpy shape ``(ny, nx)``."""
        ra_c, dec_c = self.center(patch)
        scale = self.pixel_scale_arcsec / 3600.0
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [ra_c, dec_c]
        wcs.wcs.crpix = [1.0, 1.0]
        wcs.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
        wcs.wcs.set()
        ra, dec = self.cell_boundary(patch, 16)
        x, y = wcs.wcs_world2pix(ra, dec, 0)
        margin = self.overlap_deg / scale
        half_x = math.ceil(float(np.max(np.abs(x))) + margin)
        half_y = math.ceil(float(np.max(np.abs(y))) + margin)
        # The tangent point sits on the middle pixel (1-based FITS crpix).
        wcs.wcs.crpix = [half_x + 1.0, half_y + 1.0]
        wcs.wcs.set()
        return wcs, (2 * half_y + 1, 2 * half_x + 1)


DEFAULT_TILING = Tiling()


def _unit(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _ra_candidates(tiling: Tiling, i: int, ra_c: float, dec_c: float, reach: float) -> list[int]:
    """Cell indices of ring ``i`` within ``reach`` degrees of ``(ra_c, dec_c)`` in RA."""
    n = tiling.n_ra(i)
    lo, hi = tiling.ring_dec_range(i)
    worst = max(abs(max(lo, dec_c - reach)), abs(min(hi, dec_c + reach)))
    if n == 1 or worst + reach >= 89.0:
        return list(range(n))
    half_width = reach / math.cos(math.radians(worst))
    width = 360.0 / n
    first = math.floor((ra_c - half_width) / width)
    last = math.floor((ra_c + half_width) / width)
    return sorted({j % n for j in range(first, last + 1)})


def patches_for_footprint(
    corners_deg: np.ndarray | Sequence[Sequence[float]],
    padding_deg: float = 0.0,
    tiling: Tiling = DEFAULT_TILING,
) -> list[PatchId]:
    """The patches whose grids overlap a (padded) footprint on the sky.

    Parameters
    ----------
    corners_deg
        ``(n, 2)`` (ra, dec) of the footprint's corners, degrees (e.g. a
        detector's four corners from its WCS), spanning less than a hemisphere.
    padding_deg
        Extra margin around the footprint (degrees), e.g. for WCS errors and
        the matching kernel's reach.
    tiling
        The sky tiling.

    Returns
    -------
    list[PatchId]
        Sorted; every patch whose pixel grid (cell plus overlap) meets the
        padded bounding box of the footprint in that patch's own projection.
    """
    corners = np.asarray(corners_deg, dtype=np.float64).reshape(-1, 2)
    vec = _unit(corners[:, 0], corners[:, 1])
    centre = vec.sum(axis=0)
    centre /= np.linalg.norm(centre)
    radius = math.degrees(float(np.arccos(np.clip(vec @ centre, -1.0, 1.0)).max())) + padding_deg
    dec_c = math.degrees(math.asin(float(centre[2])))
    ra_c = math.degrees(math.atan2(float(centre[1]), float(centre[0]))) % 360.0
    # Candidates: cells whose centre is within the footprint's radius plus a cell's diagonal.
    reach = radius + math.sqrt(2.0) * (tiling.patch_size_deg + tiling.overlap_deg)
    h = tiling.ring_height_deg
    i_lo = max(int((dec_c - reach + 90.0) // h), 0)
    i_hi = min(int((dec_c + reach + 90.0) // h), tiling.n_dec - 1)
    found = []
    scale = tiling.pixel_scale_arcsec / 3600.0
    pad_px = padding_deg / scale
    # Points along the footprint's edges, since its sides need not be straight in the patch.
    closed = np.vstack([corners, corners[:1]])
    t = np.linspace(0.0, 1.0, 5)[:-1, None]
    edge_ra = np.concatenate(
        [a[0] + t * (((b[0] - a[0] + 180) % 360) - 180) for a, b in itertools.pairwise(closed)]
    )[:, 0]
    edge_dec = np.concatenate([a[1] + t * (b[1] - a[1]) for a, b in itertools.pairwise(closed)])[
        :, 0
    ]
    for i in range(i_lo, i_hi + 1):
        for j in _ra_candidates(tiling, i, ra_c, dec_c, reach):
            patch = PatchId(i, j)
            pra, pdec = tiling.center(patch)
            cos_d = float(_unit(np.array(pra), np.array(pdec)) @ centre)
            if math.degrees(math.acos(min(max(cos_d, -1.0), 1.0))) > reach:
                continue
            wcs, (ny, nx) = tiling.patch_wcs(patch)
            # A gnomonic projection only shows the hemisphere about its tangent point.
            if np.min(_unit(edge_ra, edge_dec) @ _unit(np.array(pra), np.array(pdec))) <= 0.1:
                continue
            x, y = wcs.wcs_world2pix(edge_ra, edge_dec, 0)
            if (
                x.min() - pad_px <= nx - 1
                and x.max() + pad_px >= 0
                and y.min() - pad_px <= ny - 1
                and y.max() + pad_px >= 0
            ):
                found.append(patch)
    return sorted(found)


class TemplateStore:
    """Deep template coadds per patch and band in a :class:`~ppray.storage.Storage`.

    Parameters
    ----------
    root
        A storage root URI (or path), or a :class:`~ppray.storage.Storage`.
    tiling
        The tiling to use. ``None``: the one recorded in the store, or
        :data:`DEFAULT_TILING` for an empty store. A tiling that differs from
        the recorded one raises :class:`~ppray.errors.NonRetriableError` on use.
    """

    _TILING_KEY = "templates/tiling.json"

    def __init__(self, root: str | Storage, tiling: Tiling | None = None) -> None:
        self.storage = root if isinstance(root, Storage) else Storage(root)
        self._requested = tiling
        self._tiling: Tiling | None = None

    @property
    def tiling(self) -> Tiling:
        """The store's tiling (read lazily from the store)."""
        if self._tiling is None:
            stored = None
            if self.storage.exists(self._TILING_KEY):
                stored = Tiling(**self.storage.read_json(self._TILING_KEY))
            if stored is not None and self._requested is not None and stored != self._requested:
                raise NonRetriableError(
                    f"template store {self.storage.root} uses {stored}, not {self._requested}"
                )
            self._tiling = stored or self._requested or DEFAULT_TILING
        return self._tiling

    @staticmethod
    def key(band: str, patch: PatchId) -> str:
        """Storage key of one patch's template."""
        if not band or "/" in band:
            raise NonRetriableError(f"bad band name {band!r}")
        return template_key(band, patch.name)

    def write(self, patch: PatchId, band: str, exposure: Exposure) -> str:
        """Store a patch's template; returns its URI.

        Raises
        ------
        ValueError
            If the exposure's shape is not the patch's.
        """
        tiling = self.tiling
        _, shape = tiling.patch_wcs(patch)
        if exposure.shape != shape:
            raise ValueError(f"patch {patch.name} is {shape}, the template is {exposure.shape}")
        if not self.storage.exists(self._TILING_KEY):
            self.storage.write_json(self._TILING_KEY, asdict(tiling))
        meta = {**exposure.metadata, "BAND": band, "PATCH": patch.name}
        stored = Exposure(exposure.image, exposure.variance, exposure.mask, exposure.wcs, meta)
        return self.storage.write_bytes(self.key(band, patch), exposure_to_fits(stored))

    def read(self, patch: PatchId, band: str) -> Exposure:
        """One patch's template; :class:`~ppray.errors.RetriableError` if it is missing.

        Its ``metadata["TMPLID"]`` is its key, for the outputs' provenance.
        """
        key = self.key(band, patch)
        exposure = exposure_from_fits(self.storage.read_bytes(key))
        exposure.metadata["TMPLID"] = key
        return exposure

    def patches(self, band: str) -> list[PatchId]:
        """The patches that have a template in ``band``."""
        keys = self.storage.list(f"templates/{band}", suffix=".fits")
        return [PatchId.parse(k.rsplit("/", 1)[1][: -len(".fits")]) for k in keys]

    def load_region(
        self,
        band: str,
        corners_deg: np.ndarray | Sequence[Sequence[float]],
        padding_deg: float = 0.01,
    ) -> list[Exposure]:
        """The stored templates whose patches overlap a detector's padded footprint.

        Parameters
        ----------
        band
            Filter.
        corners_deg
            ``(n, 2)`` (ra, dec) corners of the footprint, degrees.
        padding_deg
            Margin around the footprint (degrees).

        Returns
        -------
        list[Exposure]
            In patch order; patches without a template are skipped (an empty list
            means no template covers the footprint).
        """
        out = []
        for patch in patches_for_footprint(corners_deg, padding_deg, self.tiling):
            if self.storage.exists(self.key(band, patch)):
                out.append(self.read(patch, band))
        return out


def build_template(
    exposures: Sequence[Exposure],
    wcs: WCS,
    shape: tuple[int, int],
    *,
    flux_scales: Sequence[float] | None = None,
    grid_step: int = 64,
) -> Exposure:
    """Coadd processed visits onto a patch grid: an inverse-variance weighted mean.

    Parameters
    ----------
    exposures
        Calibrated, background-subtracted visit exposures with WCSs; not modified.
    wcs, shape
        The patch grid (:meth:`Tiling.patch_wcs`).
    flux_scales
        Factor per exposure that puts it on the template's flux scale (e.g. the
        ratio of zero points and exposure times); default 1 for all.
    grid_step
        Coarse-grid spacing of the warps (px).

    Returns
    -------
    Exposure
        ``image``: the weighted mean of the warped, scaled visits over the
        pixels each has unmasked (``BAD``, ``SAT``, ``CR``, ``NO_DATA``,
        ``EDGE`` pixels are left out); ``variance``: ``1 / sum(1/var)``;
        ``mask``: the OR of the contributing visits' other bits, or the OR of
        all visits' bits plus ``NO_DATA`` where no visit contributes (NaN
        there). Metadata: ``NVISITS``, and ``EXPTIME`` of the first exposure.
        The coadd's PSF is the weighted mix of the visits' PSFs.
    """
    scales = [1.0] * len(exposures) if flux_scales is None else list(flux_scales)
    if len(scales) != len(exposures):
        raise ValueError("flux_scales must have one factor per exposure")
    num = np.zeros(shape, dtype=np.float64)
    weight = np.zeros(shape, dtype=np.float64)
    good_bits = np.zeros(shape, dtype=np.uint32)
    all_bits = np.zeros(shape, dtype=np.uint32)
    for exposure, s in zip(exposures, scales, strict=True):
        warped = warp_to(exposure, wcs, shape, grid_step=grid_step)
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = ((warped.mask & _EXCLUDE) == 0) & (warped.variance > 0)
            w = np.where(ok, 1.0 / (np.float64(s) ** 2 * warped.variance), 0.0)
        num += np.where(ok, w * s * warped.image, 0.0)
        weight += w
        good_bits |= np.where(ok, warped.mask, np.uint32(0))
        all_bits |= warped.mask
    covered = weight > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        image = np.where(covered, num / weight, np.nan).astype(np.float32)
        variance = np.where(covered, 1.0 / weight, np.nan).astype(np.float32)
    mask = np.where(covered, good_bits & ~_EXCLUDE, all_bits | np.uint32(MaskBit.NO_DATA))
    metadata: dict[str, object] = {"NVISITS": len(exposures)}
    if exposures and "EXPTIME" in exposures[0].metadata:
        metadata["EXPTIME"] = exposures[0].metadata["EXPTIME"]
    return Exposure(
        image=image, variance=variance, mask=mask.astype(np.uint32), wcs=wcs, metadata=metadata
    )
