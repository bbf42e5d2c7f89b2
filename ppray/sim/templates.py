"""Simulated templates: deep coadds rendered directly on the patch grids.

A template here stands for the coadd of ``depth`` background-subtracted visits of
``exptime_s`` seconds each, taken in seeing ``seeing_fwhm_arcsec``. It is in the
units of *one* such visit (electrons in ``exptime_s`` at ``zero_point_mag``), so
that it is directly comparable with a science exposure of that length, and its
noise is one visit's divided by ``sqrt(depth)``: per pixel, Gaussian with variance
``(objects + sky + read_noise²) / depth`` (a sum of many Poisson draws is very
nearly Gaussian). The variance plane is that expected variance.

Given a :class:`~ppray.sim.psf.PsfField`, a patch is drawn as the realistic sky
is (:func:`ppray.sim.realistic.render_objects`: that PSF, galaxies with shapes),
never with trails; bright stars are drawn unsaturated, as a coadd's model of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS

from ppray.image import Exposure
from ppray.sim.psf import PsfField
from ppray.sim.realistic import render_objects
from ppray.sim.render import _STAMP_SIGMAS, _near_detector, _render_objects, fwhm_to_sigma
from ppray.sim.sky import catalog_mag
from ppray.templates import PatchId, TemplateStore, Tiling, patches_for_footprint

__all__ = ["make_template_patch", "write_templates_for_field"]


def make_template_patch(
    catalog: pa.Table,
    wcs: WCS,
    shape: tuple[int, int],
    *,
    band: str = "r",
    seeing_fwhm_arcsec: float = 0.7,
    exptime_s: float = 30.0,
    depth: float = 20.0,
    sky_e_per_px_per_s: float = 30.0,
    zero_point_mag: float = 28.0,
    read_noise_e: float = 6.0,
    seed: int = 0,
    noise: bool = True,
    psf: PsfField | None = None,
) -> Exposure:
    """Render a deep template on a patch grid.

    Parameters
    ----------
    catalog
        Objects (``ra``, ``dec``, ``mag`` or ``mag_{band}``, optional
        ``size_arcsec``), as for :func:`ppray.sim.render.render_detector`.
    wcs, shape
        The patch grid (0-based pixels) and its numpy shape ``(ny, nx)``.
    band
        Filter; selects the catalog's magnitudes.
    seeing_fwhm_arcsec
        FWHM of the coadd's Gaussian PSF.
    exptime_s
        Exposure time of the visit whose units the template is in (s).
    depth
        Number of such visits coadded (> 0): the template's noise variance is
        ``1/depth`` of a visit's.
    sky_e_per_px_per_s, zero_point_mag, read_noise_e
        Sky, zero point (AB mag for 1 e-/s) and read noise of the visits.
    seed
        Noise seed.
    noise
        ``False`` for the noiseless expected image (tests); the variance plane is the same.
    psf
        The coadd's PSF on the patch grid (realistic sky); ``seeing_fwhm_arcsec``
        is then only checked, and ``SEEING`` is this PSF's FWHM at the patch centre.

    Returns
    -------
    Exposure
        Background-subtracted ``float32`` image and variance, zero mask, ``wcs``;
        metadata ``EXPTIME``, ``BAND``, ``DEPTH``, ``SEEING`` (arcsec), ``ZEROPT``.
    """
    if not depth > 0:
        raise ValueError(f"depth must be > 0, not {depth!r}")
    if not (seeing_fwhm_arcsec > 0 and exptime_s > 0):
        raise ValueError("seeing_fwhm_arcsec and exptime_s must be > 0")
    ny, nx = shape
    scale_arcsec = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
    sky_e = sky_e_per_px_per_s * exptime_s

    def coadd(objects: np.ndarray, seeing_arcsec: float) -> Exposure:
        metadata: dict[str, float | str] = {
            "EXPTIME": float(exptime_s),
            "BAND": band,
            "DEPTH": float(depth),
            "SEEING": float(seeing_arcsec),
            "ZEROPT": float(zero_point_mag),
        }
        return _coadd(objects, wcs, depth, sky_e + read_noise_e**2, seed, noise, metadata)

    if psf is not None:
        objects, _ = render_objects(
            catalog,
            wcs,
            shape,
            psf,
            band=band,
            zero_point_mag=zero_point_mag,
            exptime_s=exptime_s,
            noise_e2=sky_e + read_noise_e**2,
        )
        return coadd(objects, psf.fwhm_px(*psf.center_px) * scale_arcsec)
    sigma_psf = fwhm_to_sigma(seeing_fwhm_arcsec, scale_arcsec)
    size = np.zeros(0)
    if "size_arcsec" in catalog.column_names and catalog.num_rows:
        size = catalog["size_arcsec"].to_numpy(zero_copy_only=False)
    reach_px = _STAMP_SIGMAS * math.hypot(sigma_psf, float(size.max(initial=0.0)) / scale_arcsec)
    cat = (
        catalog.take(_near_detector(catalog, wcs, shape, reach_px + 2.0))
        if catalog.num_rows
        else catalog
    )
    x = y = sigma = flux = np.zeros(0)
    if cat.num_rows:
        x, y = (
            np.asarray(c, dtype=np.float64)
            for c in wcs.all_world2pix(
                cat["ra"].to_numpy(zero_copy_only=False),
                cat["dec"].to_numpy(zero_copy_only=False),
                0,
            )
        )
        obj_size = (
            np.asarray(cat["size_arcsec"].to_numpy(zero_copy_only=False), dtype=np.float64)
            if "size_arcsec" in cat.column_names
            else np.zeros(cat.num_rows)
        )
        sigma = np.hypot(sigma_psf, obj_size / scale_arcsec)
        reach = _STAMP_SIGMAS * sigma + 1.0
        near = (x > -reach) & (x < nx - 1 + reach) & (y > -reach) & (y < ny - 1 + reach)
        x, y, sigma = x[near], y[near], sigma[near]
        flux = 10.0 ** (-0.4 * (catalog_mag(cat, band)[near] - zero_point_mag)) * exptime_s
    objects, _, _ = _render_objects((ny, nx), x, y, flux, sigma, sky_e + read_noise_e**2)
    return coadd(objects, seeing_fwhm_arcsec)


def _coadd(
    objects: np.ndarray,
    wcs: WCS,
    depth: float,
    background_e2: float,
    seed: int,
    noise: bool,
    metadata: dict[str, float | str],
) -> Exposure:
    """The template of noiseless ``objects``: the coadd's variance and noise."""
    variance = ((objects + background_e2) / depth).astype(np.float32)
    image = objects.astype(np.float32)
    if noise:
        rng = np.random.default_rng(seed)
        image += rng.standard_normal(objects.shape, dtype=np.float32) * np.sqrt(variance)
    return Exposure(
        image=image,
        variance=variance,
        mask=np.zeros(objects.shape, dtype=np.uint32),
        wcs=wcs,
        metadata=dict(metadata),
    )


def write_templates_for_field(
    store: TemplateStore,
    catalog: pa.Table,
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    band: str,
    *,
    seed: int = 0,
    tiling: Tiling | None = None,
    psf_for_patch: Callable[[PatchId], PsfField] | None = None,
    **kwargs: float,
) -> list[PatchId]:
    """Render and store the templates of every patch that meets a cap on the sky.

    Parameters
    ----------
    store
        Where to write (``templates/{band}/{patch}.fits``).
    catalog
        The template's catalog (e.g. :func:`ppray.sim.transients.template_catalog`).
    ra_deg, dec_deg, radius_deg
        Centre and radius of the field (degrees).
    band
        Filter.
    seed
        Noise seed; each patch mixes in its indices, so patches are independent.
    tiling
        Must match the store's; default the store's.
    psf_for_patch
        The coadd's PSF on each patch's grid (realistic sky); default the
        round Gaussian of ``seeing_fwhm_arcsec``.
    **kwargs
        ``seeing_fwhm_arcsec``, ``exptime_s``, ``depth``, ``sky_e_per_px_per_s``,
        ``zero_point_mag``, ``read_noise_e`` for :func:`make_template_patch`.

    Returns
    -------
    list[PatchId]
        The patches written, sorted.
    """
    tiling = tiling or store.tiling
    # The cap as a polygon of its bounding square's corners (a little generous).
    half = radius_deg
    cos_d = max(math.cos(math.radians(dec_deg)), 1e-6)
    corners: Sequence[tuple[float, float]] = [
        (ra_deg - half / cos_d, dec_deg - half),
        (ra_deg + half / cos_d, dec_deg - half),
        (ra_deg + half / cos_d, dec_deg + half),
        (ra_deg - half / cos_d, dec_deg + half),
    ]
    patches = patches_for_footprint(corners, 0.0, tiling)
    for patch in patches:
        wcs, shape = tiling.patch_wcs(patch)
        exposure = make_template_patch(
            catalog,
            wcs,
            shape,
            band=band,
            seed=int(np.random.SeedSequence([seed, *patch]).generate_state(1)[0]),
            psf=None if psf_for_patch is None else psf_for_patch(patch),
            **kwargs,  # type: ignore[arg-type]
        )
        store.write(patch, band, exposure)
    return patches
