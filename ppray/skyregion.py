"""Regions of sky: footprints for APDB reads, HEALPix partitions, unit vectors.

Everything that measures angles works on unit vectors, so the RA wrap at
0/360 deg and the poles need no special cases. HEALPix pixels are NESTED
(``astropy_healpix``): a pixel at ``nside`` contains the four pixels of
``2 * nside`` numbered ``4p .. 4p+3``, which makes coarse shard regions unions
of fine partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import astropy.units as u
import numpy as np
from astropy_healpix import HEALPix
from scipy.spatial import cKDTree

__all__ = [
    "Footprint",
    "angular_separation_deg",
    "chord",
    "healpix_pixels",
    "pairs_within",
    "radec_to_xyz",
    "xyz_to_radec",
]


def radec_to_xyz(ra_deg: np.ndarray | float, dec_deg: np.ndarray | float) -> np.ndarray:
    """Unit vectors, shape ``(n, 3)``, of positions in degrees."""
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    cos_dec = np.cos(dec)
    return np.stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1)


def xyz_to_radec(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RA in [0, 360) and Dec (degrees) of (not necessarily unit) vectors ``(n, 3)``."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    ra = np.degrees(np.arctan2(y, x)) % 360.0
    dec = np.degrees(np.arctan2(z, np.hypot(x, y)))
    return ra, dec


def angular_separation_deg(
    ra1: np.ndarray | float,
    dec1: np.ndarray | float,
    ra2: np.ndarray | float,
    dec2: np.ndarray | float,
) -> np.ndarray:
    """Great-circle separation (degrees), accurate at all scales (Vincenty's formula)."""
    a, b = radec_to_xyz(ra1, dec1), radec_to_xyz(ra2, dec2)
    cross = np.linalg.norm(np.cross(a, b), axis=-1)
    return np.degrees(np.arctan2(cross, np.sum(a * b, axis=-1)))


def chord(angle_deg: float) -> float:
    """Chord length between unit vectors separated by ``angle_deg``."""
    return 2.0 * math.sin(math.radians(min(angle_deg, 180.0)) / 2.0)


def pairs_within(tree: cKDTree, xyz: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """All (row of ``xyz``, point of ``tree``) pairs closer than chord ``r``, as two arrays."""
    hits = tree.query_ball_point(xyz, r, return_sorted=False)
    counts = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    if counts.sum() == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    i = np.repeat(np.arange(len(hits)), counts)
    j = np.fromiter((k for h in hits for k in h), dtype=np.int64, count=int(counts.sum()))
    return i, j


def healpix_pixels(ra_deg: np.ndarray, dec_deg: np.ndarray, nside: int) -> np.ndarray:
    """NESTED HEALPix pixel (``int64``) of each position."""
    hp = HEALPix(nside=nside, order="nested")
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    return np.asarray(hp.lonlat_to_healpix(ra * u.deg, dec * u.deg), dtype=np.int64)


@dataclass(frozen=True)
class Footprint:
    """A region of sky: a cone, an RA/Dec box, or a set of HEALPix pixels.

    Build one with :meth:`cone`, :meth:`box` or :meth:`pixels`. A box whose
    ``ra_min > ra_max`` wraps through RA 0.
    """

    kind: Literal["cone", "box", "pixels"]
    params: tuple[float, ...] = ()
    nside: int = 0
    pixel_set: frozenset[int] = frozenset()

    @classmethod
    def cone(cls, ra_deg: float, dec_deg: float, radius_deg: float) -> Footprint:
        """All positions within ``radius_deg`` of ``(ra_deg, dec_deg)``."""
        if not (-90.0 <= dec_deg <= 90.0 and 0.0 < radius_deg <= 180.0):
            raise ValueError(
                f"cone needs -90 <= dec <= 90 and 0 < radius <= 180 deg, "
                f"not dec={dec_deg}, radius={radius_deg}"
            )
        return cls("cone", (float(ra_deg) % 360.0, float(dec_deg), float(radius_deg)))

    @classmethod
    def box(cls, ra_min: float, ra_max: float, dec_min: float, dec_max: float) -> Footprint:
        """``ra_min <= ra <= ra_max`` (through 0 when ``ra_min > ra_max``), ``dec_min..dec_max``.

        RA limits are taken modulo 360; equal limits (``box(0, 360, ...)``) mean all RA.
        """
        if not (-90.0 <= dec_min <= dec_max <= 90.0):
            raise ValueError(f"box needs -90 <= dec_min <= dec_max <= 90, not {dec_min}, {dec_max}")
        return cls("box", (ra_min % 360.0, ra_max % 360.0, float(dec_min), float(dec_max)))

    @classmethod
    def pixels(cls, nside: int, pixels: np.ndarray | list[int] | tuple[int, ...]) -> Footprint:
        """The union of NESTED HEALPix ``pixels`` at ``nside``."""
        if nside < 1 or nside & (nside - 1):
            raise ValueError(f"nside must be a power of two, not {nside}")
        pix = frozenset(int(p) for p in np.asarray(pixels, dtype=np.int64).ravel())
        if pix and not (min(pix) >= 0 and max(pix) < 12 * nside * nside):
            raise ValueError(
                f"HEALPix pixels must be in [0, {12 * nside * nside}) at nside {nside}"
            )
        return cls("pixels", (), nside, pix)

    def contains(self, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
        """Boolean mask of the positions inside the footprint."""
        ra = np.asarray(ra_deg, dtype=np.float64) % 360.0
        dec = np.asarray(dec_deg, dtype=np.float64)
        if self.kind == "cone":
            ra0, dec0, radius = self.params
            return np.asarray(angular_separation_deg(ra, dec, ra0, dec0) <= radius)
        if self.kind == "box":
            ra_min, ra_max, dec_min, dec_max = self.params
            if ra_min == ra_max:  # box(0, 360): all RA
                in_ra = np.ones(ra.shape, dtype=bool)
            elif ra_min < ra_max:
                in_ra = (ra >= ra_min) & (ra <= ra_max)
            else:
                in_ra = (ra >= ra_min) | (ra <= ra_max)
            return np.asarray(in_ra & (dec >= dec_min) & (dec <= dec_max))
        if not self.pixel_set:
            return np.zeros(ra.shape, dtype=bool)
        pix = healpix_pixels(ra, dec, self.nside)
        return np.isin(pix, np.fromiter(self.pixel_set, dtype=np.int64))

    def bounding_cone(self) -> tuple[float, float, float]:
        """``(ra, dec, radius)`` in degrees of a cone that contains the footprint."""
        if self.kind == "cone":
            ra0, dec0, radius = self.params
            return ra0, dec0, radius
        ra, dec = self._outline()
        xyz = radec_to_xyz(ra, dec)
        mean = xyz.mean(axis=0)
        if np.linalg.norm(mean) < 1e-9:  # outline balanced around the sphere: whole sky
            return 0.0, 90.0, 180.0
        c_ra, c_dec = xyz_to_radec(mean[None, :])
        # The farthest point of a region from a centre lies on its outline unless the
        # region holds the centre's antipode (e.g. a box over all RA): then all sky.
        if self.contains(np.array([(c_ra[0] + 180.0) % 360.0]), np.array([-c_dec[0]]))[0]:
            return 0.0, 90.0, 180.0
        sep = angular_separation_deg(ra, dec, c_ra[0], c_dec[0])
        radius = float(sep.max())
        if self.kind == "pixels":
            # Pixel outlines are sampled at their boundary points; pad by a pixel's size.
            radius += 2.0 * math.degrees(math.sqrt(4 * math.pi / (12 * self.nside**2)))
        return float(c_ra[0]), float(c_dec[0]), min(radius * 1.0001 + 1e-9, 180.0)

    def _outline(self) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "box":
            ra_min, ra_max, dec_min, dec_max = self.params
            width = (ra_max - ra_min) % 360.0 or (360.0 if ra_min == ra_max else 0.0)
            t = np.linspace(0.0, 1.0, 65)
            ras = (ra_min + width * t) % 360.0
            decs = dec_min + (dec_max - dec_min) * t
            # The outline: both RA edges and both Dec edges (the interior can be no
            # farther from the centre than the boundary of a spherical box's cone).
            ra = np.concatenate([ras, ras, np.full(65, ra_min), np.full(65, ra_max)])
            dec = np.concatenate([np.full(65, dec_min), np.full(65, dec_max), decs, decs])
            return ra, dec
        hp = HEALPix(nside=self.nside, order="nested")
        pix = np.fromiter(self.pixel_set, dtype=np.int64)
        lon, lat = hp.boundaries_lonlat(pix, step=2)
        return np.asarray(lon.to_value(u.deg)).ravel(), np.asarray(lat.to_value(u.deg)).ravel()

    def healpix(self, nside: int, pad_arcsec: float = 0.0) -> np.ndarray:
        """Sorted NESTED pixels at ``nside`` that cover the footprint padded by ``pad_arcsec``."""
        if self.kind == "pixels" and pad_arcsec == 0.0 and nside >= self.nside:
            # Exact: each pixel's children at the finer nside.
            factor = (nside // self.nside) ** 2
            base = np.fromiter(self.pixel_set, dtype=np.int64) * factor
            return np.sort((base[:, None] + np.arange(factor)[None, :]).ravel())
        if self.kind == "pixels" and not self.pixel_set:
            return np.zeros(0, dtype=np.int64)
        ra0, dec0, radius = self.bounding_cone()
        radius = min(radius + pad_arcsec / 3600.0, 180.0)
        if radius >= 180.0:
            return np.arange(12 * nside * nside, dtype=np.int64)
        hp = HEALPix(nside=nside, order="nested")
        pix = hp.cone_search_lonlat(ra0 * u.deg, dec0 * u.deg, radius * u.deg)
        return np.sort(np.asarray(pix, dtype=np.int64))
