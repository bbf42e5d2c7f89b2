"""Satellite and aircraft streaks on a difference image: find, measure, mask.

A streak is faint per pixel but long: a satellite at 1 sigma per pixel is a
string of noise-level fragments to a PSF matched filter, yet tens of sigma
summed along its length. :func:`find_streaks` finds such lines with a Hough
transform, as Rubin's ``MaskStreaksTask`` does, then measures each at full
resolution:

1. Blocks of ``bin_px`` x ``bin_px`` pixels are summed with inverse-variance
   weights (untrusted pixels carry none), matched-filtered with a Gaussian of
   one block, divided by their own robust scatter (correlated noise) and
   thresholded at ``threshold_sigma`` for each sign. Large compact regions of
   that binary image (bright-star and galaxy residuals, whatever their lobes)
   are dropped: a streak is elongated, a blob is not.
2. :func:`skimage.transform.hough_line` counts the binary blocks along every
   line, summed over 3 adjacent ``rho`` bins to hold a line's width. Noise
   alone sets a fraction ``p`` of the blocks, so a line's count is compared
   with ``p`` times its number of blocks with data; the excess over its
   binomial scatter, divided by that statistic's own robust scatter, is the
   Hough significance. The most significant line above ``hough_sigma`` is
   refined, the blocks it explains are taken out of the accumulator, and the
   next one is taken, up to ``max_candidates`` per sign.
3. Refinement: on a strip of blocks along the line, the streak's offset in
   chunks of 64 px (the peak of a matched filter across the line) gives a
   robust straight-line fit of the angle and offset (3 passes); a candidate
   that fails the tests below on blocks (with 70% of each limit) is dropped
   there. Then on a full-resolution strip: the fit once more, the profile's
   Gaussian width (moments of the median of the chunks' profiles, robust to
   the blobs on the line), and a matched filter across the line giving the
   flux per pixel of length in each 1 px column. The extent is the stretch of
   16 px chunks with the largest sum of ``S/N - 1`` (a maximum subarray: noise
   drifts down, a streak up, a faint or masked stretch inside one is bridged),
   its ends then placed to 1 px by the likelihood of a step in the flux.

A streak must pass, or it is rejected (and why):

- ``length_px >= min_length_px``: cosmic rays, point sources and most bleed
  residuals are shorter;
- ``width_px`` (FWHM of the profile) between ``min_width_psf`` PSF FWHM and
  ``max_width_px``: a cosmic ray is sharper than the PSF, a background
  residual or a galaxy wider than a streak;
- ``snr >= min_snr`` over the extent (errors times the blocks' noise scale);
- at least ``min_fill`` of the extent's 16 px chunks above 1 sigma: the signal
  must be spread along the line, not concentrated in a few blobs that line up
  by chance (stars, dipoles, four-lobed residuals);
- not a bleed residual: one within 2 degrees of the columns (numpy axis 0,
  along which charge bleeds) with ``SAT`` pixels within ``3 FWHM + 2 px`` of
  it along at least half its length is rejected. So is a real streak that
  runs along a bleed trail.

Pixels of ``bad_mask_bits`` (default ``BAD``, ``SAT``, ``EDGE``, ``NO_DATA``)
and non-finite pixels carry no weight: they neither make nor break a streak,
which is measured on both sides of them. The pixels of each streak found are
taken out before the next is refined, so a wide streak is found once and a
second one crossing it on its own; collinear pieces of one line are merged.

The mask holds, chunk by chunk, the pixels where the fitted profile exceeds
``mask_nsigma`` times the pixel noise, plus ``mask_margin_px``, along the
extent lengthened by as much at each end.

:func:`streak_dia_rows` turns each streak into one trailed DIA source
(:data:`ppray.science.dia.DIA_SOURCE_SCHEMA`); :func:`replace_streak_fragments`
swaps the fragments DIA detection made of the streaks for those rows.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from astropy.stats import mad_std
from astropy.wcs import WCS
from scipy import ndimage, optimize
from skimage.transform import hough_line

from ppray.image import Exposure, MaskBit
from ppray.science.dia import (
    DIA_SOURCE_SCHEMA,
    FLAG_BAD,
    FLAG_EDGE,
    FLAG_NO_DATA,
    FLAG_SATURATED,
)
from ppray.science.stats import FWHM_PER_SIGMA

# fmt: off
__all__ = [
    "STREAK_UNTRUSTED", "Streak", "StreakResult", "TrailedRows", "find_streaks",
    "replace_streak_fragments", "streak_dia_rows",
]
# fmt: on

log = logging.getLogger(__name__)

STREAK_UNTRUSTED = int(MaskBit.BAD | MaskBit.SAT | MaskBit.EDGE | MaskBit.NO_DATA)
"""Default ``bad_mask_bits`` of :func:`find_streaks`: pixels that carry no weight."""

TrailedRows = Literal["one_per_streak", "none"]
"""What :func:`streak_dia_rows` emits per streak: one trailed DIA source, or nothing."""

_CHUNK_PX = 16  # chunks of the extent and fill tests: a blob covers one or two
_FIT_CHUNK_PX = 64  # chunks of the angle fit: enough S/N each for a faint streak
_KADANE_BIAS = 1.0  # per-chunk S/N subtracted: noise drifts down, a streak up
_FILL_SNR = 1.0
_FIT_SNR = 3.0  # a chunk's offset counts in the angle fit above this S/N
_MIN_FIT_CHUNKS = 3
_BLOCK_SLACK = 0.7  # on blocks, a candidate is dropped below 70% of a limit
_BLEED_ANGLE_DEG = 2.0
_SMOOTH_BLOCKS = 1.0  # sigma of the Gaussian filter of the blocks
_MIN_BLOB_BLOCKS = 6  # a compact region of at least this many blocks is a blob
_SAME_LINE_DEG = 1.0


@dataclass(frozen=True)
class Streak:
    """One streak: a straight segment with a Gaussian profile across it.

    Attributes
    ----------
    x0, y0, x1, y1
        Its ends (0-based numpy pixel coordinates, ``x`` the column), at the
        image's border where it runs off (``truncated``).
    rho_px, theta_deg
        Its line, ``x cos(theta) + y sin(theta) = rho`` (``skimage``'s Hough
        convention: ``theta`` in [-90, 90) is the normal's angle from +x towards +y).
    width_px
        FWHM of the profile across it.
    length_px
        Distance between the ends.
    flux_per_px, flux_per_px_err
        Mean flux per pixel of length (electrons; negative for a negative
        streak, one in the template) and its error.
    snr
        ``|flux_per_px| / flux_per_px_err``: the S/N of the whole streak.
    mask_half_width_px
        Largest half-width of its mask.
    n_pix
        Pixels in its mask.
    mask_bits
        OR of the mask plane over those pixels.
    truncated
        An end is at the image's border or in untrusted pixels: the length is a
        lower bound.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    rho_px: float
    theta_deg: float
    width_px: float
    length_px: float
    flux_per_px: float
    flux_per_px_err: float
    snr: float
    mask_half_width_px: float
    n_pix: int
    mask_bits: int
    truncated: bool

    @property
    def angle_deg(self) -> float:
        """Direction of the streak from +x towards +y, in (-90, 90] (as ``trailAngle``)."""
        angle = self.theta_deg + 90.0
        return angle - 180.0 if angle > 90.0 else angle

    @property
    def center(self) -> tuple[float, float]:
        """Midpoint ``(x, y)`` of the ends."""
        return 0.5 * (self.x0 + self.x1), 0.5 * (self.y0 + self.y1)


@dataclass(frozen=True)
class StreakResult:
    """What :func:`find_streaks` found.

    Attributes
    ----------
    streaks
        The streaks, most significant first.
    mask
        ``bool``, the image's shape: the streaks' pixels, to OR into the mask
        plane as :attr:`ppray.image.MaskBit.STREAK`.
    n_candidates
        Hough lines refined, found or rejected: the work done.
    """

    streaks: tuple[Streak, ...]
    mask: np.ndarray
    n_candidates: int = 0

    def to_table(self) -> pa.Table:
        """The streaks as a table: one row each, the fields of :class:`Streak` as columns."""
        names = list(Streak.__dataclass_fields__)
        return pa.table({n: [getattr(s, n) for s in self.streaks] for n in names})


# --- blocks and the Hough transform -------------------------------------------------


@dataclass(frozen=True)
class _Planes:  # dv = data / variance, iv = 1 / variance; both 0 where untrusted
    dv: np.ndarray
    iv: np.ndarray
    mask: np.ndarray | None


def _planes(exposure: Exposure, bad_mask_bits: int) -> _Planes:
    data = np.asarray(exposure.image, dtype=np.float32)
    variance = np.asarray(exposure.variance, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iv = np.float32(1.0) / variance
        # Reductions first: the full-plane checks only when something is amiss.
        data_ok = bool(np.isfinite(np.add.reduce(data, axis=None)))
        var_ok = bool(variance.min() > 0 and variance.max() < np.inf)
    bad = None
    if bad_mask_bits and int(np.bitwise_or.reduce(exposure.mask, axis=None)) & bad_mask_bits:
        bad = (exposure.mask & np.uint32(bad_mask_bits)) != 0
    if not var_ok:
        worse = ~((variance > 0) & (variance < np.inf))
        bad = worse if bad is None else bad | worse
    if not data_ok:
        bad = ~np.isfinite(data) if bad is None else bad | ~np.isfinite(data)
    if bad is not None:
        np.putmask(iv, bad, np.float32(0.0))
    dv = data * iv
    if bad is not None and not data_ok:
        np.putmask(dv, bad, np.float32(0.0))  # NaN * 0 is NaN
    return _Planes(dv, iv, exposure.mask)


def _block_sum(a: np.ndarray, b: int) -> np.ndarray:
    """Sums over ``b`` x ``b`` blocks (partial ones at the far edges), ``float32``.

    Strided adds: several times faster than ``reshape(...).sum`` or ``reduceat``."""
    ny, nx = a.shape
    rows = np.zeros((ny, -(-nx // b)), dtype=np.float32)
    for k in range(b):
        part = a[:, k::b]
        rows[:, : part.shape[1]] += part
    out = np.zeros((-(-ny // b), rows.shape[1]), dtype=np.float32)
    for k in range(b):
        part = rows[k::b]
        out[: part.shape[0]] += part
    return out


def _smoothed_snr(blocks: _Planes) -> tuple[np.ndarray, np.ndarray, float]:
    """S/N of the blocks matched-filtered by a Gaussian, over its robust scatter (at
    least 1); which blocks hold data; that scatter."""
    half = math.ceil(3.0 * _SMOOTH_BLOCKS)
    g = np.exp(-0.5 * (np.arange(-half, half + 1) / _SMOOTH_BLOCKS) ** 2)
    g /= g.sum()
    num, den = blocks.dv, blocks.iv
    for axis in (0, 1):  # sum g num / sqrt(sum g² den), g separable
        num = ndimage.correlate1d(num, g, axis=axis, mode="constant")
        den = ndimage.correlate1d(den, g**2, axis=axis, mode="constant")
    positive = den[den > 0]
    has_data = den > 0.25 * float(np.median(positive)) if positive.size else den > 0
    snr = np.where(has_data, num / np.sqrt(np.maximum(den, 1e-30)), 0.0).astype(np.float32)
    sample = snr[has_data][:: max(int(has_data.sum()) // 200_000, 1)]
    scale = max(float(mad_std(sample)), 1.0) if sample.size > 100 else 1.0
    snr /= np.float32(scale)
    return snr, has_data, scale


def _drop_blobs(binary: np.ndarray, max_length: float) -> np.ndarray:
    """``binary`` without its compact 8-connected regions of at least
    ``_MIN_BLOB_BLOCKS`` blocks whose major axis is shorter than ``max_length``."""
    labels, n = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return binary
    iy, ix = np.nonzero(labels)
    lab = labels[iy, ix]
    count = np.bincount(lab, minlength=n + 1).astype(np.float64)
    big = count >= _MIN_BLOB_BLOCKS
    if not big[1:].any():
        return binary
    c = np.maximum(count, 1.0)
    mx, my = np.bincount(lab, ix, n + 1) / c, np.bincount(lab, iy, n + 1) / c
    dx, dy = ix - mx[lab], iy - my[lab]
    sxx, syy = np.bincount(lab, dx * dx, n + 1) / c, np.bincount(lab, dy * dy, n + 1) / c
    sxy = np.bincount(lab, dx * dy, n + 1) / c
    major = 0.5 * (sxx + syy) + np.sqrt(0.25 * (sxx - syy) ** 2 + sxy**2)
    compact = big & (np.sqrt(12.0 * major + 1.0) < max_length)  # a segment's is L²/12
    compact[0] = False
    return binary & ~compact[labels]


@functools.lru_cache(maxsize=4)
def _chord3(shape: tuple[int, int], n_theta: int) -> np.ndarray:
    """Per Hough line, the length inside the box of pixel centres of ``shape``, summed
    over 3 adjacent ``rho`` bins; read-only, kept for the next image of that shape.

    Across a rectangle the length rises linearly from 0 at the first corner the
    line meets to a plateau between the middle two corners, and falls back to 0."""
    w, h = shape[1] - 1.0, shape[0] - 1.0
    thetas = _thetas(n_theta)
    c, s = np.cos(thetas), np.sin(thetas)
    r0, r1, r2, r3 = np.sort(np.stack([0.0 * c, w * c, h * s, w * c + h * s]), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plateau = np.minimum(w / np.abs(s), h / np.abs(c))
        reach = math.ceil(math.hypot(*shape))
        rho = np.arange(-reach, reach + 1.0)[:, None]
        rise = np.where(r1 > r0, (rho - r0) / (r1 - r0), 1.0)
        fall = np.where(r3 > r2, (r3 - rho) / (r3 - r2), 1.0)
    inside = (rho >= r0 - 0.5) & (rho <= r3 + 0.5)
    out = _sum3(np.where(inside, plateau * np.clip(np.minimum(rise, fall), 0.0, 1.0), 0.0))
    out.flags.writeable = False
    return out


def _thetas(n: int) -> np.ndarray:
    return np.linspace(-math.pi / 2, math.pi / 2, n, endpoint=False)


def _sum3(acc: np.ndarray) -> np.ndarray:
    out = acc.astype(np.float32)
    out[1:] += acc[:-1]
    out[:-1] += acc[1:]
    return out


class _Hough:
    """The significance of every line of one sign's binary blocks; blocks removable."""

    def __init__(self, binary: np.ndarray, valid3: np.ndarray, n_data: int, n_theta: int) -> None:
        self.binary = binary
        self.thetas = _thetas(n_theta)
        acc, _, self.dists = hough_line(binary, self.thetas)
        self.acc3 = _sum3(acc)
        p = float(binary.sum()) / max(n_data, 1)
        expected = np.float32(p) * valid3
        self.inv_sd = np.float32(1.0) / np.sqrt(expected * np.float32(1.0 - p) + np.float32(1.0))
        long = valid3 > 0.5 * float(valid3.max())
        sig = (self.acc3[long][::7] - expected[long][::7]) * self.inv_sd[long][::7]
        self.scale = max(float(mad_std(sig)), 1.0) if sig.size > 100 else 1.0
        self.expected = expected
        # Lines too short to hold a streak (their valid3 is 0) can never be the best.
        self.expected[valid3 <= 0] = np.float32(1e30)

    def best(self) -> tuple[float, float, float]:
        """(significance, rho in blocks, theta) of the most significant line."""
        sig = self.acc3 - self.expected
        sig *= self.inv_sd
        r, t = np.unravel_index(int(np.argmax(sig)), sig.shape)
        return float(sig[r, t]) / self.scale, float(self.dists[r]), float(self.thetas[t])

    def remove(self, iy: np.ndarray, ix: np.ndarray) -> None:
        """Take the binary blocks among ``(iy, ix)`` out of the accumulator."""
        keep = self.binary[iy, ix]
        iy, ix = iy[keep], ix[keep]
        if iy.size == 0:
            return
        self.binary[iy, ix] = False
        n_t = self.thetas.size
        offset = (self.dists.size - 1) // 2  # as hough_line: rho = round(x cos + y sin)
        rho = np.rint(ix[:, None] * np.cos(self.thetas) + iy[:, None] * np.sin(self.thetas))
        flat = ((rho.astype(np.intp) + offset) * n_t + np.arange(n_t)).ravel()
        acc = self.acc3.ravel()
        if flat.size < 100_000:
            for shift in (-n_t, 0, n_t):  # the 3 rho bins each vote went into
                np.subtract.at(acc, np.clip(flat + shift, 0, acc.size - 1), 1.0)
        else:
            votes = np.bincount(flat, minlength=acc.size).reshape(self.acc3.shape)
            self.acc3 -= _sum3(votes)


# --- lines and strips ---------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    """``x cos(theta) + y sin(theta) = rho``; points ``rho n + s t + d n``."""

    rho: float
    theta: float

    @property
    def normal(self) -> np.ndarray:
        return np.array([math.cos(self.theta), math.sin(self.theta)])

    @property
    def direction(self) -> np.ndarray:
        return np.array([-math.sin(self.theta), math.cos(self.theta)])

    def point(self, s: float, d: float = 0.0) -> np.ndarray:
        return (self.rho + d) * self.normal + s * self.direction

    def chord(self, shape: tuple[int, ...]) -> tuple[float, float]:
        """Range of ``s`` inside the box of pixel centres (empty when lo > hi)."""
        lo, hi = -math.inf, math.inf
        p0, t = self.rho * self.normal, self.direction
        for axis, top in ((0, shape[1] - 1.0), (1, shape[0] - 1.0)):
            if abs(t[axis]) < 1e-12:
                if not 0.0 <= p0[axis] <= top:
                    return 1.0, 0.0
                continue
            a, b = -p0[axis] / t[axis], (top - p0[axis]) / t[axis]
            lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
        return lo, hi


def _line_through(point: np.ndarray, direction: np.ndarray) -> _Line:
    """The line through ``point`` running along ``direction``: ``theta`` is left
    outside [-pi/2, pi/2) when need be, so that ``s`` keeps its sense."""
    theta = math.atan2(-direction[0], direction[1])
    return _Line(float(point @ np.array([math.cos(theta), math.sin(theta)])), theta)


def _hough_form(line: _Line) -> tuple[float, float]:
    """``(rho, theta)`` with ``theta`` in [-pi/2, pi/2), as ``hough_line`` has it."""
    theta = (line.theta + math.pi / 2) % math.pi - math.pi / 2
    return (
        (line.rho, theta) if math.isclose(math.cos(theta - line.theta), 1.0) else (-line.rho, theta)
    )


def _to_blocks(line: _Line, s: np.ndarray, b: int) -> tuple[_Line, np.ndarray]:
    """The line, and positions ``s`` along it, in units of ``b`` x ``b`` blocks."""
    o = 0.5 * (b - 1)
    c, sn = math.cos(line.theta), math.sin(line.theta)
    return _Line((line.rho - o * (c + sn)) / b, line.theta), (s - o * (c - sn)) / b


def _from_blocks(line: _Line, s: np.ndarray, b: int) -> tuple[_Line, np.ndarray]:
    o = 0.5 * (b - 1)
    c, sn = math.cos(line.theta), math.sin(line.theta)
    return _Line(b * line.rho + o * (c + sn), line.theta), b * s + o * (c - sn)


def _gather(
    planes: _Planes, line: _Line, s: np.ndarray, d: np.ndarray, bits: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Nearest pixels of a strip, ``[d, s]``: ``dv`` and ``iv`` (0 off the image) and
    the mask bits (with ``bits``)."""
    ny, nx = planes.dv.shape
    p, t, n = line.point(0.0), line.direction, line.normal
    x = np.rint(p[0] + t[0] * s[None, :] + n[0] * d[:, None]).astype(np.intp)
    y = np.rint(p[1] + t[1] * s[None, :] + n[1] * d[:, None]).astype(np.intp)
    off = (x < 0) | (x >= nx) | (y < 0) | (y >= ny)
    np.clip(x, 0, nx - 1, out=x)
    np.clip(y, 0, ny - 1, out=y)
    dv, iv = planes.dv[y, x], planes.iv[y, x]
    if off.any():
        dv[off] = 0.0
        iv[off] = 0.0
    mask = None
    if bits and planes.mask is not None:
        mask = np.where(off, np.uint32(0), planes.mask[y, x])
    return dv, iv, mask


def _raster(
    line: _Line, s0: float, s1: float, knots: np.ndarray, halves: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(iy, ix)`` within the half-widths ``halves`` (at ``knots`` of ``s``,
    interpolated) of the line between ``s0`` and ``s1``, each once: in columns (or
    rows) across the line's major axis."""
    t = line.direction
    major = 0 if abs(t[0]) >= abs(t[1]) else 1  # 0: x steps along the line
    n_major, n_minor = (shape[1], shape[0]) if major == 0 else shape
    p = line.point(0.0)
    a_lo, a_hi = sorted((p[major] + s0 * t[major], p[major] + s1 * t[major]))
    u = np.arange(max(math.ceil(a_lo), 0), min(math.floor(a_hi), n_major - 1) + 1)
    s = (u - p[major]) / t[major]
    centre = p[1 - major] + s * t[1 - major]
    half = np.interp(s, knots, halves) / abs(t[major])
    lo = np.maximum(np.ceil(centre - half), 0).astype(np.intp)
    hi = np.minimum(np.floor(centre + half), n_minor - 1).astype(np.intp)
    counts = np.maximum(hi - lo + 1, 0)
    v = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    w = np.repeat(u, counts)
    return (w, v) if major == 1 else (v, w)


# --- refinement -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    sign: int
    psf_sigma: float
    min_length_px: float
    min_fwhm_px: float
    max_width_px: float
    min_snr: float
    min_fill: float
    mask_nsigma: float
    mask_margin_px: float
    noise_scale: float


def _gauss(d: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * (d / sigma) ** 2)


def _chunk_sums(a: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``a`` over chunks of ``size`` along its last axis, and their centres."""
    starts = np.arange(0, a.shape[-1], size)
    ends = np.minimum(starts + size, a.shape[-1])
    return np.add.reduceat(a, starts, axis=-1), 0.5 * (starts + ends - 1)


def _offsets(
    num: np.ndarray, den: np.ndarray, d: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per chunk (columns of ``num``, ``den``): the offset of a Gaussian profile that
    maximises its matched-filter S/N, and that S/N."""
    reach = max(int(d[-1] - math.ceil(2.0 * sigma)), 1)
    shifts = np.arange(-reach, reach + 1, dtype=np.float64)
    template = _gauss(d[None, :] - shifts[:, None], sigma)
    cden = (template**2) @ den
    snr = (template @ num) / np.sqrt(np.maximum(cden, 1e-30))
    k = np.argmax(snr, axis=0)
    cols = np.arange(snr.shape[1])
    best = snr[k, cols]
    lo = snr[np.maximum(k - 1, 0), cols]
    hi = snr[np.minimum(k + 1, shifts.size - 1), cols]
    curv = lo - 2.0 * best + hi
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(curv < 0, 0.5 * (lo - hi) / curv, 0.0)
    return shifts[k] + np.clip(frac, -0.5, 0.5), best


def _line_fit(s: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[float, float] | None:
    """Weighted fit ``c = a + beta s`` with outliers clipped: ``(a, beta)``, or None."""
    keep = np.ones(s.size, dtype=bool)
    a = beta = 0.0
    for _ in range(3):
        if keep.sum() < _MIN_FIT_CHUNKS or np.ptp(s[keep]) == 0:
            return None
        beta, a = np.polyfit(s[keep], c[keep], 1, w=np.sqrt(w[keep]))
        r = np.abs(c - (a + beta * s))
        keep = r <= max(3.0 * 1.4826 * float(np.median(r[keep])), 0.5)
    return float(a), float(beta)


def _profile(profiles: np.ndarray, d: np.ndarray, guess: float) -> tuple[float, float]:
    """Centre and sigma of the median of chunk profiles ``[d, chunk]`` (NaN: no data)."""
    ok_cols = np.isfinite(profiles).any(axis=0)
    if not ok_cols.any():
        return 0.0, guess
    with np.errstate(invalid="ignore"):
        prof = (
            np.nanmedian(profiles[:, ok_cols], axis=1)
            if ok_cols.sum() > 1
            else profiles[:, ok_cols][:, 0]
        )
    ok = np.isfinite(prof)
    prof, dd = prof[ok], d[ok]
    if prof.size < 5:
        return 0.0, guess
    # Moments of the positive profile in a window of +-3 sigma, iterated: robust to
    # the noise in the wings, exact for a Gaussian (which keeps 97.07% of its
    # variance within 3 sigma).
    centre, sigma = float(dd[np.argmax(prof)]), guess
    top = float(d[-1]) / 2.0
    for _ in range(10):
        w = np.clip(prof, 0.0, None) * (np.abs(dd - centre) <= 3.0 * sigma)
        total = float(w.sum())
        if total <= 0:
            return 0.0, guess
        centre = float((w * dd).sum() / total)
        var = float((w * (dd - centre) ** 2).sum() / total) / 0.9707
        sigma = min(max(math.sqrt(var), 0.3), top)
    # Then a least-squares Gaussian from there: clipping the noise at 0 widens the
    # moments of a faint profile, and a wide template biases its flux up.
    amplitude = float(np.interp(centre, dd, prof))
    try:
        (amplitude, centre_fit, sigma_fit), _ = optimize.curve_fit(
            lambda x, a, c, w: a * np.exp(-0.5 * ((x - c) / w) ** 2), dd, prof,
            p0=(max(amplitude, 1e-12), centre, sigma),
            bounds=((0.0, centre - sigma, 0.3), (np.inf, centre + sigma, top)),
        )  # fmt: skip
    except (RuntimeError, ValueError):
        return centre, sigma
    return float(centre_fit), float(sigma_fit)


def _columns(line: _Line, ends: np.ndarray) -> np.ndarray:
    """Positions ``s`` along the line, 1 apart, from the projection of one of ``ends``
    (2 points, ``[2, 2]``) to the other's."""
    lo, hi = np.sort((ends - line.point(0.0)) @ line.direction)
    return lo + np.arange(math.floor(hi - lo) + 1.0)


def _align(
    planes: _Planes,
    line: _Line,
    ends: np.ndarray,
    half: int,
    sigma: float,
    p: _Params,
    passes: int,
    chunk: int,
) -> tuple[_Line, float] | None:
    """The line fitted to the streak's offsets in chunks between ``ends`` (``passes``
    times) and the profile's sigma, in the planes' units; None without a streak."""
    d = np.arange(-half, half + 1.0)
    for _ in range(passes):
        s = _columns(line, ends)
        dv, iv, _ = _gather(planes, line, s, d)
        num, centres = _chunk_sums(dv.astype(np.float64), chunk)
        den, _ = _chunk_sums(iv.astype(np.float64), chunk)
        num *= p.sign
        offsets, snr = _offsets(num, den, d, sigma)
        good = snr / p.noise_scale > _FIT_SNR
        fit = _line_fit(s[0] + centres[good], offsets[good], np.minimum(snr[good], 50.0) ** 2)
        if fit is None:
            return None
        a, beta = fit
        with np.errstate(divide="ignore", invalid="ignore"):
            _, sigma = _profile(np.where(den > 0, num / den, np.nan)[:, good], d, sigma)
        line = _line_through(line.point(0.0, a), line.direction + beta * line.normal)
    return line, sigma


def _max_subarray(x: np.ndarray) -> tuple[int, int, float]:
    """Kadane: first and last index of the stretch of ``x`` with the largest sum."""
    best, best_i, best_j, run, start = -math.inf, 0, -1, 0.0, 0
    for k, v in enumerate(x.tolist()):
        run, start = (v, k) if run <= 0.0 else (run + v, start)
        if run > best:
            best, best_i, best_j = run, start, k
    return best_i, best_j, best


@dataclass(frozen=True)
class _Extent:
    a: int  # first and last column
    b: int
    flux: float  # per px of length, sign-corrected
    flux_err: float
    fill: float
    num_c: np.ndarray  # chunk sums over the extent
    den_c: np.ndarray
    knots: np.ndarray  # chunk centres (columns)

    @property
    def snr(self) -> float:
        return self.flux / self.flux_err


def _extent(num_s: np.ndarray, den_s: np.ndarray, chunk: int, noise_scale: float) -> _Extent | None:
    """The streak's columns from the matched-filter sums per column (module docstring)."""
    num_c, _ = _chunk_sums(num_s, chunk)
    den_c, _ = _chunk_sums(den_s, chunk)
    positive = den_c[den_c > 0]
    if not positive.size:
        return None
    valid = den_c > 0.3 * float(np.median(positive))
    snr_c = np.where(valid, num_c / np.sqrt(np.maximum(den_c, 1e-30)), 0.0) / noise_scale
    i, j, best = _max_subarray(np.where(valid, snr_c - _KADANE_BIAS, 0.0))
    if best <= 0:
        return None
    n = num_s.size
    a, b = i * chunk, min((j + 1) * chunk, n) - 1
    flux = float(num_s[a : b + 1].sum() / max(float(den_s[a : b + 1].sum()), 1e-30))
    if not flux > 0:
        return None
    # Ends to the column: where the log-likelihood of a step of ``flux`` peaks, within 2
    # chunks outside the stretch and 6 inside (it can overrun the end by a chunk or two).
    y = flux * num_s - 0.5 * flux**2 * den_s
    lo, hi = max(a - 2 * chunk, 0), min(a + 6 * chunk, b)
    a = lo + int(np.argmax(np.cumsum(y[lo : hi + 1][::-1])[::-1]))
    lo, hi = max(b - 6 * chunk, a), min(b + 2 * chunk, n - 1)
    b = lo + int(np.argmax(np.cumsum(y[lo : hi + 1])))
    return _stretch(num_s, den_s, a, b, chunk, noise_scale)


def _stretch(
    num_s: np.ndarray, den_s: np.ndarray, a: int, b: int, chunk: int, noise_scale: float
) -> _Extent | None:
    """Flux, error and fill of the streak over columns ``a`` to ``b``."""
    info = float(den_s[a : b + 1].sum())
    if not info > 0:
        return None
    num_c, knots = _chunk_sums(num_s[a : b + 1], chunk)
    den_c, _ = _chunk_sums(den_s[a : b + 1], chunk)
    positive = den_c[den_c > 0]
    valid = den_c > 0.3 * float(np.median(positive))
    snr_c = num_c[valid] / np.sqrt(den_c[valid]) / noise_scale
    fill = float(np.mean(snr_c > _FILL_SNR)) if snr_c.size else 0.0
    flux = float(num_s[a : b + 1].sum()) / info
    return _Extent(a, b, flux, noise_scale / math.sqrt(info), fill, num_c, den_c, knots + a)


def _mean_profile(
    dv: np.ndarray, iv: np.ndarray, d: np.ndarray, ext: _Extent, p: _Params, chunk: int
) -> tuple[float, float] | None:
    """Centre and sigma of a Gaussian fitted to the mean profile over the extent,
    without the chunks whose flux is an outlier (a star or a residual on the line):
    more precise than the median of the chunks' profiles, which found the extent."""
    with np.errstate(divide="ignore", invalid="ignore"):
        flux_c = ext.num_c / ext.den_c
        err_c = p.noise_scale / np.sqrt(ext.den_c)
    ok = np.isfinite(flux_c)
    if not ok.any():
        return None
    median = float(np.median(flux_c[ok]))
    keep = ok & (np.abs(flux_c - median) <= 5.0 * err_c + 0.5 * abs(median))
    cols = np.repeat(keep, chunk)[: ext.b - ext.a + 1]
    num = p.sign * dv[:, ext.a : ext.b + 1][:, cols].sum(axis=1, dtype=np.float64)
    den = iv[:, ext.a : ext.b + 1][:, cols].sum(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        profile = np.where(den > 0, num / den, np.nan)
    return _profile(profile[:, None], d, p.psf_sigma)


def _across(
    dv: np.ndarray, iv: np.ndarray, d: np.ndarray, sigma: float, sign: int
) -> tuple[np.ndarray, np.ndarray]:
    """Matched filter across the line per column: sums of ``g D / V`` and ``g² / V`` for
    a unit-integral Gaussian ``g``; their ratio is the flux per px of length."""
    g = _gauss(d, sigma) / (math.sqrt(2.0 * math.pi) * sigma)
    return sign * (g @ dv.astype(np.float64)), (g**2) @ iv.astype(np.float64)


def _failed(ext: _Extent | None, length: float, p: _Params, slack: float) -> str | None:
    if ext is None:
        return "no signal along the line"
    if length < slack * p.min_length_px:
        return f"short ({length:.0f} px)"
    if ext.snr < slack * p.min_snr:
        return f"faint (S/N {ext.snr:.1f})"
    if ext.fill < slack * p.min_fill:
        return f"in blobs (fill {ext.fill:.2f})"
    return None


@dataclass(frozen=True)
class _Found:
    streak: Streak
    line: _Line  # through the profile's centre
    s0: float
    s1: float
    knots: np.ndarray  # along the line, where the mask's half-widths are
    halves: np.ndarray
    iy: np.ndarray  # the mask's pixels
    ix: np.ndarray


def _on_blocks(
    blocks: _Planes, line_b: _Line, p: _Params, b: int, half: int
) -> tuple[_Line, _Extent, np.ndarray, float] | str:
    """The candidate aligned and measured on blocks: line, extent, columns ``s``, sigma."""
    lo, hi = line_b.chord(blocks.dv.shape)
    if (hi - lo) * b < _BLOCK_SLACK * p.min_length_px:
        return "short chord"
    sigma = math.sqrt(p.psf_sigma**2 + b * b / 12.0) / b
    ends = np.array([line_b.point(lo), line_b.point(hi)])
    aligned = _align(blocks, line_b, ends, half, sigma, p, 3, _FIT_CHUNK_PX // b)
    if aligned is None:
        return "no line on blocks"
    line_b, sigma = aligned
    lo, hi = line_b.chord(blocks.dv.shape)
    s = np.arange(lo, hi + 1e-6)
    d = np.arange(-math.ceil(3.0 * sigma + 1.0), math.ceil(3.0 * sigma + 1.0) + 1.0)
    dv, iv, _ = _gather(blocks, line_b, s, d)
    ext = _extent(*_across(dv, iv, d, sigma, p.sign), _CHUNK_PX // b, p.noise_scale)
    reason = _failed(ext, 0.0 if ext is None else (ext.b - ext.a + 1.0) * b, p, _BLOCK_SLACK)
    if reason is not None or ext is None:
        return f"on blocks: {reason}"
    return line_b, ext, s, sigma


def _refine(
    planes: _Planes, blocks: _Planes, line_b: _Line, p: _Params, b: int, half_b: int
) -> _Found | str:
    """The streak along a Hough line (in blocks), measured and tested; or why not."""
    coarse = _on_blocks(blocks, line_b, p, b, half_b)
    if isinstance(coarse, str):
        return coarse
    line_b, ext, s_b, sigma_b = coarse
    shape = planes.dv.shape
    line, (e0, e1) = _from_blocks(line_b, s_b[[ext.a, ext.b]], b)
    lo, hi = line.chord(shape)
    margin = 3.0 * _CHUNK_PX + b  # the ends on blocks are good to a chunk
    e0, e1 = sorted((e0, e1))
    ends = np.array([line.point(max(lo, e0 - margin)), line.point(min(hi, e1 + margin))])
    half = math.ceil(max(4.0 * sigma_b * b, 3.0 * p.psf_sigma) + 4.0)
    aligned = _align(planes, line, ends, half, p.psf_sigma, p, 1, _FIT_CHUNK_PX)
    if aligned is None:
        return "no line at full resolution"
    line, sigma = aligned
    lo, hi = line.chord(shape)
    s = _columns(line, ends)
    s = s[(s >= lo - 0.5) & (s <= hi + 0.5)]
    half = math.ceil(max(4.0 * sigma, 3.0 * p.psf_sigma) + 3.0)
    d = np.arange(-half, half + 1.0)
    dv, iv, bits = _gather(planes, line, s, d, bits=True)
    num, _ = _chunk_sums(p.sign * dv.astype(np.float64), _FIT_CHUNK_PX)
    den, _ = _chunk_sums(iv.astype(np.float64), _FIT_CHUNK_PX)
    _, snr = _offsets(num, den, d, sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        centre, sigma = _profile(
            np.where(den > 0, num / den, np.nan)[:, snr / p.noise_scale > _FIT_SNR], d, sigma
        )
    fwhm = FWHM_PER_SIGMA * sigma
    if not p.min_fwhm_px <= fwhm <= p.max_width_px:
        return f"width {fwhm:.1f} px"
    line = _Line(line.rho + centre, line.theta)  # parallel: the same s
    d = d - centre
    num_s, den_s = _across(dv, iv, d, sigma, p.sign)
    ext = _extent(num_s, den_s, _CHUNK_PX, p.noise_scale)
    fitted = None if ext is None else _mean_profile(dv, iv, d, ext, p, _CHUNK_PX)
    if ext is not None and fitted is not None:
        line = _Line(line.rho + fitted[0], line.theta)
        d, sigma = d - fitted[0], fitted[1]
        fwhm = FWHM_PER_SIGMA * sigma
        if not p.min_fwhm_px <= fwhm <= p.max_width_px:
            return f"width {fwhm:.1f} px"
        num_s, den_s = _across(dv, iv, d, sigma, p.sign)
        ext = _stretch(num_s, den_s, ext.a, ext.b, _CHUNK_PX, p.noise_scale)
    if ext is None:
        return "no signal at full resolution"
    # An end is at the border when the columns beyond it, up to the border, do not
    # reject the streak going on (log-likelihood ratio above -2): a faint end is noisy.
    s0, s1 = float(s[ext.a]) - 0.5, float(s[ext.b]) + 0.5
    llr = (ext.flux * num_s - 0.5 * ext.flux**2 * den_s) / p.noise_scale**2
    at_lo = s0 - lo <= 1.0 or (s[0] <= lo + 1.0 and float(llr[: ext.a].sum()) > -2.0)
    at_hi = hi - s1 <= 1.0 or (s[-1] >= hi - 1.0 and float(llr[ext.b + 1 :].sum()) > -2.0)
    s0, s1 = lo if at_lo else s0, hi if at_hi else s1
    masked_lo = ext.a > 0 and den_s[ext.a - 1] == 0
    masked_hi = ext.b < s.size - 1 and den_s[ext.b + 1] == 0
    reason = _failed(ext, s1 - s0, p, 1.0)
    if reason is not None:
        return reason
    if abs(line.direction[0]) < math.sin(math.radians(_BLEED_ANGLE_DEG)) and bits is not None:
        near = (
            bits[np.abs(d) <= 3.0 * fwhm + 2.0, ext.a : ext.b + 1] & np.uint32(MaskBit.SAT)
        ) != 0
        if float(near.any(axis=0).mean()) >= 0.5:
            return "bleed residual"

    # The mask: where the profile is above mask_nsigma of the pixel noise, chunk by chunk.
    flux_c = np.where(ext.den_c > 0, ext.num_c / np.maximum(ext.den_c, 1e-30), ext.flux)
    flux_c = ndimage.maximum_filter1d(ndimage.median_filter(flux_c, 3, mode="nearest"), 3)
    trusted = iv[iv > 0]
    noise = math.sqrt(1.0 / float(np.median(trusted))) if trusted.size else 1.0
    peak = flux_c / (math.sqrt(2.0 * math.pi) * sigma)
    ratio = np.maximum(peak / (p.mask_nsigma * noise), 1.0)
    halves = np.maximum(sigma * np.sqrt(2.0 * np.log(ratio)), 0.5 * fwhm) + p.mask_margin_px
    knots = s[0] + ext.knots
    iy, ix = _raster(line, s0 - halves[0], s1 + halves[-1], knots, halves, shape)
    mask_bits = (
        int(np.bitwise_or.reduce(planes.mask[iy, ix])) if iy.size and planes.mask is not None else 0
    )
    (x0, y0), (x1, y1) = line.point(s0), line.point(s1)
    rho, theta = _hough_form(line)
    streak = Streak(
        x0=float(x0), y0=float(y0), x1=float(x1), y1=float(y1), rho_px=rho,
        theta_deg=math.degrees(theta), width_px=fwhm, length_px=s1 - s0,
        flux_per_px=p.sign * ext.flux, flux_per_px_err=ext.flux_err, snr=ext.snr,
        mask_half_width_px=float(halves.max()), n_pix=int(iy.size), mask_bits=mask_bits,
        truncated=bool(at_lo or at_hi or masked_lo or masked_hi),
    )  # fmt: skip
    return _Found(streak, line, s0, s1, knots, halves, iy, ix)


def _take_out(planes: _Planes, blocks: _Planes, iy: np.ndarray, ix: np.ndarray, b: int) -> None:
    """Give the pixels ``(iy, ix)`` no weight any more, in the planes and their blocks."""
    flat = (iy // b) * blocks.dv.shape[1] + ix // b
    n = blocks.dv.size
    blocks.dv.ravel()[:] -= np.bincount(flat, planes.dv[iy, ix], n).astype(np.float32)
    blocks.iv.ravel()[:] -= np.bincount(flat, planes.iv[iy, ix], n).astype(np.float32)
    planes.dv[iy, ix] = 0.0
    planes.iv[iy, ix] = 0.0


def _same_line(a: _Found, b: _Found) -> bool:
    """Whether ``b`` lies along ``a``'s line, within their masks' half-widths."""
    dtheta = abs((a.line.theta - b.line.theta + math.pi / 2) % math.pi - math.pi / 2)
    if dtheta > math.radians(_SAME_LINE_DEG):
        return False
    reach = max(float(a.halves.max()), float(b.halves.max()))
    ends = np.array([[b.streak.x0, b.streak.y0], [b.streak.x1, b.streak.y1]])
    return bool(np.all(np.abs(ends @ a.line.normal - a.line.rho) <= reach))


def _merge(a: _Found, b: _Found) -> _Found:
    """One streak of two collinear pieces, along ``a``'s line over both."""
    t, p = a.line.direction, a.line.point(0.0)
    ends = np.array([[b.streak.x0, b.streak.y0], [b.streak.x1, b.streak.y1]])
    sb = np.sort((ends - p) @ t)
    s0, s1 = min(a.s0, float(sb[0])), max(a.s1, float(sb[1]))
    (x0, y0), (x1, y1) = a.line.point(s0), a.line.point(s1)
    sa, sb_ = a.streak, b.streak
    wa, wb = sa.flux_per_px_err**-2, sb_.flux_per_px_err**-2
    flux = (wa * sa.flux_per_px + wb * sb_.flux_per_px) / (wa + wb)
    err = (wa + wb) ** -0.5
    streak = Streak(
        x0=float(x0), y0=float(y0), x1=float(x1), y1=float(y1), rho_px=sa.rho_px,
        theta_deg=sa.theta_deg, width_px=(wa * sa.width_px + wb * sb_.width_px) / (wa + wb),
        length_px=s1 - s0, flux_per_px=flux, flux_per_px_err=err, snr=abs(flux) / err,
        mask_half_width_px=max(sa.mask_half_width_px, sb_.mask_half_width_px),
        n_pix=sa.n_pix + sb_.n_pix, mask_bits=sa.mask_bits | sb_.mask_bits,
        truncated=sa.truncated or sb_.truncated,
    )  # fmt: skip
    order = np.argsort(np.r_[a.knots, sb])
    halves = np.r_[a.halves, np.full(2, b.halves.max())][order]
    return _Found(
        streak,
        a.line,
        s0,
        s1,
        np.r_[a.knots, sb][order],
        halves,
        np.r_[a.iy, b.iy],
        np.r_[a.ix, b.ix],
    )


def find_streaks(
    difference: Exposure,
    psf_sigma_px: float,
    *,
    threshold_sigma: float = 2.5,
    hough_sigma: float = 7.0,
    min_snr: float = 10.0,
    min_length_px: float = 100.0,
    max_width_px: float = 40.0,
    min_width_psf: float = 0.5,
    min_fill: float = 0.5,
    mask_nsigma: float = 0.5,
    mask_margin_px: float = 2.0,
    negative: bool = True,
    bin_px: int = 4,
    max_candidates: int = 20,
    bad_mask_bits: int = STREAK_UNTRUSTED,
) -> StreakResult:
    """Find, measure and mask the long straight streaks of a difference exposure.

    Parameters
    ----------
    difference
        Difference exposure (electrons, background-free) with variance and mask;
        not modified. NaN pixels and ``bad_mask_bits`` pixels carry no weight.
    psf_sigma_px
        Gaussian sigma of the difference image's PSF (px).
    threshold_sigma
        Threshold on the blocks' smoothed S/N that makes the Hough transform's
        binary image.
    hough_sigma
        Significance of a Hough line from which it is refined.
    min_snr
        Smallest S/N of a whole streak.
    min_length_px
        Shortest streak (px).
    max_width_px
        Widest profile (FWHM, px).
    min_width_psf
        Narrowest profile, in PSF FWHM: a cosmic ray is sharper.
    min_fill
        Smallest fraction of the streak's 16 px chunks above 1 sigma.
    mask_nsigma, mask_margin_px
        The mask covers where the streak's profile exceeds ``mask_nsigma`` times
        the pixel noise, plus ``mask_margin_px`` across and at the ends.
    negative
        Also look for negative streaks (in the template).
    bin_px
        Block size: the Hough transform's cost falls as its cube, the
        sensitivity to faint streaks as its square root.
    max_candidates
        Most Hough lines refined per sign: bounds the time on a crowded image.
    bad_mask_bits
        Mask bits of the pixels that carry no weight.

    Returns
    -------
    StreakResult
        The streaks, most significant first, and the mask of their pixels.
    """
    if not (psf_sigma_px > 0 and threshold_sigma > 0 and min_length_px > 0 and bin_px >= 1):
        raise ValueError("need psf_sigma_px, threshold_sigma, min_length_px > 0, bin_px >= 1")
    shape = difference.shape
    mask = np.zeros(shape, dtype=bool)
    planes = _planes(difference, bad_mask_bits)
    blocks = _Planes(_block_sum(planes.dv, bin_px), _block_sum(planes.iv, bin_px), None)
    snr, has_data, noise_scale = _smoothed_snr(blocks)
    if not has_data.any():
        return StreakResult((), mask)
    reach = math.hypot(*snr.shape)
    # Angle steps that move the far end of the longest line by ~3 blocks (the 3 rho bins).
    n_theta = int(np.clip(math.pi * reach / 10, 180, 480))
    valid3 = _chord3(snr.shape, n_theta)
    if not has_data.all():
        valid3 = np.maximum(valid3 - _sum3(hough_line(~has_data, _thetas(n_theta))[0]), 0.0)
    # Lines shorter than half the shortest streak are not looked at.
    valid3 = np.where(valid3 >= 1.5 * min_length_px / bin_px, valid3, np.float32(0.0))
    n_data = int(has_data.sum())
    half_b = math.ceil(2.0 + 0.5 * reach * math.pi / n_theta + 4.0 * psf_sigma_px / bin_px)
    found: list[_Found] = []
    n_candidates = 0
    for sign in (1, -1) if negative else (1,):
        binary = _drop_blobs(
            (sign * snr >= threshold_sigma) & has_data, 0.5 * min_length_px / bin_px
        )
        if not binary.any():
            continue
        hough = _Hough(binary, valid3, n_data, n_theta)
        params = _Params(
            sign=sign, psf_sigma=psf_sigma_px, min_length_px=min_length_px,
            min_fwhm_px=min_width_psf * FWHM_PER_SIGMA * psf_sigma_px,
            max_width_px=max_width_px, min_snr=min_snr, min_fill=min_fill,
            mask_nsigma=mask_nsigma, mask_margin_px=mask_margin_px, noise_scale=noise_scale,
        )  # fmt: skip
        for _ in range(max_candidates):
            significance, rho_b, theta = hough.best()
            if not significance >= hough_sigma:
                break
            n_candidates += 1
            line_b = _Line(rho_b, theta)
            hit = _refine(planes, blocks, line_b, params, bin_px, half_b)
            if isinstance(hit, str):
                log.debug(
                    "line rho=%.1f theta=%.2f (%.1f sigma) rejected: %s",
                    rho_b * bin_px,
                    math.degrees(theta),
                    significance,
                    hit,
                )
                lo, hi = line_b.chord(snr.shape)
                hough.remove(*_raster(line_b, lo, hi, np.zeros(1), np.full(1, 2.0), snr.shape))
                continue
            log.debug(
                "line rho=%.1f theta=%.2f (%.1f sigma): %s",
                rho_b * bin_px,
                math.degrees(theta),
                significance,
                hit.streak,
            )
            mask[hit.iy, hit.ix] = True
            _take_out(planes, blocks, hit.iy, hit.ix, bin_px)
            found.append(hit)
            in_blocks, (k0, k1, *knots) = _to_blocks(
                hit.line, np.r_[hit.s0, hit.s1, hit.knots], bin_px
            )
            halves = hit.halves / bin_px + 1.5
            hough.remove(
                *_raster(
                    in_blocks, k0 - halves[0], k1 + halves[-1], np.asarray(knots), halves, snr.shape
                )
            )

    merged: list[_Found] = []
    for hit in sorted(found, key=lambda f: -f.streak.snr):
        same = next((k for k, kept in enumerate(merged) if _same_line(kept, hit)), None)
        if same is None:
            merged.append(hit)
        else:
            merged[same] = _merge(merged[same], hit)
    streaks = tuple(sorted((f.streak for f in merged), key=lambda st: -st.snr))
    return StreakResult(streaks=streaks, mask=mask, n_candidates=n_candidates)


# --- DIA rows -------------------------------------------------------------------------


def streak_dia_rows(
    result: StreakResult,
    *,
    trailed: TrailedRows = "one_per_streak",
    wcs: WCS | None = None,
    schema: pa.Schema = DIA_SOURCE_SCHEMA,
) -> pa.Table:
    """One trailed DIA source per streak, in the columns of :func:`ppray.science.dia.detect_dia_sources`.

    Parameters
    ----------
    result
        What :func:`find_streaks` found.
    trailed
        ``"one_per_streak"``, or ``"none"`` (an empty table: the streaks are only masked).
    wcs
        The difference image's WCS, for ``ra`` and ``dec`` (NaN without it).
    schema
        The table's schema: :data:`~ppray.science.dia.DIA_SOURCE_SCHEMA` by
        default, or the DIA table's own (columns it has beyond those are null).

    Returns
    -------
    pyarrow.Table
        One row per streak, in ``result``'s order, ``diaSourceIndex`` 0..n-1:
        ``x, y`` its midpoint; ``psfFlux`` its total flux (``flux_per_px *
        length_px``, a fit of the trailed PSF along the line) with its error;
        ``snr = psfFlux / psfFluxErr``; ``isTrailed`` true, ``trailLength`` =
        ``length_px``, ``trailAngle`` = :attr:`Streak.angle_deg`; ``ixx, iyy,
        ixy`` the moments of the trail model (``L²/12 + sigma²`` along it,
        ``sigma²`` across); ``nPix`` its mask's pixels; ``apFlux`` NaN (no
        aperture); ``xErr, yErr`` from the line's offset error ``sqrt(2) sigma /
        snr`` across it and the ends' errors (``1 / (S/N per px)²``, at least
        that) along it; ``flags``: ``FLAG_EDGE`` when truncated or on ``EDGE``
        pixels, ``FLAG_SATURATED``, ``FLAG_BAD`` (``BAD``, ``CR``) and
        ``FLAG_NO_DATA`` from the mask bits under it.
    """
    if trailed not in ("one_per_streak", "none"):
        raise ValueError(f"trailed must be 'one_per_streak' or 'none', not {trailed!r}")
    streaks = result.streaks if trailed == "one_per_streak" else ()
    n = len(streaks)
    col = {name: np.full(n, np.nan) for name in ("ra", "dec", "apFlux", "apFluxErr")}
    for name in ("dipoleMeanFlux", "dipoleFluxDiff", "dipoleLength", "dipoleAngle"):
        col[name] = np.full(n, np.nan)
    f = {
        name: np.array([getattr(st, name) for st in streaks], dtype=np.float64)
        for name in Streak.__dataclass_fields__
        if name not in ("n_pix", "mask_bits", "truncated")
    }
    col["x"], col["y"] = 0.5 * (f["x0"] + f["x1"]), 0.5 * (f["y0"] + f["y1"])
    angle = np.radians(f["theta_deg"] + 90.0)
    tx, ty = np.cos(angle), np.sin(angle)
    sigma = f["width_px"] / FWHM_PER_SIGMA
    with np.errstate(divide="ignore", invalid="ignore"):
        across = math.sqrt(2.0) * sigma / f["snr"]
        per_px = f["snr"] / np.sqrt(f["length_px"])
        along = np.maximum(1.0 / per_px**2, across) / math.sqrt(2.0)  # half of two ends
    col["xErr"] = np.hypot(along * tx, across * ty)
    col["yErr"] = np.hypot(along * ty, across * tx)
    col["psfFlux"] = f["flux_per_px"] * f["length_px"]
    col["psfFluxErr"] = f["flux_per_px_err"] * f["length_px"]
    col["snr"] = col["psfFlux"] / col["psfFluxErr"] if n else np.zeros(0)
    lam_along, lam_across = f["length_px"] ** 2 / 12.0 + sigma**2, sigma**2
    col["ixx"] = lam_along * tx**2 + lam_across * ty**2
    col["iyy"] = lam_along * ty**2 + lam_across * tx**2
    col["ixy"] = (lam_along - lam_across) * tx * ty
    col["isNegative"] = col["psfFlux"] < 0
    col["isDipole"] = np.zeros(n, dtype=bool)
    col["isTrailed"] = np.ones(n, dtype=bool)
    col["trailLength"] = f["length_px"]
    col["trailAngle"] = np.array([st.angle_deg for st in streaks], dtype=np.float64)
    col["nPix"] = np.array([st.n_pix for st in streaks], dtype=np.int32)
    flags = np.zeros(n, dtype=np.int32)
    for k, st in enumerate(streaks):
        for bits, flag in (
            (MaskBit.EDGE, FLAG_EDGE), (MaskBit.SAT, FLAG_SATURATED),
            (MaskBit.BAD | MaskBit.CR, FLAG_BAD), (MaskBit.NO_DATA, FLAG_NO_DATA),
        ):  # fmt: skip
            if st.mask_bits & int(bits):
                flags[k] |= flag
        if st.truncated:
            flags[k] |= FLAG_EDGE
    col["flags"] = flags
    col["diaSourceIndex"] = np.arange(n, dtype=np.int64)
    if wcs is not None and n:
        col["ra"], col["dec"] = wcs.all_pix2world(col["x"], col["y"], 0)
    arrays = [
        pa.array(np.asarray(col[fld.name]), fld.type) if fld.name in col else pa.nulls(n, fld.type)
        for fld in schema
    ]
    return pa.table(arrays, schema=schema)


def replace_streak_fragments(
    dia: pa.Table,
    result: StreakResult,
    *,
    trailed: TrailedRows = "one_per_streak",
    wcs: WCS | None = None,
) -> pa.Table:
    """A DIA table with the sources on streaks dropped and one trailed source per streak added.

    Parameters
    ----------
    dia
        The table of :func:`ppray.science.dia.detect_dia_sources` on the same
        difference image (0-based ``x``, ``y``).
    result
        What :func:`find_streaks` found there.
    trailed, wcs
        As :func:`streak_dia_rows`.

    Returns
    -------
    pyarrow.Table
        ``dia``'s schema and metadata; the rows whose ``(x, y)`` pixel (rounded)
        is in ``result.mask`` dropped, the streaks' rows appended, all ordered by
        ``y`` then ``x`` and ``diaSourceIndex`` renumbered 0..n-1 in that order, as
        :func:`~ppray.science.dia.detect_dia_sources` orders them.
    """
    x = np.asarray(dia["x"].to_numpy(zero_copy_only=False), dtype=np.float64)
    y = np.asarray(dia["y"].to_numpy(zero_copy_only=False), dtype=np.float64)
    ny, nx = result.mask.shape
    with np.errstate(invalid="ignore"):
        ix, iy = np.rint(x), np.rint(y)
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    on = np.zeros(x.size, dtype=bool)
    on[inside] = result.mask[iy[inside].astype(np.intp), ix[inside].astype(np.intp)]
    rows = streak_dia_rows(result, trailed=trailed, wcs=wcs, schema=dia.schema)
    table = pa.concat_tables([dia.filter(pa.array(~on)), rows])
    order = np.lexsort(
        (table["x"].to_numpy(zero_copy_only=False), table["y"].to_numpy(zero_copy_only=False))
    )
    table = table.take(pa.array(order))
    if "diaSourceIndex" in table.column_names:
        index = table.schema.get_field_index("diaSourceIndex")
        field = table.schema.field(index)
        table = table.set_column(index, field, pa.array(np.arange(table.num_rows), field.type))
    return table
