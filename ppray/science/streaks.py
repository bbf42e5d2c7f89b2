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
   chunks of a quarter of ``min_length_px`` (16-64 px; the peak of a matched
   filter across the line) gives a robust straight-line fit of the angle and
   offset (3 passes); a candidate that fails the tests below on blocks (with
   70% of each limit) is dropped there. Then on a full-resolution strip: the
   fit once more (offsets within 4 px), the profile's Gaussian width (from the
   median of the chunks' profiles, robust to blobs on the line), and a matched
   filter across the line giving the flux per pixel of length in each 1 px
   column. The extent is the stretch of 16 px chunks with the largest sum of
   ``S/N - 1`` (a maximum subarray: noise drifts down, a streak up, a faint or
   masked stretch inside one is bridged), its ends then placed to 1 px by the
   likelihood of a step in the flux; an end within a FWHM (and the noise of a
   faint end) of the border, or with only masked pixels beyond it, is at the
   border. Last, the width from a least-squares Gaussian through the mean
   profile of the extent's chunks with signal, and the flux again with it.

A streak must pass, or it is rejected (and why):

- ``length_px >= min_length_px``: cosmic rays, point sources and most bleed
  residuals are shorter;
- ``width_px`` (FWHM of the profile) between ``min_width_psf`` PSF FWHM and
  ``max_width_px``: a cosmic ray is sharper than the PSF, a background
  residual or a galaxy wider than a streak;
- ``snr >= min_snr`` over the extent (errors times the blocks' noise scale, and
  the variance the strip's nearest-pixel sampling adds by visiting some pixels
  twice);
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
extent, with round caps of that radius at the ends.

:func:`streak_dia_rows` turns each streak into one trailed DIA source
(:data:`ppray.science.dia.DIA_SOURCE_SCHEMA`); :func:`replace_streak_fragments`
swaps the fragments DIA detection made of the streaks for those rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS
from scipy import ndimage

from ppray.image import Exposure, MaskBit
from ppray.science._lines import (
    FIT_SNR,
    Extent,
    Line,
    LineHough,
    Planes,
    across,
    align,
    band_pixels,
    block_sum,
    chunk_sums,
    columns,
    data_lengths,
    drop_blobs,
    duplication,
    find_extent,
    from_blocks,
    gauss,
    gaussian_profile,
    hough_form,
    mean_profile,
    measure_extent,
    profile_offsets,
    sample_strip,
    smoothed_block_snr,
    to_blocks,
    weighted_planes,
)
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
_BLOCK_SLACK = 0.7  # on blocks, a candidate is dropped below 70% of a limit
_BLEED_ANGLE_DEG = 2.0
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
    fit_chunk_px: int  # chunks of the angle fit: 4 in the shortest streak, 16-64 px


def _failed(ext: Extent | None, length: float, p: _Params, slack: float) -> str | None:
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
    line: Line  # through the profile's centre
    s0: float
    s1: float
    knots: np.ndarray  # along the line, where the mask's half-widths are
    halves: np.ndarray
    iy: np.ndarray  # the mask's pixels
    ix: np.ndarray


def _on_blocks(
    blocks: Planes, line_b: Line, p: _Params, b: int, half: int
) -> tuple[Line, Extent, np.ndarray, float] | str:
    """The candidate aligned and measured on blocks: line, extent, columns ``s``, sigma."""
    lo, hi = line_b.chord(blocks.dv.shape)
    if (hi - lo) * b < _BLOCK_SLACK * p.min_length_px:
        return "short chord"
    sigma = math.sqrt(p.psf_sigma**2 + b * b / 12.0) / b
    ends = np.array([line_b.point(lo), line_b.point(hi)])
    chunk = p.fit_chunk_px // b
    aligned = align(blocks, line_b, ends, half, sigma, p.sign, p.noise_scale, 3, chunk)
    if aligned is None:
        return "no line on blocks"
    line_b, sigma = aligned
    lo, hi = line_b.chord(blocks.dv.shape)
    s = np.arange(lo, hi + 1e-6)
    d = np.arange(-math.ceil(3.0 * sigma + 1.0), math.ceil(3.0 * sigma + 1.0) + 1.0)
    dv, iv, _, _ = sample_strip(blocks, line_b, s, d)
    ext = find_extent(*across(dv, iv, d, sigma, p.sign), _CHUNK_PX // b, p.noise_scale)
    reason = _failed(ext, 0.0 if ext is None else (ext.b - ext.a + 1.0) * b, p, _BLOCK_SLACK)
    if reason is not None or ext is None:
        return f"on blocks: {reason}"
    return line_b, ext, s, sigma


@dataclass(frozen=True)
class _Strip:  # a streak's full-resolution strip, its profile and extent
    line: Line  # through the profile's centre
    s: np.ndarray
    d: np.ndarray
    iv: np.ndarray
    bits: np.ndarray | None
    sigma: float
    num_s: np.ndarray
    den_s: np.ndarray
    ext: Extent
    noise: float  # the S/N scale: the blocks' times the strip's duplication


def _on_pixels(planes: Planes, line: Line, ends: np.ndarray, p: _Params, half: int) -> _Strip | str:
    """The candidate aligned, its profile fitted and its extent found at full resolution."""
    # The line on blocks is good to a block: a few px of offset are enough to try.
    aligned = align(
        planes, line, ends, half, p.psf_sigma, p.sign, p.noise_scale, 1, p.fit_chunk_px, 4.0
    )
    if aligned is None:
        return "no line at full resolution"
    line, sigma = aligned
    lo, hi = line.chord(planes.dv.shape)
    s = columns(line, ends)
    s = s[(s >= lo - 0.5) & (s <= hi + 0.5)]
    half = math.ceil(max(4.0 * sigma, 3.0 * p.psf_sigma) + 3.0)
    d = np.arange(-half, half + 1.0)
    dv, iv, bits, ids = sample_strip(planes, line, s, d, bits=True)
    # The profile first from the median of the chunks (robust to stars on the line) to
    # find the extent, then from the mean over it without its outlying chunks.
    num, _ = chunk_sums(p.sign * dv.astype(np.float64), p.fit_chunk_px)
    den, _ = chunk_sums(iv.astype(np.float64), p.fit_chunk_px)
    # The chunks with the streak where the line now runs (noise chunks reach FIT_SNR
    # somewhere if allowed to look far).
    _, snr = profile_offsets(num, den, d, sigma, max_shift=2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        profiles = np.where(den > 0, num / den, np.nan)[:, snr / p.noise_scale > FIT_SNR]
    centre, sigma = gaussian_profile(profiles, d, sigma)
    noise = p.noise_scale * math.sqrt(duplication(ids, gauss(d - centre, sigma), iv))
    num_s, den_s = across(dv, iv, d - centre, sigma, p.sign)
    ext = find_extent(num_s, den_s, _CHUNK_PX, noise)
    if ext is None:
        return "no signal at full resolution"
    fitted = mean_profile(dv, iv, d - centre, ext, p.sign, noise, _CHUNK_PX, sigma)
    if fitted is not None and abs(fitted[0]) <= sigma:
        centre, sigma = centre + fitted[0], fitted[1]
        num_s, den_s = across(dv, iv, d - centre, sigma, p.sign)
        ext = measure_extent(num_s, den_s, ext.a, ext.b, _CHUNK_PX, noise)
    fwhm = FWHM_PER_SIGMA * sigma
    if ext is None or not p.min_fwhm_px <= fwhm <= p.max_width_px:
        return f"width {fwhm:.1f} px"
    # Parallel: the same s; d now from the profile's centre.
    return _Strip(
        Line(line.rho + centre, line.theta), s, d - centre, iv, bits, sigma, num_s, den_s, ext,
        noise,
    )  # fmt: skip


def _refine(
    planes: Planes, blocks: Planes, line_b: Line, p: _Params, b: int, half_b: int
) -> _Found | str:
    """The streak along a Hough line (in blocks), measured and tested; or why not."""
    coarse = _on_blocks(blocks, line_b, p, b, half_b)
    if isinstance(coarse, str):
        return coarse
    line_b, ext_b, s_b, sigma_b = coarse
    shape = planes.dv.shape
    line, (e0, e1) = from_blocks(line_b, s_b[[ext_b.a, ext_b.b]], b)
    lo, hi = line.chord(shape)
    margin = 3.0 * _CHUNK_PX + b  # the ends on blocks are good to a chunk
    e0, e1 = sorted((e0, e1))
    ends = np.array([line.point(max(lo, e0 - margin)), line.point(min(hi, e1 + margin))])
    strip = _on_pixels(
        planes, line, ends, p, math.ceil(max(4.0 * sigma_b * b, 3.0 * p.psf_sigma) + 4.0)
    )
    if isinstance(strip, str):
        return strip
    line, s, ext, sigma = strip.line, strip.s, strip.ext, strip.sigma
    fwhm = FWHM_PER_SIGMA * sigma
    lo, hi = line.chord(shape)
    # An end is at the border when it is within a FWHM plus the noise of a faint end
    # (a few times 1 / (S/N per px)² px) of it, or when the columns beyond it do not
    # reject the streak going on to the border (log-likelihood ratio above -2). Columns
    # with hardly any data (the line in masked pixels, only its wings not) say nothing.
    s0, s1 = float(s[ext.a]) - 0.5, float(s[ext.b]) + 0.5
    sparse = strip.den_s < 0.3 * float(np.median(strip.den_s[ext.a : ext.b + 1]))
    llr = (ext.flux * strip.num_s - 0.5 * ext.flux**2 * strip.den_s) / strip.noise**2
    llr[sparse] = 0.0
    near = fwhm + 8.0 * float(ext.b - ext.a + 1) / ext.snr**2
    at_lo = s0 - lo <= near or (s[0] <= lo + 1.5 and float(llr[: ext.a].sum()) > -2.0)
    at_hi = hi - s1 <= near or (s[-1] >= hi - 1.5 and float(llr[ext.b + 1 :].sum()) > -2.0)
    s0, s1 = float(lo) if at_lo else s0, float(hi) if at_hi else s1
    masked_end = (ext.a > 0 and sparse[ext.a - 1]) or (ext.b < s.size - 1 and sparse[ext.b + 1])
    reason = _failed(ext, s1 - s0, p, 1.0)
    if reason is not None:
        return reason
    if abs(line.direction[0]) < math.sin(math.radians(_BLEED_ANGLE_DEG)) and strip.bits is not None:
        beside = np.abs(strip.d) <= 3.0 * fwhm + 2.0
        sat = (strip.bits[beside, ext.a : ext.b + 1] & np.uint32(MaskBit.SAT)) != 0
        if float(sat.any(axis=0).mean()) >= 0.5:
            return "bleed residual"

    # The mask: where the profile is above mask_nsigma of the pixel noise, chunk by chunk.
    flux_c = np.where(ext.den_c > 0, ext.num_c / np.maximum(ext.den_c, 1e-30), ext.flux)
    flux_c = ndimage.maximum_filter1d(ndimage.median_filter(flux_c, 3, mode="nearest"), 3)
    trusted = strip.iv[strip.iv > 0]
    noise = math.sqrt(1.0 / float(np.median(trusted))) if trusted.size else 1.0
    peak = flux_c / (math.sqrt(2.0 * math.pi) * sigma)
    ratio = np.maximum(peak / (p.mask_nsigma * noise), 1.0)
    halves = np.maximum(sigma * np.sqrt(2.0 * np.log(ratio)), 0.5 * fwhm) + p.mask_margin_px
    knots = s[0] + ext.knots
    iy, ix = band_pixels(line, s0, s1, knots, halves, shape)
    mask_bits = 0 if planes.mask is None else int(np.bitwise_or.reduce(planes.mask[iy, ix]))
    (x0, y0), (x1, y1) = line.point(s0), line.point(s1)
    rho, theta = hough_form(line)
    streak = Streak(
        x0=float(x0), y0=float(y0), x1=float(x1), y1=float(y1), rho_px=rho,
        theta_deg=math.degrees(theta), width_px=fwhm, length_px=float(s1 - s0),
        flux_per_px=p.sign * ext.flux, flux_per_px_err=ext.flux_err, snr=ext.snr,
        mask_half_width_px=float(halves.max()), n_pix=int(iy.size), mask_bits=mask_bits,
        truncated=bool(at_lo or at_hi or masked_end),
    )  # fmt: skip
    return _Found(streak, line, s0, s1, knots, halves, iy, ix)


def _take_out(planes: Planes, blocks: Planes, iy: np.ndarray, ix: np.ndarray, b: int) -> None:
    """Give the pixels ``(iy, ix)`` no weight any more, in the planes and their blocks."""
    flat = (iy // b) * blocks.dv.shape[1] + ix // b
    n = blocks.dv.size
    blocks.dv.ravel()[:] -= np.bincount(flat, planes.dv[iy, ix], n).astype(np.float32)
    blocks.iv.ravel()[:] -= np.bincount(flat, planes.iv[iy, ix], n).astype(np.float32)
    planes.dv[iy, ix] = 0.0
    planes.iv[iy, ix] = 0.0


def _explained_blocks(
    line_b: Line, hit: _Found | str, b: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The blocks a candidate line accounts for, whether a streak or not: those of the
    streak's mask (and a block and a half more), or 2 blocks either side of the line."""
    if isinstance(hit, str):
        lo, hi = line_b.chord(shape)
        return band_pixels(line_b, lo, hi, np.zeros(1), np.full(1, 2.0), shape)
    line, (s0, s1, *knots) = to_blocks(hit.line, np.r_[hit.s0, hit.s1, hit.knots], b)
    halves = hit.halves / b + 1.5
    return band_pixels(line, s0, s1, np.asarray(knots), halves, shape)


def _same_line(a: _Found, b: _Found) -> bool:
    """Whether ``b`` lies along ``a``'s line, within their masks' half-widths."""
    dtheta = abs((a.line.theta - b.line.theta + math.pi / 2) % math.pi - math.pi / 2)
    if dtheta > math.radians(_SAME_LINE_DEG) or a.streak.flux_per_px * b.streak.flux_per_px < 0:
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
        length_px=float(s1 - s0), flux_per_px=flux, flux_per_px_err=err, snr=abs(flux) / err,
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
    planes = weighted_planes(difference, bad_mask_bits)
    blocks = Planes(block_sum(planes.dv, bin_px), block_sum(planes.iv, bin_px), None)
    snr, has_data, noise_scale = smoothed_block_snr(blocks)
    if not has_data.any():
        return StreakResult((), mask)
    reach = math.hypot(*snr.shape)
    # Angle steps that move the far end of the longest line by ~3 blocks (the 3 rho bins).
    n_theta = int(np.clip(math.pi * reach / 10, 180, 480))
    # Lines with data over less than half the shortest streak are not looked at.
    valid3 = data_lengths(has_data, n_theta, 0.5 * min_length_px / bin_px)
    n_data = int(has_data.sum())
    half_b = math.ceil(2.0 + 0.5 * reach * math.pi / n_theta + 4.0 * psf_sigma_px / bin_px)
    found: list[_Found] = []
    n_candidates = 0
    for sign in (1, -1) if negative else (1,):
        binary = drop_blobs(
            (sign * snr >= threshold_sigma) & has_data, 0.5 * min_length_px / bin_px
        )
        if not binary.any():
            continue
        hough = LineHough(binary, valid3, n_data, n_theta)
        params = _Params(
            sign=sign, psf_sigma=psf_sigma_px, min_length_px=min_length_px,
            min_fwhm_px=min_width_psf * FWHM_PER_SIGMA * psf_sigma_px,
            max_width_px=max_width_px, min_snr=min_snr, min_fill=min_fill,
            mask_nsigma=mask_nsigma, mask_margin_px=mask_margin_px, noise_scale=noise_scale,
            fit_chunk_px=bin_px * max(round(np.clip(min_length_px / 4, 16, 64) / bin_px), 1),
        )  # fmt: skip
        for _ in range(max_candidates):
            significance, rho_b, theta = hough.best()
            if not significance >= hough_sigma:
                break
            n_candidates += 1
            line_b = Line(rho_b, theta)
            hit = _refine(planes, blocks, line_b, params, bin_px, half_b)
            log.debug(
                "Hough line rho=%.0f px theta=%.2f deg (%.1f sigma): %s", rho_b * bin_px,
                math.degrees(theta), significance, hit if isinstance(hit, str) else hit.streak,
            )  # fmt: skip
            hough.remove(*_explained_blocks(line_b, hit, bin_px, snr.shape))
            if not isinstance(hit, str):
                mask[hit.iy, hit.ix] = True
                _take_out(planes, blocks, hit.iy, hit.ix, bin_px)
                found.append(hit)

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
    """One trailed DIA source per streak, in the columns of DIA detection.

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
