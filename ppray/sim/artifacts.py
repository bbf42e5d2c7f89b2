"""Satellite and aircraft trails, and charge bleeding from saturated stars.

Trails
------
A :class:`Streak` is a straight segment on a detector (0-based pixel ends,
which may lie off the detector) of constant brightness ``flux_e_per_px``
electrons per pixel of length, seen through the local PSF blurred by an extra
Gaussian of ``extra_sigma_px`` (a defocused satellite or aircraft). For each
Gaussian component of the PSF, with covariance ``C``, the segment's image is
exact: across the trail a Gaussian of variance ``n^T C n`` (``n`` its
normal), along it the difference of two error functions at its ends.
:func:`sky_streaks` draws trails as great circles on the sky (straight lines on
every detector of a TAN camera); :func:`streak_on_detector` projects one.

Bleeding
--------
:func:`bleed_columns` moves the charge above full well out of each run of
over-full pixels of a column, half up and half down the column, filling the
pixels it meets to full well: charge is conserved, except what reaches the
ends of the detector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS
from scipy.optimize import brentq
from scipy.special import erf

from ppray.sim.mixture import DEFAULT_FLOOR_E
from ppray.sim.psf import PsfField

__all__ = [
    "BLEED_SCHEMA",
    "SKY_STREAK_SCHEMA",
    "STREAK_SCHEMA",
    "Streak",
    "bleed_columns",
    "bleed_mask_from_runs",
    "bleed_runs",
    "render_streaks",
    "sky_streaks",
    "streak_on_detector",
    "streak_truth",
]

STREAK_SCHEMA = pa.schema(
    [
        pa.field("streak_id", pa.int64()),
        pa.field("x0", pa.float64()),
        pa.field("y0", pa.float64()),
        pa.field("x1", pa.float64()),
        pa.field("y1", pa.float64()),
        pa.field("length_px", pa.float64()),
        pa.field("width_px", pa.float64()),
        pa.field("extra_sigma_px", pa.float64()),
        pa.field("flux_e_per_px", pa.float64()),
        pa.field("peak_e", pa.float64()),
        pa.field("ends_on_detector", pa.bool_()),
    ]
)
"""Truth of the trails on one detector: the ends of the part on the detector
(``x0, y0, x1, y1``, 0-based pixels, within ``[-0.5, n - 0.5]``), its length,
``width_px`` (FWHM across the trail at its middle), the extra blur, the
electrons per pixel of length, ``peak_e`` (electrons per pixel on the trail's
centre line at its middle, before pixelisation) and whether an end of the
segment itself lies on the detector (``False``: it crosses)."""

SKY_STREAK_SCHEMA = pa.schema(
    [
        pa.field("streak_id", pa.int64()),
        pa.field("ra0", pa.float64()),
        pa.field("dec0", pa.float64()),
        pa.field("ra1", pa.float64()),
        pa.field("dec1", pa.float64()),
        pa.field("flux_e_per_px", pa.float64()),
        pa.field("extra_sigma_px", pa.float64()),
    ]
)
"""Trails of one exposure: the ends of each great-circle segment (degrees)."""

BLEED_SCHEMA = pa.schema(
    [pa.field("x", pa.int64()), pa.field("y0", pa.int64()), pa.field("y1", pa.int64())]
)
"""Bleed mask as runs: column ``x``, rows ``y0 <= y < y1``."""


@dataclass(frozen=True)
class Streak:
    """A straight trail on a detector (module docstring).

    Attributes
    ----------
    x0, y0, x1, y1
        Ends of the segment (0-based pixels; may lie off the detector).
    flux_e_per_px
        Electrons per pixel of length.
    extra_sigma_px
        Gaussian blur added across (and along) the trail, beyond the PSF.
    streak_id
        Identifier shared by a trail's pieces on every detector.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    flux_e_per_px: float
    extra_sigma_px: float = 0.0
    streak_id: int = 0

    def __post_init__(self) -> None:
        if math.hypot(self.x1 - self.x0, self.y1 - self.y0) <= 0:
            raise ValueError("a streak needs two distinct ends")
        if not (self.flux_e_per_px >= 0 and self.extra_sigma_px >= 0):
            raise ValueError("flux_e_per_px and extra_sigma_px must be >= 0")


def _clip(
    streak: Streak, x_lo: float, x_hi: float, y_lo: float, y_hi: float
) -> tuple[float, float] | None:
    """Liang-Barsky: the parameters ``0 <= t0 < t1 <= 1`` of the part inside a box."""
    dx, dy = streak.x1 - streak.x0, streak.y1 - streak.y0
    t0, t1 = 0.0, 1.0
    for p, q in (
        (-dx, streak.x0 - x_lo),
        (dx, x_hi - streak.x0),
        (-dy, streak.y0 - y_lo),
        (dy, y_hi - streak.y0),
    ):
        if p == 0:
            if q < 0:
                return None
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
    return (t0, t1) if t0 < t1 else None


def _line_spread(
    psf: PsfField, streak: Streak, x: float, y: float
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and variances across the trail of the PSF's components at ``(x, y)``."""
    w, cov = psf.components(x, y)
    length = math.hypot(streak.x1 - streak.x0, streak.y1 - streak.y0)
    nx, ny = -(streak.y1 - streak.y0) / length, (streak.x1 - streak.x0) / length
    c = cov[0]
    var = c[:, 0] * nx * nx + 2.0 * c[:, 1] * nx * ny + c[:, 2] * ny * ny
    return w, var + streak.extra_sigma_px**2


def streak_truth(streaks: Sequence[Streak], shape: tuple[int, int], psf: PsfField) -> pa.Table:
    """The truth table (:data:`STREAK_SCHEMA`) of the trails that cross a detector."""
    ny, nx = shape
    rows = []
    for s in streaks:
        clip = _clip(s, -0.5, nx - 0.5, -0.5, ny - 0.5)
        if clip is None:
            continue
        t0, t1 = clip
        dx, dy = s.x1 - s.x0, s.y1 - s.y0
        xa, ya, xb, yb = s.x0 + t0 * dx, s.y0 + t0 * dy, s.x0 + t1 * dx, s.y0 + t1 * dy
        w, var = _line_spread(psf, s, 0.5 * (xa + xb), 0.5 * (ya + yb))

        def lsf(d: float, w: np.ndarray = w, var: np.ndarray = var) -> float:
            return float(np.sum(w * np.exp(-0.5 * d * d / var) / np.sqrt(2.0 * math.pi * var)))

        top = lsf(0.0)

        def below_half(d: float, top: float = top) -> float:
            return lsf(d) - 0.5 * top

        half_width = brentq(below_half, 0.0, 20.0 * math.sqrt(var.max()))
        rows.append(
            {
                "streak_id": s.streak_id,
                "x0": xa,
                "y0": ya,
                "x1": xb,
                "y1": yb,
                "length_px": math.hypot(xb - xa, yb - ya),
                "width_px": 2.0 * half_width,
                "extra_sigma_px": s.extra_sigma_px,
                "flux_e_per_px": s.flux_e_per_px,
                "peak_e": s.flux_e_per_px * top,
                "ends_on_detector": _inside(s, nx, ny),
            }
        )
    return pa.Table.from_pylist(rows, schema=STREAK_SCHEMA)


def _inside(s: Streak, nx: int, ny: int) -> bool:
    def on(x: float, y: float) -> bool:
        return -0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5

    return on(s.x0, s.y0) or on(s.x1, s.y1)


def render_streaks(
    image: np.ndarray,
    streaks: Sequence[Streak],
    psf: PsfField,
    *,
    floor_e: float = DEFAULT_FLOOR_E,
) -> np.ndarray:
    """Add trails, integrated over pixels, to a float64 image in place (and return it).

    Each trail is drawn out to where it falls below ``floor_e`` electrons per
    pixel across it; the PSF is taken at every pixel, so the trail widens and
    turns with it. Pixels are integrated through the box variance only (no
    sub-pixels): a trail is at least a PSF wide, where that is good to ~1e-3.
    """
    ny, nx = image.shape
    for s in streaks:
        length = math.hypot(s.x1 - s.x0, s.y1 - s.y0)
        tx, ty = (s.x1 - s.x0) / length, (s.y1 - s.y0) / length
        # The widest reach over the detector's corners and centre.
        reach = 2.0
        for cx, cy in ((0, 0), (nx - 1, 0), (0, ny - 1), (nx - 1, ny - 1), (nx / 2, ny / 2)):
            w, var = _line_spread(psf, s, cx, cy)
            level = s.flux_e_per_px * w / np.sqrt(2.0 * math.pi * var) / floor_e
            r = np.sqrt(2.0 * (var + 1.0) * np.log(np.maximum(level, 1.0)))
            reach = max(reach, 1.2 * float(r.max()) + 2.0)
        clip = _clip(s, -reach, nx - 1 + reach, -reach, ny - 1 + reach)
        if clip is None:
            continue
        rows, cols, points, point = _band(s, clip, reach, tx, ty, nx, ny)
        if rows.size == 0:
            continue
        image[rows, cols] += _streak_values(
            s, psf, rows, cols, (points, point), tx, ty, length, floor_e
        )
    return image


def _band(
    s: Streak, clip: tuple[float, float], reach: float, tx: float, ty: float, nx: int, ny: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels within ``reach`` of the clipped segment: one run per column (or row).

    Returns the pixels' rows and columns, the points ``(x, y)`` of the trail's
    line in each column (or row) walked, where the PSF is taken, and for each
    pixel the index of its point.
    """
    t0, t1 = clip
    xa, xb = s.x0 + t0 * (s.x1 - s.x0), s.x0 + t1 * (s.x1 - s.x0)
    ya, yb = s.y0 + t0 * (s.y1 - s.y0), s.y0 + t1 * (s.y1 - s.y0)
    steep = abs(ty) > abs(tx)
    if steep:  # walk the rows and swap back at the end
        xa, ya, xb, yb, tx, ty, nx, ny = ya, xa, yb, xb, ty, tx, ny, nx
    lo = max(math.ceil(min(xa, xb) - reach), 0)
    hi = min(math.floor(max(xa, xb) + reach), nx - 1)
    major = np.arange(lo, max(hi + 1, lo))
    # Where the line is at each column, clamped to the segment's extent.
    centre = ya + (np.clip(major, min(xa, xb), max(xa, xb)) - xa) * ty / tx
    span = reach / abs(tx)
    width = math.ceil(2.0 * span) + 2
    minor = np.floor(centre - span)[:, None].astype(np.int64) + np.arange(width)[None, :]
    point = np.broadcast_to(np.arange(major.size)[:, None], minor.shape)
    ok = (minor >= 0) & (minor < ny)
    minor, point = minor[ok], point[ok]
    majors = major[point]
    points = np.column_stack([centre, major]) if steep else np.column_stack([major, centre])
    return (majors, minor, points, point) if steep else (minor, majors, points, point)


def _streak_values(
    s: Streak,
    psf: PsfField,
    rows: np.ndarray,
    cols: np.ndarray,
    line: tuple[np.ndarray, np.ndarray],
    tx: float,
    ty: float,
    length: float,
    floor_e: float,
) -> np.ndarray:
    """Electrons in each pixel from one trail, exact per component.

    The pixel response is the box variance ``1/12`` added to each component
    (:mod:`ppray.sim.mixture`), without sub-pixels: a trail is at least a PSF
    wide, where that is good to ~1e-3 of its peak. ``line`` is :func:`_band`'s
    points and each pixel's index of its point.
    """
    # The PSF at the trail's line, once per column (or row) walked: it varies over
    # hundreds of pixels, not across a trail.
    points, point = line
    w, cov = psf.components(points[:, 0], points[:, 1])
    cov = cov[point]
    var_extra = s.extra_sigma_px**2 + 1.0 / 12.0
    px = cols - s.x0
    py = rows - s.y0
    tau = px * tx + py * ty
    delta = -px * ty + py * tx
    values = np.zeros(rows.size)
    for k in range(w.size):
        cxx, cxy, cyy = cov[:, k, 0] + var_extra, cov[:, k, 1], cov[:, k, 2] + var_extra
        cnn = cxx * ty * ty - 2 * cxy * tx * ty + cyy * tx * tx
        across = np.exp(-0.5 * delta * delta / cnn) / np.sqrt(2.0 * math.pi * cnn)
        if s.flux_e_per_px * w[k] * float(across.max()) < floor_e:
            continue
        ctt = cxx * tx * tx + 2 * cxy * tx * ty + cyy * ty * ty
        ctn = (cyy - cxx) * tx * ty + cxy * (tx * tx - ty * ty)
        # Completing the square in the along-track coordinate: across, a Gaussian of
        # variance cnn; along, erf at the ends with variance det / cnn, shifted.
        sig_t = np.sqrt(2.0 * (ctt * cnn - ctn * ctn) / cnn)
        along = tau - ctn / cnn * delta
        # Far from the ends the erf difference is 1 to double precision.
        near = (along < 6.0 * sig_t) | (along > length - 6.0 * sig_t)
        a, sg = along[near], sig_t[near]
        across[near] *= 0.5 * (erf(a / sg) - erf((a - length) / sg))
        values += w[k] * across
    return s.flux_e_per_px * values


def streak_on_detector(row: dict[str, float], wcs: WCS) -> Streak:
    """One sky trail (a row of :data:`SKY_STREAK_SCHEMA`) as a :class:`Streak` on a detector."""
    (x0, x1), (y0, y1) = wcs.all_world2pix([row["ra0"], row["ra1"]], [row["dec0"], row["dec1"]], 0)
    return Streak(
        x0=float(x0),
        y0=float(y0),
        x1=float(x1),
        y1=float(y1),
        flux_e_per_px=float(row["flux_e_per_px"]),
        extra_sigma_px=float(row["extra_sigma_px"]),
        streak_id=int(row["streak_id"]),
    )


def sky_streaks(
    anchors_deg: Sequence[tuple[float, float]],
    rng: np.random.Generator,
    *,
    crossing_deg: float,
    segment_deg: float,
    segment_fraction: float,
    flux_e_per_px: tuple[float, float],
    defocus_sigma_px: tuple[float, float],
    first_id: int = 0,
) -> pa.Table:
    """Trails through given points of the sky, as great-circle segments.

    Parameters
    ----------
    anchors_deg
        ``(ra, dec)`` of a point on each trail (e.g. on a simulated detector).
    rng
        Random generator.
    crossing_deg
        Half-length of a crossing trail (beyond the camera's field).
    segment_deg
        Up to this half-length for the trails that end in the field.
    segment_fraction
        Fraction of trails that are segments (with their middle within
        ``segment_deg`` of the anchor) rather than crossings.
    flux_e_per_px
        Range of the brightness (log-uniform).
    defocus_sigma_px
        Range of the extra blur (uniform), given to half of the trails; the
        rest are in focus.
    first_id
        ``streak_id`` of the first trail.

    Returns
    -------
    pyarrow.Table
        :data:`SKY_STREAK_SCHEMA`.
    """
    rows = []
    for i, (ra, dec) in enumerate(anchors_deg):
        angle = rng.uniform(0.0, 2.0 * math.pi)
        if rng.uniform() < segment_fraction:
            half = rng.uniform(0.3, 1.0) * segment_deg
            mid = rng.uniform(-half, half)
        else:
            half, mid = crossing_deg, 0.0
        ends = [_gnomonic_inverse(ra, dec, (mid + sign * half), angle) for sign in (-1.0, 1.0)]
        lo, hi = flux_e_per_px
        flux = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        extra = rng.uniform(*defocus_sigma_px) if rng.uniform() < 0.5 else 0.0
        rows.append(
            {
                "streak_id": first_id + i,
                "ra0": ends[0][0],
                "dec0": ends[0][1],
                "ra1": ends[1][0],
                "dec1": ends[1][1],
                "flux_e_per_px": flux,
                "extra_sigma_px": extra,
            }
        )
    return pa.Table.from_pylist(rows, schema=SKY_STREAK_SCHEMA)


def _gnomonic_inverse(
    ra_deg: float, dec_deg: float, offset_deg: float, angle_rad: float
) -> tuple[float, float]:
    """The sky position ``offset_deg`` along the tangent-plane line through a point."""
    xi = math.tan(math.radians(offset_deg)) * math.sin(angle_rad)
    eta = math.tan(math.radians(offset_deg)) * math.cos(angle_rad)
    a0, d0 = math.radians(ra_deg), math.radians(dec_deg)
    dec = math.asin((math.sin(d0) + eta * math.cos(d0)) / math.sqrt(1.0 + xi * xi + eta * eta))
    ra = a0 + math.atan2(xi, math.cos(d0) - eta * math.sin(d0))
    return math.degrees(ra) % 360.0, math.degrees(dec)


def bleed_columns(electrons: np.ndarray, full_well_e: float) -> tuple[np.ndarray, float]:
    """Bleed the charge above full well along columns, in place (module docstring).

    Parameters
    ----------
    electrons
        ``[y, x]`` electrons collected per pixel (modified).
    full_well_e
        Most electrons a pixel holds.

    Returns
    -------
    mask
        ``True`` where bleeding changed the charge: the over-full pixels and
        those the excess flowed into.
    lost_e
        Electrons that bled off the ends of the detector.
    """
    mask = np.zeros(electrons.shape, dtype=bool)
    lost = 0.0
    for col in np.flatnonzero((electrons > full_well_e).any(axis=0)):
        v = electrons[:, col].astype(np.float64)
        before = v.copy()
        over = np.concatenate([[False], v > full_well_e, [False]])
        starts = np.flatnonzero(over[1:] & ~over[:-1])
        stops = np.flatnonzero(~over[1:] & over[:-1])
        for a, b in zip(starts, stops, strict=True):
            excess = float(np.sum(v[a:b] - full_well_e))
            v[a:b] = full_well_e
            lost += _spill(v, int(b), 1, 0.5 * excess, full_well_e)
            lost += _spill(v, int(a) - 1, -1, 0.5 * excess, full_well_e)
        electrons[:, col] = v
        mask[:, col] = v != before
    return mask, lost


def _spill(v: np.ndarray, start: int, step: int, charge: float, full: float) -> float:
    """Fill ``v`` from ``start`` onwards in direction ``step`` up to ``full`` with
    ``charge``, in place; returns what is left over at the end."""
    if charge <= 0:
        return 0.0
    # A view, so that filling it fills v.
    run = v[start:] if step > 0 else v[: start + 1][::-1]
    room = np.maximum(full - run, 0.0)
    filled = np.cumsum(room)
    n_full = int(np.searchsorted(filled, charge, side="right"))
    run[:n_full] += room[:n_full]
    if n_full < run.size:
        run[n_full] += charge - (filled[n_full - 1] if n_full else 0.0)
        return 0.0
    return charge - (float(filled[-1]) if filled.size else 0.0)


def bleed_runs(mask: np.ndarray) -> pa.Table:
    """A bleed mask as runs along columns (:data:`BLEED_SCHEMA`)."""
    xs, y0s, y1s = [], [], []
    for col in np.flatnonzero(mask.any(axis=0)):
        m = np.concatenate([[False], mask[:, col], [False]])
        starts = np.flatnonzero(m[1:] & ~m[:-1])
        stops = np.flatnonzero(~m[1:] & m[:-1])
        xs.extend([int(col)] * starts.size)
        y0s.extend(starts.tolist())
        y1s.extend(stops.tolist())
    return pa.table(
        [pa.array(xs, pa.int64()), pa.array(y0s, pa.int64()), pa.array(y1s, pa.int64())],
        schema=BLEED_SCHEMA,
    )


def bleed_mask_from_runs(runs: pa.Table, shape: tuple[int, int]) -> np.ndarray:
    """The mask that :func:`bleed_runs` described."""
    mask = np.zeros(shape, dtype=bool)
    for x, y0, y1 in zip(
        runs["x"].to_pylist(), runs["y0"].to_pylist(), runs["y1"].to_pylist(), strict=True
    ):
        mask[y0:y1, x] = True
    return mask
