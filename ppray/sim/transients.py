"""Injected transients with a truth table: new sources, variables and moving objects.

A transient table (:func:`make_transients`) describes objects whose appearance
differs between the template and a visit:

``new``
    A point source absent from the template and present, at ``mag``, in every visit.
``variable``
    A point source present in the template at its base magnitude ``mag``; in a
    visit whose exposure is centred on time ``t`` (s) its magnitude is
    ``mag + delta_mag * s(t)`` with ``s = 1`` for a step variable
    (``period_s = inf``) or ``s = sin(2 pi t / period_s + phase_rad)``.
    Either an existing catalog star (``catalog_id`` >= 0; its base
    magnitudes are the catalog's) or a new star (``catalog_id`` = -1).
``moving``
    A point source absent from the template that moves linearly on the sky:
    at time ``t`` (s) it is at ``dec + dec_rate t`` and ``ra + ra_rate t / cos(dec)``
    (rates in arcsec/hour, ``ra_rate`` on the sky, i.e. already times
    ``cos(dec)``; linear in that tangent-plane sense, fine over hours). Over an
    exposure it draws a trail of ``rate * exptime`` that the renderer gets as
    sub-points no more than ``subpoint_spacing_px`` apart sharing the flux.

Magnitudes are AB; new and moving objects and new variables have flat spectra
(the same magnitude in every band of :data:`ppray.sim.sky.CATALOG_BANDS`).
Visit times are seconds from an arbitrary epoch shared by all visits (e.g.
since the start of the night); ``ra``, ``dec`` of a mover are at time 0.

To render a visit, :func:`science_catalog` gives the base catalog without the
catalog stars that vary, plus this visit's rows from
:func:`transients_for_visit`; :func:`template_catalog` gives the base catalog
plus the new variables at their base magnitude (no new or moving objects).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ppray.sim.sky import CATALOG_BANDS, catalog_mag, sample_cap

__all__ = [
    "KINDS",
    "TRANSIENT_ID_OFFSET",
    "TRANSIENT_SCHEMA",
    "VISIT_TRUTH_SCHEMA",
    "make_transients",
    "science_catalog",
    "template_catalog",
    "transients_for_visit",
]

KINDS = ("new", "variable", "moving")
# Transient ids start here so that they never collide with catalog ids (0..n-1).
TRANSIENT_ID_OFFSET = 1 << 40

TRANSIENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("kind", pa.string()),
        pa.field("catalog_id", pa.int64()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("mag", pa.float64()),
        *[pa.field(f"mag_{b}", pa.float64()) for b in CATALOG_BANDS],
        pa.field("delta_mag", pa.float64()),
        pa.field("period_s", pa.float64()),
        pa.field("phase_rad", pa.float64()),
        pa.field("ra_rate_arcsec_per_hour", pa.float64()),
        pa.field("dec_rate_arcsec_per_hour", pa.float64()),
    ]
)
"""Columns of :func:`make_transients` (see the module docstring for their meaning)."""

VISIT_TRUTH_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("kind", pa.string()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("mag", pa.float64()),
        pa.field("template_mag", pa.float64()),
        pa.field("delta_flux_e", pa.float64()),
        pa.field("sign", pa.int8()),
        pa.field("trail_length_px", pa.float64()),
    ]
)
"""Truth of one visit: position at mid-exposure (deg), magnitude in the visit and in
the template (``inf`` where absent), the flux the difference image should show
(electrons in the visit's units, science minus template), its sign and the trail
length (px, 0 for fixed objects)."""


def make_transients(
    ra: float,
    dec: float,
    radius_deg: float,
    *,
    n_new: int,
    n_variable: int,
    n_moving: int,
    mag_range: tuple[float, float] = (18.0, 22.0),
    seed: int = 0,
    base_catalog: pa.Table | None = None,
    catalog_fraction: float = 0.5,
    delta_mag_range: tuple[float, float] = (0.3, 1.5),
    period_range_s: tuple[float, float] | None = None,
    rate_range_arcsec_per_hour: tuple[float, float] = (10.0, 1000.0),
) -> pa.Table:
    """Draw transients uniformly over a cap of the sky.

    Parameters
    ----------
    ra, dec, radius_deg
        Centre and radius of the cap (deg).
    n_new, n_variable, n_moving
        How many of each kind.
    mag_range
        Magnitudes (uniform): of new and moving objects, and the base magnitude
        of variables; catalog stars are chosen within it.
    seed
        Random seed: equal arguments give an identical table.
    base_catalog
        The sky catalog (:func:`ppray.sim.sky.make_star_catalog`); up to
        ``catalog_fraction`` of the variables are its stars (``size_arcsec`` 0)
        inside the cap and ``mag_range``, the rest are new stars.
    delta_mag_range
        Range of ``|delta_mag|``; the sign is random (negative brightens).
    period_range_s
        Periods of the variables (log-uniform); ``None`` makes step variables
        that differ from the template by ``delta_mag`` in every visit.
    rate_range_arcsec_per_hour
        Speeds of the movers (log-uniform), in a random direction. At 0.2"/px
        and 30 s, 1000"/h trails over 42 px and 10"/h over 0.4 px.

    Returns
    -------
    pyarrow.Table
        Schema :data:`TRANSIENT_SCHEMA`, new then variable then moving objects;
        ``id`` is ``TRANSIENT_ID_OFFSET + i``.
    """
    if min(n_new, n_variable, n_moving) < 0:
        raise ValueError("n_new, n_variable and n_moving must be >= 0")
    if not 0.0 <= catalog_fraction <= 1.0:
        raise ValueError(f"catalog_fraction must be in [0, 1], not {catalog_fraction!r}")
    rng = np.random.default_rng([seed, 0x7EA5])
    lo, hi = sorted(mag_range)
    n = n_new + n_variable + n_moving
    kind = np.array(["new"] * n_new + ["variable"] * n_variable + ["moving"] * n_moving)
    t_ra, t_dec = sample_cap(ra, dec, radius_deg, n, rng)
    mag = rng.uniform(lo, hi, n)
    mags = {b: mag.copy() for b in CATALOG_BANDS}
    catalog_id = np.full(n, -1, dtype=np.int64)

    var = np.flatnonzero(kind == "variable")
    if base_catalog is not None and base_catalog.num_rows and var.size:
        pick = _catalog_stars(base_catalog, ra, dec, radius_deg, (lo, hi))
        take = rng.permutation(pick)[: round(catalog_fraction * var.size)]
        rows = var[: take.size]
        catalog_id[rows] = base_catalog["id"].to_numpy(zero_copy_only=False)[take]
        t_ra[rows] = base_catalog["ra"].to_numpy(zero_copy_only=False)[take]
        t_dec[rows] = base_catalog["dec"].to_numpy(zero_copy_only=False)[take]
        mag[rows] = catalog_mag(base_catalog, "r")[take]
        for b in CATALOG_BANDS:
            mags[b][rows] = catalog_mag(base_catalog, b)[take]

    delta = np.zeros(n)
    period = np.full(n, np.inf)
    phase = np.zeros(n)
    d_lo, d_hi = sorted(delta_mag_range)
    delta[var] = rng.uniform(d_lo, d_hi, var.size) * rng.choice([-1.0, 1.0], var.size)
    if period_range_s is not None:
        p_lo, p_hi = sorted(period_range_s)
        period[var] = np.exp(rng.uniform(math.log(p_lo), math.log(p_hi), var.size))
        phase[var] = rng.uniform(0.0, 2.0 * math.pi, var.size)

    ra_rate, dec_rate = np.zeros(n), np.zeros(n)
    mov = np.flatnonzero(kind == "moving")
    r_lo, r_hi = sorted(rate_range_arcsec_per_hour)
    speed = np.exp(rng.uniform(math.log(r_lo), math.log(r_hi), mov.size))
    angle = rng.uniform(0.0, 2.0 * math.pi, mov.size)
    ra_rate[mov], dec_rate[mov] = speed * np.cos(angle), speed * np.sin(angle)

    columns = {
        "id": TRANSIENT_ID_OFFSET + np.arange(n, dtype=np.int64),
        "kind": kind,
        "catalog_id": catalog_id,
        "ra": t_ra,
        "dec": t_dec,
        "mag": mag,
        **{f"mag_{b}": mags[b] for b in CATALOG_BANDS},
        "delta_mag": delta,
        "period_s": period,
        "phase_rad": phase,
        "ra_rate_arcsec_per_hour": ra_rate,
        "dec_rate_arcsec_per_hour": dec_rate,
    }
    return pa.table(
        [pa.array(columns[f.name].tolist(), f.type) for f in TRANSIENT_SCHEMA],
        schema=TRANSIENT_SCHEMA,
    )


def _catalog_stars(
    catalog: pa.Table, ra: float, dec: float, radius_deg: float, mag_range: tuple[float, float]
) -> np.ndarray:
    """Indices of catalog stars (not galaxies) in the cap and the magnitude range."""
    c_ra = np.radians(catalog["ra"].to_numpy(zero_copy_only=False))
    c_dec = np.radians(catalog["dec"].to_numpy(zero_copy_only=False))
    d0, a0 = math.radians(dec), math.radians(ra)
    cos_d = np.sin(c_dec) * math.sin(d0) + np.cos(c_dec) * math.cos(d0) * np.cos(c_ra - a0)
    mag = catalog_mag(catalog, "r")
    ok = (cos_d >= math.cos(math.radians(radius_deg))) & (mag >= mag_range[0])
    ok &= mag <= mag_range[1]
    if "size_arcsec" in catalog.column_names:
        ok &= catalog["size_arcsec"].to_numpy(zero_copy_only=False) == 0
    return np.flatnonzero(ok)


def _positions(transients: pa.Table, t_s: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of every transient at time(s) ``t_s``."""
    ra0 = transients["ra"].to_numpy(zero_copy_only=False)
    dec0 = transients["dec"].to_numpy(zero_copy_only=False)
    hours = np.asarray(t_s, dtype=np.float64) / 3600.0
    ra_rate = transients["ra_rate_arcsec_per_hour"].to_numpy(zero_copy_only=False)
    dec_rate = transients["dec_rate_arcsec_per_hour"].to_numpy(zero_copy_only=False)
    dec = dec0 + dec_rate * hours / 3600.0
    ra = (ra0 + ra_rate * hours / 3600.0 / np.cos(np.radians(dec0))) % 360.0
    return ra, dec


def _flux_e(mag: np.ndarray, zero_point_mag: float, exptime_s: float) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(10.0 ** (-0.4 * (mag - zero_point_mag)) * exptime_s)


def transients_for_visit(
    transients: pa.Table,
    visit_time_s: float,
    exptime_s: float,
    band: str,
    *,
    zero_point_mag: float = 28.0,
    pixel_scale_arcsec: float = 0.2,
    subpoint_spacing_px: float = 0.5,
) -> tuple[pa.Table, pa.Table]:
    """What the transients add to one visit, and the truth the difference image should show.

    Parameters
    ----------
    transients
        A table from :func:`make_transients`.
    visit_time_s
        Start of the exposure (s, on the transients' time axis).
    exptime_s
        Exposure time (s); the visit's "time" is mid-exposure.
    band
        Filter: picks ``mag_{band}`` (``mag`` for other bands).
    zero_point_mag
        AB magnitude giving 1 e-/s (as :class:`ppray.sim.render.SimulatedObservation`).
    pixel_scale_arcsec
        For trail lengths and sub-point spacing.
    subpoint_spacing_px
        Largest spacing of a trail's sub-points.

    Returns
    -------
    rows
        Catalog rows for the science render: ``id``, ``ra``, ``dec``, ``mag``,
        ``mag_g``, ``mag_r``, ``mag_i`` (all the visit magnitude in ``band``),
        ``size_arcsec`` (0). A mover is ``n`` sub-points at the mid-times of
        ``n`` equal slices of the exposure, each with ``1/n`` of the flux and the
        mover's ``id``. Catalog variables appear here at their visit magnitude:
        the base catalog must drop them (:func:`science_catalog` does).
    truth
        One row per transient, schema :data:`VISIT_TRUTH_SCHEMA`.
    """
    if not exptime_s > 0 or not pixel_scale_arcsec > 0 or not subpoint_spacing_px > 0:
        raise ValueError("exptime_s, pixel_scale_arcsec and subpoint_spacing_px must be > 0")
    kind = np.asarray(transients["kind"].to_numpy(zero_copy_only=False)).astype(str)
    ids = transients["id"].to_numpy(zero_copy_only=False)
    n = ids.size
    t_mid = visit_time_s + 0.5 * exptime_s
    base = catalog_mag(transients, band)
    delta = transients["delta_mag"].to_numpy(zero_copy_only=False)
    period = transients["period_s"].to_numpy(zero_copy_only=False)
    phase = transients["phase_rad"].to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        wave = np.where(np.isinf(period), 1.0, np.sin(2.0 * math.pi * t_mid / period + phase))
    mag = np.where(kind == "variable", base + delta * wave, base)
    template_mag = np.where(kind == "variable", base, np.inf)
    delta_flux = _flux_e(mag, zero_point_mag, exptime_s) - _flux_e(
        template_mag, zero_point_mag, exptime_s
    )
    ra, dec = _positions(transients, t_mid)
    speed = np.hypot(
        transients["ra_rate_arcsec_per_hour"].to_numpy(zero_copy_only=False),
        transients["dec_rate_arcsec_per_hour"].to_numpy(zero_copy_only=False),
    )
    trail_px = speed * exptime_s / 3600.0 / pixel_scale_arcsec
    truth = pa.table(
        [
            pa.array(ids, pa.int64()),
            pa.array(kind.tolist(), pa.string()),
            pa.array(ra, pa.float64()),
            pa.array(dec, pa.float64()),
            pa.array(mag, pa.float64()),
            pa.array(template_mag, pa.float64()),
            pa.array(delta_flux, pa.float64()),
            pa.array(np.sign(delta_flux).astype(np.int8), pa.int8()),
            pa.array(trail_px, pa.float64()),
        ],
        schema=VISIT_TRUTH_SCHEMA,
    )

    # Every transient becomes n_sub points at the mid-times of n_sub slices of the
    # exposure; fixed objects have n_sub = 1, at mid-exposure.
    n_sub = np.maximum(np.ceil(trail_px / subpoint_spacing_px), 1).astype(np.int64)
    owner = np.repeat(np.arange(n), n_sub)
    start = np.repeat(np.cumsum(n_sub) - n_sub, n_sub)
    k = np.arange(owner.size) - start
    t_sub = visit_time_s + (k + 0.5) / n_sub[owner] * exptime_s
    sub_ra, sub_dec = _positions(transients.take(owner), t_sub)
    sub_mag = mag[owner] + 2.5 * np.log10(n_sub[owner])
    rows = {
        "id": pa.array(ids[owner], pa.int64()),
        "ra": pa.array(sub_ra, pa.float64()),
        "dec": pa.array(sub_dec, pa.float64()),
        "mag": pa.array(sub_mag, pa.float64()),
        **{f"mag_{b}": pa.array(sub_mag, pa.float64()) for b in CATALOG_BANDS},
        "size_arcsec": pa.array(np.zeros(owner.size), pa.float64()),
    }
    return pa.table(rows), truth


def _stack(base: pa.Table, extra: pa.Table) -> pa.Table:
    """``base`` then ``extra``, in ``base``'s columns; ``base`` columns ``extra`` lacks
    are null in its rows (the realistic sky's ``kind``, shapes, ...)."""
    common = [c for c in base.column_names if c in extra.column_names]
    if len(common) < len(base.column_names):
        for name in base.column_names:
            if name not in extra.column_names:
                extra = extra.append_column(
                    name, pa.nulls(extra.num_rows, base.schema.field(name).type)
                )
        common = base.column_names
    extra = extra.select(common).cast(base.select(common).schema)
    return pa.concat_tables([base.select(common), extra])


def science_catalog(
    base_catalog: pa.Table,
    transients: pa.Table,
    visit_time_s: float,
    exptime_s: float,
    band: str,
    **kwargs: float,
) -> tuple[pa.Table, pa.Table]:
    """The catalog to render a visit with, and that visit's truth.

    The base catalog without the catalog stars that vary, plus the rows of
    :func:`transients_for_visit` (which takes ``kwargs``).
    """
    rows, truth = transients_for_visit(transients, visit_time_s, exptime_s, band, **kwargs)
    varying = pc.filter(transients["catalog_id"], pc.greater_equal(transients["catalog_id"], 0))
    keep = pc.invert(pc.is_in(base_catalog["id"], value_set=varying.combine_chunks()))
    return _stack(base_catalog.filter(keep), rows), truth


def template_catalog(base_catalog: pa.Table, transients: pa.Table, band: str) -> pa.Table:
    """The catalog to render the template with: base plus new variables at base magnitude.

    New and moving objects are absent; catalog variables are already in the
    base catalog at their base magnitude.
    """
    new_var = pc.and_(
        pc.equal(transients["kind"], "variable"), pc.equal(transients["catalog_id"], -1)
    )
    var = transients.filter(new_var)
    mag = catalog_mag(var, band)
    rows = pa.table(
        {
            "id": var["id"],
            "ra": var["ra"],
            "dec": var["dec"],
            "mag": pa.array(mag, pa.float64()),
            **{f"mag_{b}": var[f"mag_{b}"] for b in CATALOG_BANDS},
            "size_arcsec": pa.array(np.zeros(var.num_rows), pa.float64()),
        }
    )
    return _stack(base_catalog, rows)
