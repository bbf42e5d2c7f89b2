"""Astrometric calibration: match detections to a reference catalog and fit a TAN-SIP WCS.

The nominal WCS (boresight, rotator angle, camera geometry) is good to a few
arcseconds; the fit makes it good to the centroid noise. Steps:

1. Project the reference stars through the initial WCS onto the detector.
2. Find the unknown offset between the two catalogs with a vote: every pair of
   bright source and bright reference star closer than ``max_offset_arcsec``
   casts its ``(dx, dy)`` into a 2-D histogram of 1-pixel bins; the true offset
   is the peak (random pairs spread evenly), refined by the median of the
   offsets near it.
3. Match nearest neighbours (``cKDTree``) within ``match_radius_arcsec`` after
   the offset, one source per reference star.
4. Fit a TAN-SIP WCS with :func:`astropy.wcs.utils.fit_wcs_from_points`,
   re-match through it with a radius shrunk to a few times the residual rms,
   clip 3-sigma outliers, and fit again.

Nothing here raises for bad data: with no overlap, no peak or too few matches
the result has ``ok=False``, a ``reason``, and the initial WCS.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import fit_wcs_from_points, proj_plane_pixel_scales
from scipy.spatial import cKDTree

from ppray.science.detection import FLAG_BAD, FLAG_CENTROID, FLAG_EDGE, FLAG_SATURATED

__all__ = ["AstrometryResult", "fit_astrometry", "sky_residuals_arcsec"]

# Sources whose centroids these flags spoil do not constrain the fit.
_BAD_FLAGS = FLAG_BAD | FLAG_CENTROID | FLAG_EDGE | FLAG_SATURATED
# Stars used for the offset vote: enough for a clear peak, few enough that random
# pairs stay a flat floor under it.
_VOTE_SOURCES = 300
_VOTE_REFS = 600
_VOTE_MIN_PEAK = 5


@dataclass(frozen=True, eq=False)
class AstrometryResult:
    """The outcome of :func:`fit_astrometry`.

    Attributes
    ----------
    wcs
        The fitted TAN-SIP WCS (0-based pixels), or the initial WCS when not ``ok``.
    n_matches
        Matched pairs in the final fit.
    rms_arcsec
        RMS on-sky distance between the matched sources (through ``wcs``) and
        their reference stars (arcsec); NaN without a fit.
    ok
        Whether the fit succeeded.
    reason
        Empty when ``ok``; otherwise what went wrong.
    offset_px
        The initial WCS's error found by the vote: reference pixel position
        minus source position, ``(dx, dy)``.
    source_index, ref_index
        Row indices into ``sources`` and ``refcat`` of the matched pairs used in
        the final fit (empty when not ``ok``).
    """

    wcs: WCS
    n_matches: int
    rms_arcsec: float
    ok: bool
    reason: str = ""
    offset_px: tuple[float, float] = (math.nan, math.nan)
    source_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ref_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def sky_residuals_arcsec(
    wcs: WCS, x: np.ndarray, y: np.ndarray, ra: np.ndarray, dec: np.ndarray
) -> np.ndarray:
    """On-sky distance (arcsec) between pixel positions through ``wcs`` and ``(ra, dec)``.

    Parameters
    ----------
    wcs
        Any celestial WCS (0-based pixels).
    x, y
        Pixel positions.
    ra, dec
        Sky positions (degrees).

    Returns
    -------
    numpy.ndarray
        Great-circle distances, arcsec (haversine, exact at these scales).
    """
    r2, d2 = wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    r1, d1 = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    r2, d2 = np.radians(r2), np.radians(d2)
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))) * 3600.0


def _failed(initial_wcs: WCS, reason: str, n: int = 0) -> AstrometryResult:
    return AstrometryResult(
        wcs=initial_wcs, n_matches=n, rms_arcsec=math.nan, ok=False, reason=reason
    )


def _vote_offset(
    sx: np.ndarray, sy: np.ndarray, rx: np.ndarray, ry: np.ndarray, max_offset_px: float
) -> tuple[float, float, int]:
    """Peak of the histogram of reference-minus-source offsets within ``max_offset_px``."""
    tree = cKDTree(np.c_[rx, ry])
    pairs = tree.query_ball_point(np.c_[sx, sy], r=max_offset_px)
    lengths = np.fromiter((len(p) for p in pairs), dtype=np.int64, count=len(pairs))
    if lengths.sum() == 0:
        return math.nan, math.nan, 0
    src = np.repeat(np.arange(sx.size), lengths)
    ref = np.fromiter((j for p in pairs for j in p), dtype=np.int64, count=int(lengths.sum()))
    dx, dy = rx[ref] - sx[src], ry[ref] - sy[src]
    nbin = 2 * math.ceil(max_offset_px) + 1
    edges = np.arange(nbin + 1) - nbin / 2.0
    hist, _, _ = np.histogram2d(dy, dx, bins=(edges, edges))
    # A 2x2 box sum keeps a peak that straddles a bin edge in one cell.
    box = hist[:-1, :-1] + hist[1:, :-1] + hist[:-1, 1:] + hist[1:, 1:]
    iy, ix = np.unravel_index(int(np.argmax(box)), box.shape)
    peak = int(box[iy, ix])
    cy, cx = edges[iy + 1], edges[ix + 1]
    near = (np.abs(dx - cx) <= 1.5) & (np.abs(dy - cy) <= 1.5)
    if peak < _VOTE_MIN_PEAK or not near.any():
        return math.nan, math.nan, peak
    return float(np.median(dx[near])), float(np.median(dy[near])), peak


def _match(
    sx: np.ndarray, sy: np.ndarray, rx: np.ndarray, ry: np.ndarray, radius_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest source to each reference star within ``radius_px``, each source used once."""
    if sx.size == 0 or rx.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    dist, si = cKDTree(np.c_[sx, sy]).query(np.c_[rx, ry], distance_upper_bound=radius_px)
    ri = np.flatnonzero(np.isfinite(dist))
    si, dist = si[ri], dist[ri]
    # Where two reference stars claim one source, the closer one keeps it.
    order = np.lexsort((dist, si))
    si, ri = si[order], ri[order]
    first = np.r_[True, si[1:] != si[:-1]]
    return si[first], ri[first]


def _fit(
    x: np.ndarray, y: np.ndarray, ra: np.ndarray, dec: np.ndarray, sip_degree: int | None
) -> WCS:
    coords = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    with warnings.catch_warnings():
        # astropy's SIP fit warns about its own header round trips.
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", AstropyWarning)
        return fit_wcs_from_points((x, y), coords, proj_point="center", sip_degree=sip_degree)


def fit_astrometry(
    sources: pa.Table,
    refcat: pa.Table,
    initial_wcs: WCS,
    *,
    match_radius_arcsec: float = 2.0,
    sip_degree: int = 2,
    max_offset_arcsec: float = 10.0,
    min_snr: float = 20.0,
    min_matches: int = 6,
    max_fit_stars: int = 500,
) -> AstrometryResult:
    """Match sources to a reference catalog and fit a TAN-SIP WCS.

    Parameters
    ----------
    sources
        Detections: ``x``, ``y`` (0-based pixels), ``snr``, ``flux`` and ``flags``
        (see :func:`ppray.science.detection.detect_sources`).
    refcat
        Reference stars: ``id``, ``ra``, ``dec`` (deg), ``mag``.
    initial_wcs
        The nominal WCS of the detector (0-based pixels).
    match_radius_arcsec
        Match radius once the offset is removed.
    sip_degree
        Degree of the SIP distortion polynomials (below 2: pure TAN). It is
        lowered, down to pure TAN, when there are fewer than three matches per
        free parameter.
    max_offset_arcsec
        Largest error of the initial WCS searched for.
    min_snr
        Minimum S/N of sources used in the fit: fainter centroids add noise.
    min_matches
        Fewest matches for a fit.
    max_fit_stars
        Most (brightest) sources used: a few hundred pin a degree-2 SIP fit of one
        CCD down to its centroid noise; more only cost time.

    Returns
    -------
    AstrometryResult
        ``ok=False``, a ``reason`` and the initial WCS when the catalogs do not
        overlap, the offset is not found or too few stars match.
    """
    if sources.num_rows == 0:
        return _failed(initial_wcs, "no sources")
    if refcat.num_rows == 0:
        return _failed(initial_wcs, "empty reference catalog")
    x = sources["x"].to_numpy(zero_copy_only=False).astype(np.float64)
    y = sources["y"].to_numpy(zero_copy_only=False).astype(np.float64)
    snr = sources["snr"].to_numpy(zero_copy_only=False).astype(np.float64)
    flags = sources["flags"].to_numpy(zero_copy_only=False)
    usable = np.isfinite(x) & np.isfinite(y) & (np.nan_to_num(snr) > min_snr)
    usable &= (flags & _BAD_FLAGS) == 0
    src = np.flatnonzero(usable)
    src = src[np.argsort(-snr[src], kind="stable")][:max_fit_stars]
    if src.size < min_matches:
        return _failed(initial_wcs, f"{src.size} usable sources, fewer than {min_matches}")
    sx, sy = x[src], y[src]

    scale_arcsec = float(np.mean(proj_plane_pixel_scales(initial_wcs.celestial))) * 3600.0
    max_off_px = max_offset_arcsec / scale_arcsec
    ra = refcat["ra"].to_numpy(zero_copy_only=False).astype(np.float64)
    dec = refcat["dec"].to_numpy(zero_copy_only=False).astype(np.float64)
    mag = refcat["mag"].to_numpy(zero_copy_only=False).astype(np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        # Reference stars far behind the tangent plane project to NaN: that is fine.
        warnings.simplefilter("ignore", RuntimeWarning)
        rx_all, ry_all = initial_wcs.all_world2pix(ra, dec, 0, quiet=True)
    margin = max_off_px + 1.0
    ref = np.flatnonzero(
        np.isfinite(rx_all)
        & np.isfinite(ry_all)
        & (rx_all > sx.min() - margin)
        & (rx_all < sx.max() + margin)
        & (ry_all > sy.min() - margin)
        & (ry_all < sy.max() + margin)
    )
    if ref.size < min_matches:
        return _failed(
            initial_wcs, f"{ref.size} reference stars on the detector, fewer than {min_matches}"
        )
    ref = ref[np.argsort(mag[ref], kind="stable")]

    # 1. The offset of the initial WCS, from the brightest of both catalogs.
    nv = min(_VOTE_SOURCES, src.size)
    vref = ref[: max(_VOTE_REFS, 2 * nv)]
    dx, dy, peak = _vote_offset(sx[:nv], sy[:nv], rx_all[vref], ry_all[vref], max_off_px)
    if not math.isfinite(dx):
        return _failed(
            initial_wcs,
            f"no consistent offset within {max_offset_arcsec:g} arcsec "
            f"(best vote {peak} pairs, need {_VOTE_MIN_PEAK})",
        )

    # 2. Match with the offset removed, fit; re-match through the fit and refit.
    radius_px = match_radius_arcsec / scale_arcsec
    si, ri = _match(sx, sy, rx_all[ref] - dx, ry_all[ref] - dy, radius_px)
    wcs = initial_wcs
    rms = math.nan
    for iteration in range(2):
        n = si.size
        if n < min_matches:
            return _failed(
                initial_wcs,
                f"{n} matches within {match_radius_arcsec:g} arcsec, fewer than {min_matches}",
                n,
            )
        # A SIP polynomial of degree d has (d+1)(d+2)/2 - 3 terms per axis, on top of
        # the 6 linear ones; ask for 3 stars per free parameter.
        # (SIP starts at degree 2: degree 1 is the linear part, already in CD.)
        degree: int | None = sip_degree if sip_degree >= 2 else None
        while degree is not None and n < 3 * (6 + (degree + 1) * (degree + 2) - 6):
            degree = degree - 1 if degree > 2 else None
        try:
            wcs = _fit(sx[si], sy[si], ra[ref[ri]], dec[ref[ri]], degree)
        except (ValueError, np.linalg.LinAlgError) as exc:
            return _failed(initial_wcs, f"WCS fit failed: {exc}", n)
        resid = sky_residuals_arcsec(wcs, sx[si], sy[si], ra[ref[ri]], dec[ref[ri]])
        rms = float(np.sqrt(np.mean(resid**2)))
        if iteration == 1:
            break
        # Re-match through the new WCS with a radius a few times the scatter, then
        # drop 3-sigma outliers (blends, moving or mismatched stars).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rx, ry = wcs.all_world2pix(ra[ref], dec[ref], 0, quiet=True)
        radius_px = min(match_radius_arcsec, max(5.0 * rms, 0.2)) / scale_arcsec
        si, ri = _match(sx, sy, rx, ry, radius_px)
        resid = sky_residuals_arcsec(wcs, sx[si], sy[si], ra[ref[ri]], dec[ref[ri]])
        keep = resid <= max(3.0 * float(np.sqrt(np.mean(resid**2))) if resid.size else 0.0, 0.05)
        si, ri = si[keep], ri[keep]

    return AstrometryResult(
        wcs=wcs,
        n_matches=int(si.size),
        rms_arcsec=rms,
        ok=True,
        reason="",
        offset_px=(dx, dy),
        source_index=src[si].astype(np.int64),
        ref_index=ref[ri].astype(np.int64),
    )
