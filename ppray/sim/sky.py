"""A synthetic sky: stars (and optionally galaxies) that are also the reference catalog.

Stars are spread uniformly over a spherical cap with power-law number counts,
``dN/dm ∝ 10**(slope * m)`` (``slope`` ≈ 0.3 for stars at high Galactic
latitude between 16th and 24th magnitude). Every object has AB magnitudes in
g, r and i from a simple stellar locus; ``mag`` is the r-band magnitude and
:func:`catalog_mag` picks the column for a band.

Galaxies, when asked for, are round Gaussian blobs with an intrinsic sigma
``size_arcsec`` (0 for stars), which the renderer convolves with the PSF.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from ppray.refcat import catalog_mag

__all__ = ["CATALOG_BANDS", "catalog_mag", "make_star_catalog", "sample_cap"]

CATALOG_BANDS = ("g", "r", "i")


def sample_cap(
    ra_deg: float, dec_deg: float, radius_deg: float, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Points uniform on the sphere within ``radius_deg`` of ``(ra_deg, dec_deg)``.

    Parameters
    ----------
    ra_deg, dec_deg, radius_deg
        Centre and angular radius of the cap (degrees).
    n
        Number of points.
    rng
        Random generator.

    Returns
    -------
    ra, dec
        Degrees; ``ra`` in ``[0, 360)``.
    """
    # cos(rho) uniform is what makes the density uniform on the sphere, not in rho.
    cos_rho = rng.uniform(math.cos(math.radians(radius_deg)), 1.0, n)
    rho = np.arccos(np.clip(cos_rho, -1.0, 1.0))
    phi = rng.uniform(0.0, 2.0 * math.pi, n)
    d0, a0 = math.radians(dec_deg), math.radians(ra_deg)
    sin_dec = math.sin(d0) * cos_rho + math.cos(d0) * np.sin(rho) * np.cos(phi)
    dec = np.arcsin(np.clip(sin_dec, -1.0, 1.0))
    ra = a0 + np.arctan2(np.sin(phi) * np.sin(rho) * math.cos(d0), cos_rho - math.sin(d0) * sin_dec)
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _power_law_mags(
    n: int, mag_range: tuple[float, float], slope: float, rng: np.random.Generator
) -> np.ndarray:
    lo, hi = sorted(mag_range)
    # Inverse CDF of dN/dm ∝ 10**(slope m), in a form that does not overflow for faint limits.
    u = rng.uniform(0.0, 1.0, n)
    span = 10.0 ** (slope * (lo - hi))
    return hi + np.log10(span + u * (1.0 - span)) / slope


def _colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """g-r and r-i along a rough main-sequence locus, with a little scatter."""
    g_r = rng.uniform(0.2, 1.4, n)
    r_i = 0.45 * g_r - 0.08 + rng.normal(0.0, 0.03, n)
    return g_r, r_i


def make_star_catalog(
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    *,
    density_per_deg2: float = 20000.0,
    mag_range: tuple[float, float] = (16.0, 24.0),
    slope: float = 0.3,
    seed: int = 0,
    galaxies: bool = False,
    galaxy_density_per_deg2: float = 10000.0,
) -> pa.Table:
    """A synthetic catalog of stars (and optional galaxies) in a cap on the sky.

    Parameters
    ----------
    ra_deg, dec_deg
        Centre of the cap (ICRS, degrees).
    radius_deg
        Angular radius of the cap (degrees); use ``Instrument.field_radius_deg()``
        (plus any dither) to cover a whole camera.
    density_per_deg2
        Mean number of stars per square degree with r in ``mag_range``; the
        number drawn is Poisson about ``density * area``.
    mag_range
        Brightest and faintest r-band AB magnitude.
    slope
        Logarithmic slope of the number counts, ``d log10 N / dm``.
    seed
        Random seed: equal arguments give an identical table.
    galaxies
        Add galaxies (round Gaussian blobs, ``size_arcsec`` > 0) after the stars.
    galaxy_density_per_deg2
        Mean number of galaxies per square degree, when ``galaxies`` is set.

    Returns
    -------
    pyarrow.Table
        ``id`` (int64, 0..n-1), ``ra``, ``dec`` (deg), ``mag`` (r-band AB),
        ``mag_g``, ``mag_r``, ``mag_i`` (AB), ``size_arcsec`` (intrinsic
        Gaussian sigma; 0 for stars).
    """
    if radius_deg <= 0 or not math.isfinite(radius_deg):
        raise ValueError(f"radius_deg must be a positive number, not {radius_deg!r}")
    if density_per_deg2 < 0:
        raise ValueError(f"density_per_deg2 must be >= 0, not {density_per_deg2!r}")
    rng = np.random.default_rng(seed)
    cap_sr = 2.0 * math.pi * (1.0 - math.cos(math.radians(radius_deg)))
    area_deg2 = cap_sr * (180.0 / math.pi) ** 2

    n_star = int(rng.poisson(density_per_deg2 * area_deg2))
    ra, dec = sample_cap(ra_deg, dec_deg, radius_deg, n_star, rng)
    mag_r = _power_law_mags(n_star, mag_range, slope, rng)
    g_r, r_i = _colours(n_star, rng)
    size = np.zeros(n_star)

    if galaxies:
        n_gal = int(rng.poisson(galaxy_density_per_deg2 * area_deg2))
        g_ra, g_dec = sample_cap(ra_deg, dec_deg, radius_deg, n_gal, rng)
        # Galaxy counts are steeper than star counts, and few are brighter than 18th.
        g_mag = _power_law_mags(n_gal, (max(mag_range[0], 18.0), mag_range[1]), 0.4, rng)
        g_gr, g_ri = _colours(n_gal, rng)
        g_size = rng.lognormal(math.log(0.4), 0.4, n_gal)
        ra, dec = np.concatenate([ra, g_ra]), np.concatenate([dec, g_dec])
        mag_r = np.concatenate([mag_r, g_mag])
        g_r, r_i = np.concatenate([g_r, g_gr]), np.concatenate([r_i, g_ri])
        size = np.concatenate([size, g_size])

    n = ra.size
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "ra": pa.array(ra, pa.float64()),
            "dec": pa.array(dec, pa.float64()),
            "mag": pa.array(mag_r, pa.float64()),
            "mag_g": pa.array(mag_r + g_r, pa.float64()),
            "mag_r": pa.array(mag_r, pa.float64()),
            "mag_i": pa.array(mag_r - r_i, pa.float64()),
            "size_arcsec": pa.array(size, pa.float64()),
        }
    )
