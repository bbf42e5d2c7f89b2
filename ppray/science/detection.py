"""Single-frame source detection and measurement with ``sep`` (SExtractor as a library).

Detection thresholds the background-subtracted image at ``threshold_sigma``
times the per-pixel noise after sep's 3x3 matched filter, keeps footprints of
at least ``min_area`` pixels and deblends them. Each source then gets a
windowed centroid (SExtractor's ``XWIN/YWIN``), a circular-aperture flux with
its error from the variance plane, and flags.

Flags
-----
The low byte holds sep's own flags: object flags from extraction
(``sep.OBJ_MERGED`` 1, ``OBJ_TRUNC`` 2, ``OBJ_DOVERFLOW`` 4, ``OBJ_SINGU`` 8)
ORed with the aperture flags (``sep.APER_TRUNC`` 16, ``APER_HASMASKED`` 32,
``APER_ALLMASKED`` 64, ``APER_NONPOSITIVE`` 128). Above them:

``FLAG_EDGE`` (256)
    The footprint touches the image border or an ``EDGE`` pixel, or the
    aperture runs off the image.
``FLAG_SATURATED`` (512)
    The footprint or aperture holds a ``SAT`` pixel.
``FLAG_BAD`` (1024)
    The footprint or aperture holds a ``BAD``, ``CR`` or ``NO_DATA`` pixel.
``FLAG_CENTROID`` (2048)
    The windowed centroid failed; ``x, y`` are sep's isophotal centroid.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import sep

from ppray.image import Exposure, MaskBit

__all__ = [
    "FLAG_BAD",
    "FLAG_CENTROID",
    "FLAG_EDGE",
    "FLAG_SATURATED",
    "SOURCE_SCHEMA",
    "detect_sources",
]

FLAG_EDGE = 1 << 8
FLAG_SATURATED = 1 << 9
FLAG_BAD = 1 << 10
FLAG_CENTROID = 1 << 11

# The FWHM/sigma ratio of the XWIN window as SExtractor 2's winpos.c rounds it, kept
# rather than stats.FWHM_PER_SIGMA (2.3548): the window is a recipe, not a Gaussian
# fit, and on the demo's visits the exact ratio moves centroids enough to change a
# DIA source count.
_SEXTRACTOR_FWHM_PER_SIGMA = 2.35

SOURCE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("x", pa.float64()),
        pa.field("y", pa.float64()),
        pa.field("x_err", pa.float64()),
        pa.field("y_err", pa.float64()),
        pa.field("flux", pa.float64()),
        pa.field("flux_err", pa.float64()),
        pa.field("snr", pa.float64()),
        pa.field("psf_flux", pa.float64()),
        pa.field("psf_flux_err", pa.float64()),
        pa.field("ixx", pa.float64()),
        pa.field("iyy", pa.float64()),
        pa.field("ixy", pa.float64()),
        pa.field("a", pa.float64()),
        pa.field("b", pa.float64()),
        pa.field("theta", pa.float64()),
        pa.field("peak", pa.float64()),
        pa.field("flags", pa.int32()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
    ]
)

# Pixels whose values are not to be trusted: sep treats them as zero signal with
# infinite noise. Saturated pixels stay in: their (clipped) values still trace the
# star, and masking a saturated core would split the star into a ring of detections.
_UNTRUSTED = np.uint32(MaskBit.BAD | MaskBit.NO_DATA)
_APERTURE_MASK = np.uint32(MaskBit.BAD | MaskBit.NO_DATA | MaskBit.CR)
_SEP_PIXSTACK_MIN = 300_000
_SEP_PIXSTACK_MAX = 50_000_000


def _empty_table() -> pa.Table:
    return SOURCE_SCHEMA.empty_table()


def _ensure_pixstack(n_pixels: int) -> None:
    """Make sep's pixel stack hold a quarter of the image (saturated stars are big)."""
    want = int(min(max(n_pixels // 4, _SEP_PIXSTACK_MIN), _SEP_PIXSTACK_MAX))
    if sep.get_extract_pixstack() < want:
        sep.set_extract_pixstack(want)


def _extract(
    data: np.ndarray, err: np.ndarray, mask: np.ndarray, threshold: float, min_area: int
) -> tuple[np.ndarray, np.ndarray]:
    """``sep.extract`` that grows the pixel stack, then gives up deblending, if it must."""
    deblend_cont = 0.005
    for _ in range(10):
        try:
            return sep.extract(
                data,
                threshold,
                err=err,
                mask=mask,
                minarea=min_area,
                deblend_cont=deblend_cont,
                segmentation_map=True,
                # sep's cleaning drops real faint sources beside bright ones: measured on
                # a dense simulated field, completeness at S/N >= 20 went 88% -> 98%.
                clean=False,
            )
        except Exception as exc:
            text = str(exc)
            stack = sep.get_extract_pixstack()
            if "pixel buffer full" in text and stack < data.size:
                sep.set_extract_pixstack(min(4 * stack, data.size))
            elif "deblending overflow" in text:
                deblend_cont = 1.0  # give up deblending: blends stay single sources
            else:
                raise
    raise RuntimeError("sep.extract kept overflowing its buffers")


def _touch_flags(segmap: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Per object (1-based ids in ``segmap``): flags for mask bits inside its footprint."""
    flags = np.zeros(n, dtype=np.int32)
    pixels = np.flatnonzero(segmap)
    if pixels.size == 0:
        return flags
    ids = segmap.reshape(-1)[pixels] - 1
    bits = mask.reshape(-1)[pixels]
    for bit, flag in (
        (np.uint32(MaskBit.SAT), FLAG_SATURATED),
        (np.uint32(MaskBit.BAD | MaskBit.CR | MaskBit.NO_DATA), FLAG_BAD),
        (np.uint32(MaskBit.EDGE), FLAG_EDGE),
    ):
        hit = np.bincount(ids[(bits & bit) != 0], minlength=n)[:n] > 0
        flags[hit] |= flag
    return flags


def _aperture_flags(mask: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Flags for SAT and BAD/CR/NO_DATA pixels within ``radius`` of each position.

    Gathers each source's square of mask pixels at once (cheap for thousands of
    sources) rather than building and summing full-image planes.
    """
    flags = np.zeros(x.size, dtype=np.int32)
    if x.size == 0:
        return flags
    ny, nx = mask.shape
    half = int(np.ceil(radius))
    offsets = np.arange(-half, half + 1)
    in_circle = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= (radius + 0.5) ** 2
    cx = np.rint(x).astype(np.int64)
    cy = np.rint(y).astype(np.int64)
    cols = np.clip(cx[:, None] + offsets[None, :], 0, nx - 1)
    rows = np.clip(cy[:, None] + offsets[None, :], 0, ny - 1)
    stamps = mask[rows[:, :, None], cols[:, None, :]] * in_circle[None].astype(np.uint32)
    for bit, flag in (
        (np.uint32(MaskBit.SAT), FLAG_SATURATED),
        (np.uint32(MaskBit.BAD | MaskBit.CR | MaskBit.NO_DATA), FLAG_BAD),
    ):
        hit = ((stamps & bit) != 0).any(axis=(1, 2))
        flags[hit] |= flag
    return flags


def _deblended_centroids(
    data: np.ndarray,
    objects: np.ndarray,
    mask: np.ndarray,
    segmap: np.ndarray,
    index: np.ndarray,
    sig: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Windowed centroids of deblended pieces, each with the other pieces' pixels masked.

    On the full image a piece's window takes in its neighbour's light and walks
    towards it: two equal stars 5 px apart both ended at the midpoint. Masking
    the rest of the blend's footprint keeps each piece on its own peak (at a
    small bias away from the neighbour, which the PSF fit of the blend removes).
    """
    ny, nx = data.shape
    xs = np.empty(index.size)
    ys = np.empty(index.size)
    for k, (i, s) in enumerate(zip(index.tolist(), sig.tolist(), strict=True)):
        reach = math.ceil(4.0 * s) + 2
        x0, y0 = float(objects["x"][i]), float(objects["y"][i])
        c0, r0 = max(int(x0) - reach, 0), max(int(y0) - reach, 0)
        c1, r1 = min(int(x0) + reach + 2, nx), min(int(y0) + reach + 2, ny)
        seg = segmap[r0:r1, c0:c1]
        local = mask[r0:r1, c0:c1] | ((seg != 0) & (seg != i + 1))
        cut = np.ascontiguousarray(data[r0:r1, c0:c1])
        xw, yw, _ = sep.winpos(cut, [x0 - c0], [y0 - r0], [s], mask=local, subpix=1)
        xs[k], ys[k] = float(xw[0]) + c0, float(yw[0]) + r0
    return xs, ys


def _windowed_centroids(
    data: np.ndarray, objects: np.ndarray, mask: np.ndarray, segmap: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SExtractor's XWIN/YWIN, falling back to the isophotal centroid where it fails.

    Pieces of a deblended blend (``OBJ_MERGED``) are centred with their siblings'
    pixels masked (:func:`_deblended_centroids`).
    """
    x0, y0 = objects["x"], objects["y"]
    # SExtractor's recipe: a Gaussian window of sigma = 2 r_half / 2.35 (half-light
    # diameter taken for the FWHM).
    r_max = np.clip(6.0 * objects["a"], 3.0, 30.0)
    # Truncated or partly masked apertures (flags 16, 32) still give usable radii and
    # centroids; only non-finite results or runaway iterations count as failures.
    # subpix=1: finer sampling changes centroids by < 0.002 px here and costs 3-4x.
    r_half, _ = sep.flux_radius(data, x0, y0, r_max, 0.5, mask=mask, subpix=1)
    sig = np.clip(2.0 * np.nan_to_num(r_half, nan=1.0) / _SEXTRACTOR_FWHM_PER_SIGMA, 0.5, 20.0)
    xw, yw, _ = sep.winpos(data, x0, y0, sig, mask=mask, subpix=1)
    xw, yw = np.asarray(xw, dtype=np.float64), np.asarray(yw, dtype=np.float64)
    merged = np.flatnonzero((objects["flag"] & sep.OBJ_MERGED) != 0)
    if merged.size and segmap is not None:
        mx, my = _deblended_centroids(data, objects, mask, segmap, merged, sig[merged])
        xw[merged], yw[merged] = mx, my
    with np.errstate(invalid="ignore"):
        bad = (
            ~np.isfinite(xw)
            | ~np.isfinite(yw)
            | ~(np.hypot(xw - x0, yw - y0) <= np.maximum(1.0, 2.0 * objects["a"]))
        )
    return np.where(bad, x0, xw), np.where(bad, y0, yw), bad


def detect_sources(
    exposure: Exposure,
    *,
    threshold_sigma: float = 5.0,
    min_area: int = 5,
    aperture_radius_px: float = 6.0,
) -> pa.Table:
    """Detect and measure sources on a background-subtracted exposure.

    Parameters
    ----------
    exposure
        Background-subtracted exposure (electrons) with variance and mask; it
        is not modified.
    threshold_sigma
        Detection threshold in units of the per-pixel noise ``sqrt(variance)``
        (applied after sep's matched 3x3 filter).
    min_area
        Minimum number of pixels above threshold.
    aperture_radius_px
        Radius of the circular aperture for ``flux`` (pixels).

    Returns
    -------
    pyarrow.Table
        One row per source, schema :data:`SOURCE_SCHEMA`: ``id`` (0..n-1 in
        sep's order), ``x``, ``y`` (0-based numpy pixel coordinates; windowed
        centroid), ``x_err``, ``y_err`` (sep's isophotal centroid errors, px),
        ``flux``, ``flux_err`` (aperture sum and its error from the variance
        plane, electrons; no aperture correction), ``snr`` (``flux /
        flux_err``), ``psf_flux``, ``psf_flux_err`` (NaN here: they need the
        PSF; :func:`ppray.visit.steps.characterize` fills them in), ``ixx``,
        ``iyy``, ``ixy`` (isophotal second moments, px²), ``a``, ``b`` (px),
        ``theta`` (rad), ``peak`` (brightest pixel, electrons), ``flags`` (see
        the module docstring) and ``ra``, ``dec`` (deg; NaN without a WCS). An
        empty table of that schema when nothing is found.

    Notes
    -----
    Sets sep's global pixel-stack size (once, to a quarter of the image, at
    least 300,000) so that saturated stars fit. ``BAD`` and ``NO_DATA`` pixels
    are treated as no signal with infinite noise; ``CR`` pixels are left out of
    the aperture sums; all three, and ``SAT``, only flag the sources they touch.
    """
    if threshold_sigma <= 0 or min_area < 1 or aperture_radius_px <= 0:
        raise ValueError(
            "threshold_sigma and aperture_radius_px must be > 0 and min_area >= 1, not "
            f"{threshold_sigma}, {aperture_radius_px}, {min_area}"
        )
    mask = exposure.mask
    untrusted = (mask & _UNTRUSTED) != 0
    data = np.ascontiguousarray(exposure.image, dtype=np.float32)
    variance = np.asarray(exposure.variance, dtype=np.float32)
    # NO_DATA has infinite variance, and NaN data or zero noise would poison sep's
    # filter sums; two reductions rule them out before any full-plane search.
    with np.errstate(invalid="ignore", over="ignore"):
        clean = bool(np.isfinite(np.add.reduce(data, axis=None))) and bool(
            variance.min() > 0 and variance.max() < np.inf
        )
    bad_values: np.ndarray | None = None
    if not clean:
        bad_values = ~(np.isfinite(data) & (variance > 0) & (variance < np.inf))
        untrusted |= bad_values
        data = np.where(bad_values, np.float32(0.0), data)
        variance = np.where(bad_values, np.float32(1.0), variance)
    if untrusted.all():
        return _empty_table()
    err = np.sqrt(variance)

    _ensure_pixstack(data.size)
    objects, segmap = _extract(data, err, untrusted, threshold_sigma, min_area)
    n = len(objects)
    if n == 0:
        return _empty_table()

    x, y, centroid_failed = _windowed_centroids(data, objects, untrusted, segmap)
    aper_mask = (mask & _APERTURE_MASK) != 0
    if bad_values is not None:
        aper_mask |= bad_values
    flux, flux_err, aper_flag = sep.sum_circle(
        data, x, y, aperture_radius_px, err=err, mask=aper_mask, subpix=5
    )
    flux = np.asarray(flux, dtype=np.float64)
    flux_err = np.asarray(flux_err, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(flux_err > 0, flux / flux_err, np.nan)

    ny, nx = data.shape
    flags = objects["flag"].astype(np.int32) | np.asarray(aper_flag, dtype=np.int32)
    flags |= _touch_flags(segmap, mask, n)
    flags |= _aperture_flags(mask, x, y, aperture_radius_px)
    on_border = (
        (objects["xmin"] <= 0)
        | (objects["ymin"] <= 0)
        | (objects["xmax"] >= nx - 1)
        | (objects["ymax"] >= ny - 1)
        | ((np.asarray(aper_flag) & sep.APER_TRUNC) != 0)
    )
    flags[on_border] |= FLAG_EDGE
    flags[centroid_failed] |= FLAG_CENTROID

    if exposure.wcs is not None:
        ra, dec = exposure.wcs.all_pix2world(x, y, 0)
    else:
        ra = dec = np.full(n, math.nan)
    columns = {
        "id": np.arange(n, dtype=np.int64),
        "x": x,
        "y": y,
        "x_err": np.sqrt(np.maximum(objects["errx2"], 0.0)),
        "y_err": np.sqrt(np.maximum(objects["erry2"], 0.0)),
        "flux": flux,
        "flux_err": flux_err,
        "snr": snr,
        # Measured once the PSF is known (ppray.visit.steps.characterize).
        "psf_flux": np.full(n, math.nan),
        "psf_flux_err": np.full(n, math.nan),
        "ixx": objects["x2"],
        "iyy": objects["y2"],
        "ixy": objects["xy"],
        "a": objects["a"],
        "b": objects["b"],
        "theta": objects["theta"],
        "peak": objects["peak"],
        "flags": flags,
        "ra": ra,
        "dec": dec,
    }
    return pa.table(
        [pa.array(np.asarray(columns[f.name]), f.type) for f in SOURCE_SCHEMA],
        schema=SOURCE_SCHEMA,
    )
