"""Straight lines in images: geometry, a Hough transform with a significance per
line, and measurements of a linear feature's profile and extent along a line.

The machinery of :mod:`ppray.science.streaks`, kept apart to keep that module
readable; not part of :mod:`ppray.science`'s API.

Coordinates are 0-based numpy pixel coordinates, ``x`` the column. A
:class:`Line` is ``x cos(theta) + y sin(theta) = rho``; its points are
``rho n + s t + d n`` with the unit normal ``n = (cos theta, sin theta)`` and
direction ``t = (-sin theta, cos theta)``: ``s`` runs along the line, ``d`` across.
A strip is the image sampled on a grid of ``(d, s)`` one pixel apart (nearest
pixel), indexed ``[d, s]``; a column is one ``s`` of it, 1 px across the line.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from astropy.stats import mad_std
from scipy import ndimage
from skimage.transform import hough_line

from ppray.image import Exposure

# fmt: off
__all__ = [
    "FILL_SNR", "FIT_SNR", "KADANE_BIAS", "MIN_BLOB_BLOCKS", "MIN_FIT_CHUNKS", "SMOOTH_BLOCKS",
    "Extent", "Line", "LineHough", "Planes", "across", "align", "band_pixels", "block_sum",
    "chunk_sums", "columns", "data_lengths", "drop_blobs", "duplication", "find_extent",
    "fit_offsets", "from_blocks", "gauss", "gaussian_profile", "hough_angles", "hough_form",
    "line_through", "max_subarray", "mean_profile", "measure_extent", "profile_offsets",
    "sample_strip", "smoothed_block_snr", "to_blocks", "weighted_planes",
]
# fmt: on

KADANE_BIAS = 1.0
"""Per-chunk S/N subtracted before the maximum subarray: noise drifts down, a streak up."""
FILL_SNR = 1.0
"""S/N above which a chunk counts as filled."""
FIT_SNR = 3.0
"""S/N above which a chunk's offset counts in the fit of a line."""
MIN_FIT_CHUNKS = 3
"""Fewest chunks a line is fitted through."""
SMOOTH_BLOCKS = 1.0
"""Sigma of the Gaussian that filters the blocks' S/N, in blocks."""
MIN_BLOB_BLOCKS = 6
"""A compact region of at least this many blocks is a blob."""


# --- weighted planes and blocks -------------------------------------------------------


@dataclass(frozen=True)
class Planes:
    """``dv = data / variance`` and ``iv = 1 / variance`` (``float32``, both 0 where a
    pixel is untrusted), and the mask plane (None for blocks)."""

    dv: np.ndarray
    iv: np.ndarray
    mask: np.ndarray | None


def block_sum(a: np.ndarray, b: int) -> np.ndarray:
    """Sums over ``b`` x ``b`` blocks (partial ones at the far edges), ``float32``.

    Along rows a matrix product with ones when the width allows (one pass over the
    image, as fast as a copy), else strided adds; then adds of whole rows."""
    ny, nx = a.shape
    if nx % b == 0 and a.dtype == np.float32 and a.flags.c_contiguous:
        rows = (a.reshape(-1, b) @ np.ones(b, dtype=np.float32)).reshape(ny, nx // b)
    else:
        rows = np.zeros((ny, -(-nx // b)), dtype=np.float32)
        for k in range(b):
            part = a[:, k::b]
            rows[:, : part.shape[1]] += part
    out = np.zeros((-(-ny // b), rows.shape[1]), dtype=np.float32)
    for k in range(b):
        part = rows[k::b]
        out[: part.shape[0]] += part
    return out


def weighted_planes(exposure: Exposure, bad_mask_bits: int) -> Planes:
    """The exposure's :class:`Planes`: pixels of ``bad_mask_bits``, non-finite ones and
    those of a non-positive or non-finite variance carry no weight."""
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
    return Planes(dv, iv, exposure.mask)


def _separable(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``a`` correlated with ``kernel`` along both axes (zero outside), ``float32``.

    ``correlate1d`` along rows; along columns shifted adds, 3x faster than it there."""
    rows = ndimage.correlate1d(a, kernel, axis=1, mode="constant")
    out = np.zeros_like(rows)
    half, n = kernel.size // 2, a.shape[0]
    for k, w in enumerate(kernel.tolist()):
        o = k - half
        if o >= 0:
            out[: n - o] += np.float32(w) * rows[o:]
        else:
            out[-o:] += np.float32(w) * rows[: n + o]
    return out


def smoothed_block_snr(blocks: Planes) -> tuple[np.ndarray, np.ndarray, float]:
    """S/N of the blocks matched-filtered by a Gaussian, over its robust scatter (at
    least 1); which blocks hold data; that scatter."""
    half = math.ceil(3.0 * SMOOTH_BLOCKS)
    g = np.exp(-0.5 * (np.arange(-half, half + 1) / SMOOTH_BLOCKS) ** 2)
    g /= g.sum()
    num = _separable(blocks.dv, g.astype(np.float32))  # sum g num / sqrt(sum g² den)
    den = _separable(blocks.iv, (g**2).astype(np.float32))
    positive = den[den > 0]
    has_data = den > 0.25 * float(np.median(positive)) if positive.size else den > 0
    snr = np.where(has_data, num / np.sqrt(np.maximum(den, 1e-30)), 0.0).astype(np.float32)
    sample = snr[has_data][:: max(int(has_data.sum()) // 200_000, 1)]
    scale = max(float(mad_std(sample)), 1.0) if sample.size > 100 else 1.0
    snr /= np.float32(scale)
    return snr, has_data, scale


def drop_blobs(binary: np.ndarray, max_length: float) -> np.ndarray:
    """``binary`` without its compact 8-connected regions of at least
    ``MIN_BLOB_BLOCKS`` blocks whose major axis is shorter than ``max_length``."""
    labels, n = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return binary
    iy, ix = np.nonzero(labels)
    lab = labels[iy, ix]
    count = np.bincount(lab, minlength=n + 1).astype(np.float64)
    big = count >= MIN_BLOB_BLOCKS
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


# --- the Hough transform --------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _chord3(shape: tuple[int, int], n_theta: int) -> np.ndarray:
    """Per Hough line, the length inside the box of pixel centres of ``shape``, summed
    over 3 adjacent ``rho`` bins; read-only, kept for the next image of that shape.

    Across a rectangle the length rises linearly from 0 at the first corner the
    line meets to a plateau between the middle two corners, and falls back to 0."""
    w, h = shape[1] - 1.0, shape[0] - 1.0
    thetas = hough_angles(n_theta)
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


def hough_angles(n: int) -> np.ndarray:
    """``n`` angles in [-pi/2, pi/2), as ``hough_line``'s default but for their number."""
    return np.linspace(-math.pi / 2, math.pi / 2, n, endpoint=False)


def data_lengths(has_data: np.ndarray, n_theta: int, min_length: float) -> np.ndarray:
    """Per Hough line of ``has_data``'s shape (``n_theta`` angles), how many pixels
    with data it crosses, summed over 3 adjacent ``rho`` bins; 0 where that is less
    than ``3 * min_length``."""
    valid3 = _chord3(has_data.shape, n_theta)
    if not has_data.all():
        empty = hough_line(~has_data, hough_angles(n_theta))[0]
        valid3 = np.maximum(valid3 - _sum3(empty), np.float32(0.0))
    return np.where(valid3 >= 3.0 * min_length, valid3, np.float32(0.0))


def _sum3(acc: np.ndarray) -> np.ndarray:
    out = acc.astype(np.float32)
    out[1:] += acc[:-1]
    out[:-1] += acc[1:]
    return out


class LineHough:
    """The significance of every line through a binary image, with pixels removable.

    ``hough_line`` counts the binary pixels along each line; the counts are summed
    over 3 adjacent ``rho`` bins (a line's width) and compared with ``p`` times the
    pixels with data there (``valid3``, :func:`data_lengths`), ``p`` the binary
    fraction of the pixels with data: the excess over the binomial scatter, divided
    by that statistic's own robust scatter over the longer lines (smoothing
    correlates neighbouring pixels), is the significance.
    """

    def __init__(self, binary: np.ndarray, valid3: np.ndarray, n_data: int, n_theta: int) -> None:
        self.binary = binary.copy()
        self.thetas = hough_angles(n_theta)
        acc, _, self.dists = hough_line(binary, self.thetas)
        self.acc3 = _sum3(acc)
        p = float(binary.sum()) / max(n_data, 1)
        expected = np.float32(p) * valid3
        self.inv_sd = np.float32(1.0) / np.sqrt(expected * np.float32(1.0 - p) + np.float32(1.0))
        # The scale from a sample of the longer lines: a median needs no more.
        sample = np.flatnonzero(valid3 > 0.5 * float(valid3.max()))[::7]
        sig = (self.acc3.flat[sample] - expected.flat[sample]) * self.inv_sd.flat[sample]
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
        gone = np.zeros(self.binary.shape, dtype=bool)
        gone[iy, ix] = True
        votes = hough_line(gone, self.thetas)[0].astype(np.float32)  # the very same bins
        self.acc3 -= votes  # and from the 3 rho bins each vote counts in
        self.acc3[1:] -= votes[:-1]
        self.acc3[:-1] -= votes[1:]


# --- lines and strips -----------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """``x cos(theta) + y sin(theta) = rho``; its points are ``(rho + d) n + s t``."""

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


def line_through(point: np.ndarray, direction: np.ndarray) -> Line:
    """The line through ``point`` running along ``direction``: ``theta`` is left
    outside [-pi/2, pi/2) when need be, so that ``s`` keeps its sense."""
    theta = math.atan2(-direction[0], direction[1])
    return Line(float(point @ np.array([math.cos(theta), math.sin(theta)])), theta)


def hough_form(line: Line) -> tuple[float, float]:
    """``(rho, theta)`` with ``theta`` in [-pi/2, pi/2), as ``hough_line`` has it."""
    theta = (line.theta + math.pi / 2) % math.pi - math.pi / 2
    return (
        (line.rho, theta) if math.isclose(math.cos(theta - line.theta), 1.0) else (-line.rho, theta)
    )


def to_blocks(line: Line, s: np.ndarray, b: int) -> tuple[Line, np.ndarray]:
    """The line, and positions ``s`` along it, in units of ``b`` x ``b`` blocks."""
    o = 0.5 * (b - 1)
    c, sn = math.cos(line.theta), math.sin(line.theta)
    return Line((line.rho - o * (c + sn)) / b, line.theta), (s - o * (c - sn)) / b


def from_blocks(line: Line, s: np.ndarray, b: int) -> tuple[Line, np.ndarray]:
    """The inverse of :func:`to_blocks`."""
    o = 0.5 * (b - 1)
    c, sn = math.cos(line.theta), math.sin(line.theta)
    return Line(b * line.rho + o * (c + sn), line.theta), b * s + o * (c - sn)


def sample_strip(
    planes: Planes, line: Line, s: np.ndarray, d: np.ndarray, bits: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Nearest pixels of a strip, ``[d, s]``: ``dv`` and ``iv`` (0 off the image), the
    mask bits (with ``bits``), and the pixels' flat indices (-1 off the image)."""
    ny, nx = planes.dv.shape
    p, t, n = line.point(0.0), line.direction, line.normal
    x = np.rint(p[0] + t[0] * s[None, :] + n[0] * d[:, None]).astype(np.intp)
    y = np.rint(p[1] + t[1] * s[None, :] + n[1] * d[:, None]).astype(np.intp)
    off = (x < 0) | (x >= nx) | (y < 0) | (y >= ny)
    np.clip(x, 0, nx - 1, out=x)
    np.clip(y, 0, ny - 1, out=y)
    dv, iv = planes.dv[y, x], planes.iv[y, x]
    ids = y * nx + x
    if off.any():
        dv[off] = 0.0
        iv[off] = 0.0
        ids[off] = -1
    mask = None
    if bits and planes.mask is not None:
        mask = np.where(off, np.uint32(0), planes.mask[y, x])
    return dv, iv, mask, ids


def duplication(ids: np.ndarray, g: np.ndarray, iv: np.ndarray, columns: int = 256) -> float:
    """Variance of a strip's matched filter over what its sums assume, >= 1.

    Nearest-pixel sampling on a grid turned from the pixels' visits some pixels
    twice and skips others (up to ~1.3 at 45 degrees): the sum of ``g D / V``
    over samples has variance ``sum_p (sum_{i in p} g_i)² / V_p``, not ``sum_i
    g_i² / V_i``. The pattern repeats along the line: ``columns`` of it suffice.
    """
    ids, iv = ids[:, :columns].ravel(), iv[:, :columns].ravel()
    w = np.broadcast_to(g[:, None], (g.size, min(columns, iv.size // g.size))).ravel()
    keep = (ids >= 0) & (iv > 0)
    if not keep.any():
        return 1.0
    ids, iv, w = ids[keep], iv[keep].astype(np.float64), w[keep]
    _, inverse = np.unique(ids, return_inverse=True)
    summed = np.bincount(inverse, w)
    pixel_iv = np.bincount(inverse, iv) / np.bincount(inverse)
    return max(float((summed**2 * pixel_iv).sum() / (w**2 * iv).sum()), 1.0)


def band_pixels(
    line: Line, s0: float, s1: float, knots: np.ndarray, halves: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(iy, ix)``, each once, within the half-widths ``halves`` (at ``knots``
    of ``s``, interpolated) of the segment of the line from ``s0`` to ``s1``, with round
    caps: a stadium. Built in columns (or rows) across the line's major axis."""
    t = line.direction
    major = 0 if abs(t[0]) >= abs(t[1]) else 1  # 0: x steps along the line
    n_major, n_minor = (shape[1], shape[0]) if major == 0 else shape
    h0, h1 = float(np.interp(s0, knots, halves)), float(np.interp(s1, knots, halves))
    p = line.point(0.0)
    ends = sorted((p[major] + (s0 - h0) * t[major], p[major] + (s1 + h1) * t[major]))
    u = np.arange(max(math.ceil(ends[0]), 0), min(math.floor(ends[1]), n_major - 1) + 1)
    s = (u - p[major]) / t[major]
    centre = p[1 - major] + s * t[1 - major]
    half = np.interp(np.clip(s, s0, s1), knots, halves) / abs(t[major])
    lo = np.maximum(np.ceil(centre - half), 0).astype(np.intp)
    hi = np.minimum(np.floor(centre + half), n_minor - 1).astype(np.intp)
    counts = np.maximum(hi - lo + 1, 0)
    v = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    w = np.repeat(u, counts)
    iy, ix = (w, v) if major == 1 else (v, w)
    # Beyond the ends only what is within the end's half-width of the end: round caps.
    rel = np.stack([ix, iy], axis=1) - p
    along, across = rel @ t, rel @ line.normal
    gap = np.where(along < s0, s0 - along, np.maximum(along - s1, 0.0))
    keep = (gap == 0.0) | (gap**2 + across**2 <= np.where(along < s0, h0, h1) ** 2)
    return iy[keep], ix[keep]


# --- along a line ---------------------------------------------------------------------


def gauss(d: np.ndarray, sigma: float) -> np.ndarray:
    """``exp(-d² / 2 sigma²)``."""
    return np.exp(-0.5 * (d / sigma) ** 2)


def chunk_sums(a: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``a`` over chunks of ``size`` along its last axis, and their centres."""
    starts = np.arange(0, a.shape[-1], size)
    ends = np.minimum(starts + size, a.shape[-1])
    return np.add.reduceat(a, starts, axis=-1), 0.5 * (starts + ends - 1)


def profile_offsets(
    num: np.ndarray, den: np.ndarray, d: np.ndarray, sigma: float, max_shift: float = math.inf
) -> tuple[np.ndarray, np.ndarray]:
    """Per chunk (columns of ``num``, ``den``): the offset (at most ``max_shift``) of a
    Gaussian profile that maximises its matched-filter S/N, and that S/N."""
    reach = max(int(min(d[-1] - math.ceil(2.0 * sigma), max_shift)), 1)
    shifts = np.arange(-reach, reach + 1, dtype=np.float64)
    template = gauss(d[None, :] - shifts[:, None], sigma)
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


def fit_offsets(s: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[float, float] | None:
    """Weighted fit ``c = a + beta s`` with outliers clipped: ``(a, beta)``, or None."""
    keep = np.ones(s.size, dtype=bool)
    a = beta = 0.0
    for _ in range(3):
        if keep.sum() < MIN_FIT_CHUNKS or np.ptp(s[keep]) == 0:
            return None
        beta, a = np.polyfit(s[keep], c[keep], 1, w=np.sqrt(w[keep]))
        r = np.abs(c - (a + beta * s))
        keep = r <= max(3.0 * 1.4826 * float(np.median(r[keep])), 0.5)
    return float(a), float(beta)


def gaussian_profile(
    profiles: np.ndarray, d: np.ndarray, guess: float, fit: bool = True
) -> tuple[float, float]:
    """Centre and sigma of a Gaussian through the median of the chunks' profiles
    ``[d, chunk]`` (NaN: no data); ``(0, guess)`` when there is nothing to fit.

    Moments of the positive profile within +-3 sigma, iterated (robust to the noise
    in the wings; a Gaussian keeps 97.07% of its variance within 3 sigma); then, with
    ``fit``, a least-squares Gaussian from there: clipping the noise at 0 widens the
    moments of a faint profile, and a template too wide biases its flux up."""
    ok = np.isfinite(profiles).any(axis=1)  # nanmedian warns on a row of NaN
    prof, dd = np.nanmedian(profiles[ok], axis=1), d[ok]
    if prof.size < 5:
        return 0.0, guess
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
    return _gauss_newton(prof, dd, centre, sigma, top) if fit else (centre, sigma)


def _gauss_newton(
    y: np.ndarray, x: np.ndarray, centre: float, sigma: float, top: float
) -> tuple[float, float]:
    """Least-squares ``a exp(-(x - c)² / 2 s²)`` from ``(c, s)`` by Gauss-Newton: the
    fitted ``(c, s)``, or the start if it wanders off (``c`` beyond ``s``, ``s``
    outside [0.3, top])."""
    c, s = centre, sigma
    a = max(float(np.interp(c, x, y)), 1e-12)
    for _ in range(20):
        u = (x - c) / s
        g = np.exp(-0.5 * u * u)
        jac = np.stack([g, a * g * u / s, a * g * u * u / s], axis=1)
        step, *_ = np.linalg.lstsq(jac, y - a * g, rcond=None)
        a, c, s = a + step[0], c + step[1], s + step[2]
        if not (a > 0 and abs(c - centre) <= sigma and 0.3 <= s <= top):
            return centre, sigma
        if abs(step[1]) < 1e-4 and abs(step[2]) < 1e-4:
            break
    return float(c), float(s)


def columns(line: Line, ends: np.ndarray) -> np.ndarray:
    """Positions ``s`` along the line, 1 apart, from the projection of one of ``ends``
    (2 points, ``[2, 2]``) to the other's."""
    lo, hi = np.sort((ends - line.point(0.0)) @ line.direction)
    return lo + np.arange(math.floor(hi - lo) + 1.0)


def align(
    planes: Planes,
    line: Line,
    ends: np.ndarray,
    half: int,
    sigma: float,
    sign: int,
    noise_scale: float,
    passes: int,
    chunk: int,
    max_shift: float = math.inf,
) -> tuple[Line, float] | None:
    """The line re-fitted ``passes`` times to the offsets of the feature (of sign
    ``sign``) across it, in chunks of ``chunk`` columns between the projections of
    ``ends`` (at most ``max_shift`` off the line: the fewer offsets tried, the fewer
    chunks of noise reach :data:`FIT_SNR`), and the profile's sigma, in the planes'
    units; None when fewer than :data:`MIN_FIT_CHUNKS` chunks reach it."""
    d = np.arange(-half, half + 1.0)
    for _ in range(passes):
        s = columns(line, ends)
        dv, iv, _, _ = sample_strip(planes, line, s, d)
        num, centres = chunk_sums(dv.astype(np.float64), chunk)
        den, _ = chunk_sums(iv.astype(np.float64), chunk)
        num *= sign
        offsets, snr = profile_offsets(num, den, d, sigma, max_shift)
        good = snr / noise_scale > FIT_SNR
        fit = fit_offsets(s[0] + centres[good], offsets[good], np.minimum(snr[good], 50.0) ** 2)
        if fit is None:
            return None
        a, beta = fit
        with np.errstate(divide="ignore", invalid="ignore"):
            profiles = np.where(den > 0, num / den, np.nan)[:, good]
        _, sigma = gaussian_profile(profiles, d, sigma, fit=False)
        line = line_through(line.point(0.0, a), line.direction + beta * line.normal)
    return line, sigma


def max_subarray(x: np.ndarray) -> tuple[int, int, float]:
    """Kadane: first and last index of the stretch of ``x`` with the largest sum."""
    best, best_i, best_j, run, start = -math.inf, 0, -1, 0.0, 0
    for k, v in enumerate(x.tolist()):
        run, start = (v, k) if run <= 0.0 else (run + v, start)
        if run > best:
            best, best_i, best_j = run, start, k
    return best_i, best_j, best


@dataclass(frozen=True)
class Extent:
    """Where along a strip a feature is, and its flux per px of length there."""

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


def find_extent(
    num_s: np.ndarray, den_s: np.ndarray, chunk: int, noise_scale: float
) -> Extent | None:
    """Where the feature is, from the sums of :func:`across` per column.

    The stretch of chunks with the largest sum of ``S/N - KADANE_BIAS`` (noise drifts
    down, a feature up, and a faint or masked stretch inside one is bridged), then
    each end placed to the column where the log-likelihood ratio of a step of the
    stretch's flux peaks. None without a positive stretch."""
    num_c, _ = chunk_sums(num_s, chunk)
    den_c, _ = chunk_sums(den_s, chunk)
    positive = den_c[den_c > 0]
    if not positive.size:
        return None
    valid = den_c > 0.3 * float(np.median(positive))
    snr_c = np.where(valid, num_c / np.sqrt(np.maximum(den_c, 1e-30)), 0.0) / noise_scale
    i, j, best = max_subarray(np.where(valid, snr_c - KADANE_BIAS, 0.0))
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
    return measure_extent(num_s, den_s, a, b, chunk, noise_scale)


def measure_extent(
    num_s: np.ndarray, den_s: np.ndarray, a: int, b: int, chunk: int, noise_scale: float
) -> Extent | None:
    """Flux per px of length, its error (times ``noise_scale``) and the fraction of
    chunks above :data:`FILL_SNR` over columns ``a`` to ``b``."""
    info = float(den_s[a : b + 1].sum())
    if not info > 0:
        return None
    num_c, knots = chunk_sums(num_s[a : b + 1], chunk)
    den_c, _ = chunk_sums(den_s[a : b + 1], chunk)
    positive = den_c[den_c > 0]
    valid = den_c > 0.3 * float(np.median(positive))
    snr_c = num_c[valid] / np.sqrt(den_c[valid]) / noise_scale
    fill = float(np.mean(snr_c > FILL_SNR)) if snr_c.size else 0.0
    flux = float(num_s[a : b + 1].sum()) / info
    return Extent(a, b, flux, noise_scale / math.sqrt(info), fill, num_c, den_c, knots + a)


def mean_profile(
    dv: np.ndarray,
    iv: np.ndarray,
    d: np.ndarray,
    ext: Extent,
    sign: int,
    noise_scale: float,
    chunk: int,
    guess: float,
) -> tuple[float, float] | None:
    """Centre and sigma of a Gaussian fitted to the mean profile over the extent's
    chunks above :data:`FILL_SNR` (where the feature is), without those whose flux is
    an outlier (a star or a residual on the line): more precise than the median of
    the chunks' profiles, which found the extent."""
    with np.errstate(divide="ignore", invalid="ignore"):
        flux_c = ext.num_c / ext.den_c
        err_c = noise_scale / np.sqrt(ext.den_c)
        ok = np.isfinite(flux_c) & (flux_c > FILL_SNR * err_c)
    if not ok.any():
        return None
    median = float(np.median(flux_c[ok]))
    keep = ok & (np.abs(flux_c - median) <= 5.0 * err_c + 0.5 * abs(median))
    cols = np.repeat(keep, chunk)[: ext.b - ext.a + 1]
    num = sign * dv[:, ext.a : ext.b + 1][:, cols].sum(axis=1, dtype=np.float64)
    den = iv[:, ext.a : ext.b + 1][:, cols].sum(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        profile = np.where(den > 0, num / den, np.nan)
    return gaussian_profile(profile[:, None], d, guess)


def across(
    dv: np.ndarray, iv: np.ndarray, d: np.ndarray, sigma: float, sign: int
) -> tuple[np.ndarray, np.ndarray]:
    """Matched filter across the line per column: sums of ``g D / V`` and ``g² / V`` for
    a unit-integral Gaussian ``g``; their ratio is the flux per px of length."""
    g = gauss(d, sigma) / (math.sqrt(2.0 * math.pi) * sigma)
    return sign * (g @ dv.astype(np.float64)), (g**2) @ iv.astype(np.float64)
