"""Render a detector of the realistic sky: varying PSF, galaxies, trails, bleeding stars.

The realistic counterpart of :func:`ppray.sim.render.render_detector`, with
the same conditions (:class:`~ppray.sim.render.SimulatedObservation`), noise,
calibration signatures, cosmic rays and readout, but:

1. every point source is drawn with the detector's :class:`~ppray.sim.psf.PsfField`
   at its position (elliptical, with Moffat-like wings, varying over the detector);
2. galaxies (``sersic_n`` > 0 in the catalog, :mod:`ppray.sim.realsky`) are
   elliptical exponential or de Vaucouleurs-like mixtures convolved with that PSF;
3. satellite and aircraft trails (:class:`~ppray.sim.artifacts.Streak`) are added
   to the light;
4. after the Poisson draw, charge above full well (the amplifiers' saturation
   times their gain, in electrons) bleeds along its column, conserving charge.

Everything drawn is in :class:`RealisticTruth`. ``image_e`` is the expected
light (sky, objects, trails) in flat-fielded electrons, as in the simple mode;
bleeding moves collected charge, so it is in ``bleed_mask``, not in ``image_e``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from ppray.image import Calibrations
from ppray.instrument import Detector, Instrument
from ppray.science.stats import FWHM_PER_SIGMA
from ppray.sim.artifacts import Streak, render_streaks, streak_truth
from ppray.sim.mixture import (
    DEFAULT_FLOOR_E,
    MAX_HALF_PX,
    profile_mixture,
    render_mixtures,
    shape_matrix,
)
from ppray.sim.psf import PsfField
from ppray.sim.realsky import GALAXY_PROFILES
from ppray.sim.render import SimTruth, SimulatedObservation, _expose, _near_detector
from ppray.sim.sky import catalog_mag

__all__ = [
    "REALISTIC_TRUTH_COLUMNS",
    "RealisticTruth",
    "RenderedObjects",
    "full_well_e",
    "render_objects",
    "render_realistic",
]

REALISTIC_TRUTH_COLUMNS = (
    "kind",
    "blend_group",
    "sersic_n",
    "hlr_arcsec",
    "ellipticity",
    "angle_deg",
    "psf_fwhm_px",
    "nearest_id",
    "nearest_sep_px",
    "bleeding",
)
"""Columns the realistic truth adds after the simple mode's (:class:`RealisticTruth`)."""

# Pairs of galaxy and PSF components lighter than this are left out (together well
# under the stamps' flux budget): it halves the components of a galaxy.
_MIN_PAIR_WEIGHT = 2e-5
# Galaxies are convolved with each of the PSF's first components; the rest (the
# Moffat profile's faint far wings: 0.9% of its light) act on the galaxy's moments.
_PSF_PAIRED = 3
# A catalog without realistic columns: galaxies are round Gaussians of sigma size_arcsec.
_GAUSSIAN_SIGMA = (np.array([1.0]), np.array([1.0]))


@dataclass(frozen=True)
class RealisticTruth(SimTruth):
    """:class:`~ppray.sim.render.SimTruth` of the realistic sky.

    Attributes
    ----------
    stars
        Every object whose centre is on the detector: the simple mode's columns
        (``flux_e`` the total flux, ``snr`` the S/N of the object's own
        profile, ``peak_e``, ``saturated``, ...) and :data:`REALISTIC_TRUTH_COLUMNS`:
        ``kind`` (``star``, ``galaxy``, ``new``, ``variable``, ``moving``),
        ``blend_group`` (the primary's id for an injected close pair, else -1),
        the galaxy shape on the sky (``sersic_n``, ``hlr_arcsec``,
        ``ellipticity``, ``angle_deg`` east of north; 0 for point sources),
        ``psf_fwhm_px`` (the PSF's FWHM there), the nearest other object drawn
        (``nearest_id``, ``nearest_sep_px``; -1 and inf if none) and
        ``bleeding`` (its centre pixel lies in the bleed mask).
    psf_sigma_px
        The PSF's FWHM at the detector's centre over ``FWHM_PER_SIGMA``: the
        sigma of a Gaussian as wide (the PSF itself is ``psf``).
    psf
        The PSF field of the exposure: the truth at any position.
    streaks
        The trails on the detector (:data:`ppray.sim.artifacts.STREAK_SCHEMA`).
    bleed_mask
        ``True`` where charge bled (:func:`ppray.sim.artifacts.bleed_columns`).
    """

    psf: PsfField
    streaks: pa.Table
    bleed_mask: np.ndarray


@dataclass(frozen=True)
class RenderedObjects:
    """The objects :func:`render_objects` drew, for truth tables.

    ``cat`` holds the catalog rows near the grid; the arrays are per row:
    position (0-based pixels), magnitude in the band, total flux (electrons),
    S/N and peak (electrons) of the object alone.
    """

    cat: pa.Table
    x: np.ndarray
    y: np.ndarray
    mag: np.ndarray
    flux_e: np.ndarray
    snr: np.ndarray
    peak_e: np.ndarray


def full_well_e(detector: Detector) -> float:
    """Electrons a pixel holds: the lowest amplifier saturation times its gain."""
    return min(a.saturation_adu * a.gain_e_per_adu for a in detector.amplifiers)


def _column(cat: pa.Table, name: str, default: float) -> np.ndarray:
    if name not in cat.column_names:
        return np.full(cat.num_rows, default, dtype=np.float64)
    # Rows appended by the transients code have nulls in the realistic columns.
    values = pc.fill_null(cat[name], pa.scalar(default).cast(cat.schema.field(name).type))
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


def _galaxy_components(
    cat: pa.Table,
    rows: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    psf: PsfField,
    wcs: WCS,
    profile: tuple[np.ndarray, np.ndarray],
    sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and pixel covariances of galaxies seen through the PSF (every pair)."""
    v, s = profile
    e = _column(cat, "ellipticity", 0.0)[rows]
    pa_deg = _column(cat, "angle_deg", 0.0)[rows]
    # (xi east, eta north) arcsec per pixel; a major axis at position angle PA (east
    # of north) lies at 90 - PA from the xi axis.
    jac = np.asarray(wcs.pixel_scale_matrix, dtype=np.float64) * 3600.0
    inv = np.linalg.inv(jac)
    sxx, sxy, syy = shape_matrix(e, np.radians(90.0 - pa_deg))
    sky = np.stack([np.stack([sxx, sxy], -1), np.stack([sxy, syy], -1)], -2)
    pix = inv @ sky @ inv.T * (sizes**2)[:, None, None]
    gal = np.stack([pix[:, 0, 0], pix[:, 0, 1], pix[:, 1, 1]], -1)
    w_psf, c_psf = psf.components(x, y)
    inner = slice(0, _PSF_PAIRED)
    cov = (s[None, :, None, None] ** 2 * gal[:, None, None, :]) + c_psf[:, None, inner, :]
    weights = v[:, None] * w_psf[None, inner]
    keep = (weights >= _MIN_PAIR_WEIGHT).reshape(-1)
    weights = weights.reshape(-1)[keep]
    cov = cov.reshape(rows.size, -1, 3)[:, keep]
    # The PSF's faint outer components, far wider than most galaxies, see the galaxy
    # as one Gaussian of its own second moments: the moments stay exact.
    moments = float(np.sum(v * s**2)) * gal
    outer_cov = moments[:, None, :] + c_psf[:, _PSF_PAIRED:, :]
    weights = np.concatenate([weights, w_psf[_PSF_PAIRED:]])
    cov = np.concatenate([cov, outer_cov], axis=1)
    return np.broadcast_to(weights / weights.sum(), (rows.size, weights.size)), cov


def render_objects(
    catalog: pa.Table,
    wcs: WCS,
    shape: tuple[int, int],
    psf: PsfField,
    *,
    band: str,
    zero_point_mag: float,
    exptime_s: float,
    noise_e2: float,
    floor_e: float = DEFAULT_FLOOR_E,
) -> tuple[np.ndarray, RenderedObjects]:
    """The expected electrons of a catalog's objects on a grid, noiseless, without sky.

    Parameters
    ----------
    catalog
        ``id``, ``ra``, ``dec``, ``mag`` or ``mag_{band}``, and the shape
        columns of :mod:`ppray.sim.realsky` (a catalog without them: objects
        with ``size_arcsec`` > 0 are round Gaussians of that sigma).
    wcs, shape
        The grid (0-based pixels) and its numpy shape.
    psf
        The PSF on the grid.
    band, zero_point_mag, exptime_s
        Magnitudes to electrons: ``10^(-0.4 (mag - zero_point_mag)) exptime_s``.
    noise_e2
        Background variance per pixel, for the S/N.
    floor_e
        Where stamps may end (:mod:`ppray.sim.mixture`).

    Returns
    -------
    image
        ``float64`` electrons.
    objects
        What was drawn.
    """
    ny, nx = shape
    cat = catalog
    if catalog.num_rows:
        cat = catalog.take(_near_detector(catalog, wcs, shape, MAX_HALF_PX))
    n = cat.num_rows
    x = y = np.zeros(0)
    if n:
        x, y = (
            np.asarray(c, dtype=np.float64)
            for c in wcs.all_world2pix(
                cat["ra"].to_numpy(zero_copy_only=False),
                cat["dec"].to_numpy(zero_copy_only=False),
                0,
            )
        )
    near = (x > -MAX_HALF_PX) & (x < nx + MAX_HALF_PX) & (y > -MAX_HALF_PX)
    near &= y < ny + MAX_HALF_PX
    cat, x, y = cat.filter(pa.array(near)), x[near], y[near]
    mag = catalog_mag(cat, band) if cat.num_rows else np.zeros(0)
    with np.errstate(over="ignore"):
        flux = 10.0 ** (-0.4 * (mag - zero_point_mag)) * exptime_s
    image = np.zeros(shape, dtype=np.float64)
    snr, peak = np.zeros(cat.num_rows), np.zeros(cat.num_rows)
    if "sersic_n" in cat.column_names:
        sersic = _column(cat, "sersic_n", 0.0)
        sizes = _column(cat, "hlr_arcsec", 0.0)
        kinds = [(0.0, None)] + [(float(k), profile_mixture(p)) for k, p in GALAXY_PROFILES.items()]
        groups = [(np.flatnonzero(sersic == k), prof) for k, prof in kinds]
        unknown = ~np.isin(sersic, [k for k, _ in kinds])
        if unknown.any():
            raise ValueError(f"unknown sersic_n {np.unique(sersic[unknown])}")
    else:
        sizes = _column(cat, "size_arcsec", 0.0)
        groups = [(np.flatnonzero(sizes <= 0), None), (np.flatnonzero(sizes > 0), _GAUSSIAN_SIGMA)]
    for rows, profile in groups:
        if rows.size == 0:
            continue
        if profile is None:
            w, cov = psf.components(x[rows], y[rows])
            weights = np.broadcast_to(w, (rows.size, w.size))
        else:
            weights, cov = _galaxy_components(
                cat, rows, x[rows], y[rows], psf, wcs, profile, sizes[rows]
            )
        _, snr[rows], peak[rows] = render_mixtures(
            shape,
            x[rows],
            y[rows],
            flux[rows],
            weights,
            cov,
            noise_e2=noise_e2,
            floor_e=floor_e,
            out=image,
        )
    return image, RenderedObjects(cat=cat, x=x, y=y, mag=mag, flux_e=flux, snr=snr, peak_e=peak)


def _nearest(objects: RenderedObjects) -> tuple[np.ndarray, np.ndarray]:
    """Id of and distance to the nearest object drawn with another id."""
    n = objects.x.size
    ids = objects.cat["id"].to_numpy(zero_copy_only=False) if n else np.zeros(0, np.int64)
    nearest_id = np.full(n, -1, dtype=np.int64)
    nearest_sep = np.full(n, np.inf)
    if n < 2:
        return nearest_id, nearest_sep
    tree = cKDTree(np.column_stack([objects.x, objects.y]))
    # A mover is several points with one id: look past its own points.
    k = min(n, 8)
    dist, idx = tree.query(np.column_stack([objects.x, objects.y]), k=k)
    other = ids[idx] != ids[:, None]
    first = np.argmax(other, axis=1)
    found = other[np.arange(n), first]
    nearest_id[found] = ids[idx[found, first[found]]]
    nearest_sep[found] = dist[found, first[found]]
    return nearest_id, nearest_sep


def render_realistic(
    catalog: pa.Table,
    instrument: Instrument,
    detector: Detector,
    wcs: WCS,
    obs: SimulatedObservation,
    calibs: Calibrations,
    psf: PsfField,
    *,
    seed: int,
    cosmic_rays: int = 20,
    streaks: Sequence[Streak] = (),
    bleed: bool = True,
) -> tuple[dict[str, np.ndarray], RealisticTruth]:
    """Render one detector of the realistic sky (module docstring).

    Parameters
    ----------
    catalog
        As for :func:`render_objects` (e.g. :func:`ppray.sim.realsky.make_realistic_catalog`).
    instrument, detector, wcs, obs, calibs, seed, cosmic_rays
        As for :func:`ppray.sim.render.render_detector`; ``obs.seeing_fwhm_arcsec``
        is not used (the PSF is ``psf``).
    psf
        The PSF over the detector.
    streaks
        Trails to add.
    bleed
        Bleed charge above full well along columns.

    Returns
    -------
    segments
        Amplifier name -> raw segment (integer-valued ``float32`` ADU).
    truth
        :class:`RealisticTruth`.
    """
    layout = instrument.layout
    shape = (layout.ny, layout.nx)
    rng = np.random.default_rng([seed, obs.seed])
    t = float(obs.exptime_s)
    sky_e = float(obs.sky_e_per_px_per_s) * t
    noise_e2 = sky_e + float(calibs.dark.mean()) * t + layout.read_noise_e**2
    image, objects = render_objects(
        catalog,
        wcs,
        shape,
        psf,
        band=obs.band,
        zero_point_mag=obs.zero_point_mag,
        exptime_s=t,
        noise_e2=noise_e2,
    )
    render_streaks(image, streaks, psf)
    truth_image = image.astype(np.float32)
    truth_image += np.float32(sky_e)
    del image
    segments, saturated, cr_mask, bleed_mask = _expose(
        truth_image,
        instrument,
        detector,
        calibs,
        t,
        rng,
        cosmic_rays,
        full_well_e(detector) if bleed else None,
    )
    if bleed_mask is None:
        bleed_mask = np.zeros(shape, dtype=bool)
    truth = RealisticTruth(
        image_e=truth_image,
        stars=_truth_table(objects, shape, psf, saturated, bleed_mask),
        cosmic_ray_mask=cr_mask,
        saturated=saturated,
        psf_sigma_px=psf.fwhm_px(*psf.center_px) / FWHM_PER_SIGMA,
        sky_e=sky_e,
        psf=psf,
        streaks=streak_truth(streaks, shape, psf),
        bleed_mask=bleed_mask,
    )
    return segments, truth


def _truth_table(
    objects: RenderedObjects,
    shape: tuple[int, int],
    psf: PsfField,
    saturated: np.ndarray,
    bleed_mask: np.ndarray,
) -> pa.Table:
    """The truth rows of the objects whose centre is on the detector."""
    ny, nx = shape
    x, y, cat = objects.x, objects.y, objects.cat
    nearest_id, nearest_sep = _nearest(objects)
    on = np.flatnonzero((x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5))
    cx = np.clip(np.floor(x[on] + 0.5).astype(np.int64), 0, nx - 1)
    cy = np.clip(np.floor(y[on] + 0.5).astype(np.int64), 0, ny - 1)

    def col(name: str, default: float) -> np.ndarray:
        return _column(cat, name, default)[on]

    kind = (
        cat["kind"].to_pylist()
        if "kind" in cat.column_names
        else np.where(_column(cat, "size_arcsec", 0.0) > 0, "galaxy", "star").tolist()
    )
    columns = {
        "id": pa.array(cat["id"].to_numpy(zero_copy_only=False)[on], pa.int64()),
        "ra": pa.array(cat["ra"].to_numpy(zero_copy_only=False)[on], pa.float64()),
        "dec": pa.array(cat["dec"].to_numpy(zero_copy_only=False)[on], pa.float64()),
        "x": pa.array(x[on], pa.float64()),
        "y": pa.array(y[on], pa.float64()),
        "mag": pa.array(objects.mag[on], pa.float64()),
        "flux_e": pa.array(objects.flux_e[on], pa.float64()),
        "snr": pa.array(objects.snr[on], pa.float64()),
        "peak_e": pa.array(objects.peak_e[on], pa.float64()),
        "saturated": pa.array(saturated[cy, cx], pa.bool_()),
        "size_arcsec": pa.array(col("size_arcsec", 0.0), pa.float64()),
        "kind": pa.array([kind[i] or "star" for i in on], pa.string()),
        "blend_group": pa.array(col("blend_group", -1).astype(np.int64), pa.int64()),
        "sersic_n": pa.array(col("sersic_n", 0.0), pa.float64()),
        "hlr_arcsec": pa.array(col("hlr_arcsec", 0.0), pa.float64()),
        "ellipticity": pa.array(col("ellipticity", 0.0), pa.float64()),
        "angle_deg": pa.array(col("angle_deg", 0.0), pa.float64()),
        "psf_fwhm_px": pa.array(psf.fwhm_px(x[on], y[on]), pa.float64()),
        "nearest_id": pa.array(nearest_id[on], pa.int64()),
        "nearest_sep_px": pa.array(nearest_sep[on], pa.float64()),
        "bleeding": pa.array(bleed_mask[cy, cx], pa.bool_()),
    }
    return pa.table(columns)
