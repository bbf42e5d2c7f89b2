"""The realistic sky's catalog: stars, saturating stars, close pairs and galaxies.

:func:`make_realistic_catalog` starts from the simple sky's stars
(:func:`ppray.sim.sky.make_star_catalog` with the same seed: the same stars,
same ids) and appends, from an independent random stream:

- bright stars (``bright_star_mag_range``) that saturate and bleed;
- a companion to a fraction of the stars, ``blend_separation_fwhm`` nominal
  FWHM away and ``blend_delta_mag`` fainter; both members of a pair carry the
  primary's id in ``blend_group`` (-1 for everything else);
- galaxies: elliptical exponential or de Vaucouleurs-like profiles
  (:mod:`ppray.sim.mixture`) with a half-light radius that shrinks with
  magnitude, counts steeper than the stars' (``dN/dm ∝ 10^(0.4 m)``), so they
  are common only at faint magnitudes.

Columns, on top of the simple catalog's (``id``, ``ra``, ``dec``, ``mag``,
``mag_g``, ``mag_r``, ``mag_i``, ``size_arcsec``):

``kind``
    ``"star"`` or ``"galaxy"`` (:func:`label_transients` adds the transient kinds).
``blend_group``
    The id of the pair's primary, or -1.
``sersic_n``
    0 for point sources, 1 (exponential) or 4 (de Vaucouleurs-like) for galaxies.
``hlr_arcsec``
    Half-light radius (circularised: the geometric mean of the major and minor
    semi-axes of the half-light ellipse); 0 for point sources.
``ellipticity``
    ``1 - b/a`` of a galaxy's isophotes; 0 for point sources.
``angle_deg``
    Position angle of a galaxy's major axis, east of north (degrees).

``size_arcsec`` of a galaxy is the sigma of the Gaussian with its half-light
radius (what :func:`ppray.sim.render.render_detector` would draw).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ppray.config import RealisticSkyConfig
from ppray.sim.sky import _colours, _power_law_mags, make_star_catalog, sample_cap
from ppray.sim.transients import TRANSIENT_ID_OFFSET

__all__ = ["GALAXY_PROFILES", "label_transients", "make_realistic_catalog"]

GALAXY_PROFILES: dict[int, str] = {1: "exponential", 4: "devaucouleurs"}
"""Sersic index -> the mixture profile that draws it."""

# A Gaussian's half-light radius over its sigma, sqrt(2 ln 2).
_HLR_PER_SIGMA = math.sqrt(2.0 * math.log(2.0))


def _cap_area_deg2(radius_deg: float) -> float:
    return 2.0 * math.pi * (1.0 - math.cos(math.radians(radius_deg))) * (180.0 / math.pi) ** 2


def _offset(
    ra: np.ndarray, dec: np.ndarray, sep_deg: np.ndarray, angle_rad: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Points ``sep_deg`` away at position angle ``angle_rad`` (small separations)."""
    dec2 = dec + sep_deg * np.cos(angle_rad)
    ra2 = ra + sep_deg * np.sin(angle_rad) / np.cos(np.radians(0.5 * (dec + dec2)))
    return ra2 % 360.0, dec2


def _table(columns: dict[str, np.ndarray], kind: str) -> pa.Table:
    n = columns["ra"].size
    g_r, r_i = columns.pop("g_r"), columns.pop("r_i")
    mag = columns.pop("mag")
    zeros = np.zeros(n)
    data = {
        "ra": pa.array(columns["ra"], pa.float64()),
        "dec": pa.array(columns["dec"], pa.float64()),
        "mag": pa.array(mag, pa.float64()),
        "mag_g": pa.array(mag + g_r, pa.float64()),
        "mag_r": pa.array(mag, pa.float64()),
        "mag_i": pa.array(mag - r_i, pa.float64()),
        "size_arcsec": pa.array(columns.get("size_arcsec", zeros), pa.float64()),
        "kind": pa.array([kind] * n, pa.string()),
        "blend_group": pa.array(columns.get("blend_group", np.full(n, -1)), pa.int64()),
        "sersic_n": pa.array(columns.get("sersic_n", zeros), pa.float64()),
        "hlr_arcsec": pa.array(columns.get("hlr_arcsec", zeros), pa.float64()),
        "ellipticity": pa.array(columns.get("ellipticity", zeros), pa.float64()),
        "angle_deg": pa.array(columns.get("angle_deg", zeros), pa.float64()),
    }
    return pa.table(data)


def make_realistic_catalog(
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    config: RealisticSkyConfig,
    *,
    density_per_deg2: float,
    nominal_fwhm_arcsec: float,
    seed: int = 0,
) -> pa.Table:
    """The realistic sky over a cap (module docstring).

    Parameters
    ----------
    ra_deg, dec_deg, radius_deg
        Centre and radius of the cap (degrees).
    config
        Bright stars, blends and galaxies.
    density_per_deg2
        Stars per square degree between 16th and 24th magnitude, as for the simple sky.
    nominal_fwhm_arcsec
        The seeing that blend separations are counted in.
    seed
        Random seed: equal arguments give an identical table.

    Returns
    -------
    pyarrow.Table
        The columns of the module docstring; ids ``0..n-1``, the simple sky's stars first.
    """
    base = make_star_catalog(
        ra_deg, dec_deg, radius_deg, density_per_deg2=density_per_deg2, seed=seed
    )
    rng = np.random.default_rng([seed, 0x5EA1])
    area = _cap_area_deg2(radius_deg)
    n_base = base.num_rows
    base_ra = base["ra"].to_numpy(zero_copy_only=False)
    base_dec = base["dec"].to_numpy(zero_copy_only=False)
    base_mag = base["mag"].to_numpy(zero_copy_only=False)
    g_r0 = base["mag_g"].to_numpy(zero_copy_only=False) - base_mag
    r_i0 = base_mag - base["mag_i"].to_numpy(zero_copy_only=False)

    n_bright = int(rng.poisson(config.bright_star_density_per_deg2 * area))
    b_ra, b_dec = sample_cap(ra_deg, dec_deg, radius_deg, n_bright, rng)
    b_gr, b_ri = _colours(n_bright, rng)
    bright = {
        "ra": b_ra,
        "dec": b_dec,
        "mag": rng.uniform(*config.bright_star_mag_range, n_bright),
        "g_r": b_gr,
        "r_i": b_ri,
    }

    primaries = np.flatnonzero(rng.uniform(0.0, 1.0, n_base) < config.blend_fraction)
    n_pair = primaries.size
    sep_deg = rng.uniform(*config.blend_separation_fwhm, n_pair) * nominal_fwhm_arcsec / 3600.0
    c_ra, c_dec = _offset(
        base_ra[primaries], base_dec[primaries], sep_deg, rng.uniform(0, 2 * math.pi, n_pair)
    )
    c_gr, c_ri = _colours(n_pair, rng)
    companions = {
        "ra": c_ra,
        "dec": c_dec,
        "mag": base_mag[primaries] + rng.uniform(*config.blend_delta_mag, n_pair),
        "g_r": c_gr,
        "r_i": c_ri,
        "blend_group": primaries.astype(np.int64),
    }

    n_gal = int(rng.poisson(config.galaxy_density_per_deg2 * area))
    g_ra, g_dec = sample_cap(ra_deg, dec_deg, radius_deg, n_gal, rng)
    g_mag = _power_law_mags(n_gal, config.galaxy_mag_range, 0.4, rng)
    g_gr, g_ri = _colours(n_gal, rng)
    # Fainter galaxies are smaller: a median of 0.7" at r = 21, 0.2 dex of scatter.
    lo, hi = config.galaxy_hlr_arcsec
    hlr = np.clip(0.7 * 10.0 ** (-0.1 * (g_mag - 21.0) + rng.normal(0.0, 0.2, n_gal)), lo, hi)
    bulge = rng.uniform(0.0, 1.0, n_gal) < config.galaxy_bulge_fraction
    # Bulges are rounder than discs.
    e_max = config.galaxy_ellipticity_max
    ellipticity = np.where(bulge, 0.5, 1.0) * e_max * rng.beta(1.5, 2.0, n_gal)
    galaxies = {
        "ra": g_ra,
        "dec": g_dec,
        "mag": g_mag,
        "g_r": g_gr + 0.3,
        "r_i": g_ri,
        "sersic_n": np.where(bulge, 4.0, 1.0),
        "hlr_arcsec": hlr,
        "ellipticity": ellipticity,
        "angle_deg": rng.uniform(0.0, 180.0, n_gal),
        "size_arcsec": hlr / _HLR_PER_SIGMA,
    }

    blend_group = np.full(n_base, -1, dtype=np.int64)
    blend_group[primaries] = primaries
    stars = {"ra": base_ra, "dec": base_dec, "mag": base_mag, "g_r": g_r0, "r_i": r_i0}
    stars["blend_group"] = blend_group
    parts = [
        _table(stars, "star"),
        _table(bright, "star"),
        _table(companions, "star"),
        _table(galaxies, "galaxy"),
    ]
    table = pa.concat_tables(parts)
    ids = pa.array(np.arange(table.num_rows, dtype=np.int64))
    return table.add_column(0, "id", ids)


def label_transients(catalog: pa.Table, transients: pa.Table) -> pa.Table:
    """Fill the realistic columns of rows that :mod:`ppray.sim.transients` appended.

    Rows whose ``kind`` is null (from :func:`ppray.sim.transients.science_catalog`
    or :func:`~ppray.sim.transients.template_catalog`) are point sources: their
    ``kind`` becomes the transient's (``"new"``, ``"variable"``, ``"moving"``),
    ``blend_group`` -1 and the shape columns 0. A catalog without a ``kind``
    column is returned as it is.
    """
    if "kind" not in catalog.column_names:
        return catalog
    ids = catalog["id"].to_numpy(zero_copy_only=False)
    kind = catalog["kind"].to_pylist()
    t_ids = transients["id"].to_numpy(zero_copy_only=False)
    t_kind = dict(zip(t_ids.tolist(), transients["kind"].to_pylist(), strict=True))
    for i in np.flatnonzero(pc.is_null(catalog["kind"]).to_numpy(zero_copy_only=False)):
        kind[i] = t_kind.get(int(ids[i]), "new" if ids[i] >= TRANSIENT_ID_OFFSET else "star")
    out = catalog.set_column(
        catalog.column_names.index("kind"), "kind", pa.array(kind, pa.string())
    )
    fills = {"blend_group": -1, "sersic_n": 0.0, "hlr_arcsec": 0.0}
    fills |= {"ellipticity": 0.0, "angle_deg": 0.0}
    for name, value in fills.items():
        if name in out.column_names:
            i = out.column_names.index(name)
            out = out.set_column(i, name, pc.fill_null(out[name], value))
    return out
