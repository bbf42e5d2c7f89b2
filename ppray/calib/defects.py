"""Find defects from a combined dark and a combined flat: hot, cold, dead pixels, bad columns.

Each test compares a pixel with what its surroundings predict, so that real
large-scale structure (vignetting in the flat, glow in the dark) is not taken
for defects: :func:`large_scale_model` is a bilinear interpolation of block
medians, robust to the few defects inside a block.

- *Hot*: dark minus its large-scale model above ``hot_nsigma`` robust
  standard deviations (and above ``hot_min_e_per_s``).
- *Dead* and *cold*: flat over its large-scale model below
  ``dead_threshold`` and ``cold_threshold``.
- *Bad columns*: a column segment whose median departs from the median of its
  neighbouring columns by more than ``column_nsigma`` times the scatter of such
  departures, in the dark or in the flat; found on medians of blocks of rows
  and then followed row by row with a running median, so partial columns get
  their extent. Also any column with at least ``column_fraction`` of its pixels
  bad. A column can be bad while none of its pixels is bad on its own (a 15%
  low column in the flat).
- *No data*: pixels where a combined image has no value.

Results are a boolean mask (``Calibrations.defects``) and a table of boxes
(:data:`DEFECT_SCHEMA`: a pixel is a 1x1 box, a column segment ``1 x height``),
the form LSST's defect lists take.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.ndimage import label, median_filter

from ppray.science.stats import robust_sigma

# robust_sigma lives in ppray.science.stats; it stays importable from here.
__all__ = [
    "DEFECT_SCHEMA",
    "DefectKind",
    "Defects",
    "defects_to_mask",
    "find_defects",
    "large_scale_model",
    "robust_sigma",
]

DEFECT_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


class DefectKind(enum.StrEnum):
    """Kinds of defect, as in the table's ``kind`` column."""

    HOT = "hot"
    COLD = "cold"
    DEAD = "dead"
    BAD_COLUMN = "bad_column"
    NO_DATA = "no_data"


@dataclass(frozen=True)
class Defects:
    """Defects of one detector.

    Attributes
    ----------
    mask
        ``True`` on every defect pixel: use as ``Calibrations.defects``.
    table
        One row per defect (:data:`DEFECT_SCHEMA`); a pixel in a bad column is
        listed only with the column.
    """

    mask: np.ndarray
    table: pa.Table

    def counts(self) -> dict[str, int]:
        """Number of table rows per kind (every kind present, zeros included)."""
        kinds = self.table["kind"].to_pylist()
        return {k.value: kinds.count(k.value) for k in DefectKind}


def _interp_matrix(n: int, n_blocks: int, block: int) -> np.ndarray:
    """``[n, n_blocks]`` weights of linear interpolation between block centres."""
    centres = (np.arange(n_blocks) + 0.5) * block - 0.5
    pos = np.arange(n, dtype=np.float64)
    eye = np.eye(n_blocks)
    return np.stack([np.interp(pos, centres, eye[:, j]) for j in range(n_blocks)], axis=1)


def large_scale_model(
    image: np.ndarray, *, good: np.ndarray | None = None, block: int = 32
) -> np.ndarray:
    """Smooth model of an image: medians of ``block`` x ``block`` blocks, interpolated.

    Parameters
    ----------
    image
        The image; non-finite pixels are ignored.
    good
        ``True`` on pixels to use (default: all finite ones).
    block
        Block size in pixels; larger than any defect cluster, smaller than the
        structure to follow.

    Returns
    -------
    numpy.ndarray
        ``float32``, the shape of ``image``: bilinear between block centres,
        flat beyond the outer ones. Blocks without a good pixel take the median
        of the others.
    """
    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape
    nby, nbx = -(-ny // block), -(-nx // block)
    padded = np.full((nby * block, nbx * block), np.nan, dtype=np.float32)
    padded[:ny, :nx] = img
    if good is not None:
        padded[:ny, :nx][~good] = np.nan
    cells = padded.reshape(nby, block, nbx, block).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty blocks give NaN
        coarse = np.nanmedian(cells, axis=2)
    if not np.isfinite(coarse).any():
        return np.full(img.shape, np.nan, dtype=np.float32)
    coarse[~np.isfinite(coarse)] = np.median(coarse[np.isfinite(coarse)])
    wy = _interp_matrix(ny, nby, block)
    wx = _interp_matrix(nx, nbx, block)
    return (wy @ coarse @ wx.T).astype(np.float32)


def _column_medians(residual: np.ndarray, rows: int) -> np.ndarray:
    """Median of each column over blocks of ``rows`` rows: ``[n_blocks, nx]``."""
    ny, nx = residual.shape
    nb = -(-ny // rows)
    padded = np.full((nb * rows, nx), np.nan, dtype=np.float32)
    padded[:ny] = residual
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(padded.reshape(nb, rows, nx), axis=1)


def _neighbour_median(values: np.ndarray, half_width: int) -> np.ndarray:
    """Per element of each row, the median of the ``half_width`` columns either side."""
    n = values.shape[-1]
    shifted = np.full((2 * half_width, *values.shape), np.nan, dtype=np.float32)
    k = 0
    for off in range(1, half_width + 1):
        shifted[k, ..., off:] = values[..., : n - off]
        shifted[k + 1, ..., : n - off] = values[..., off:]
        k += 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(shifted, axis=0)


def _bad_columns(
    residual: np.ndarray, *, nsigma: float, rows: int, half_width: int
) -> list[tuple[int, int, int]]:
    """Column segments ``(x, y0, y1)`` whose level departs from their neighbours'."""
    nx = residual.shape[1]
    cells = _column_medians(residual, rows)
    departure = cells - _neighbour_median(cells, half_width)
    sigma = robust_sigma(departure)
    if not (math.isfinite(sigma) and sigma > 0):
        return []
    threshold = nsigma * sigma
    with np.errstate(invalid="ignore"):
        candidates = np.flatnonzero((np.abs(departure) > threshold).any(axis=0))
    segments = []
    for xc in candidates:
        x = int(xc)
        lo, hi = max(0, x - half_width), min(nx, x + half_width + 1)
        neighbours = np.delete(residual[:, lo:hi], x - lo, axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dev = residual[:, x] - np.nanmedian(neighbours, axis=1)
        dev = np.nan_to_num(dev, nan=0.0)
        # A running median ignores isolated hot or cold pixels along the column.
        # ("reflect": "nearest" would repeat the end pixel through half the window.)
        running = median_filter(dev, size=rows, mode="reflect")
        runs, n_runs = label(np.abs(running) > threshold)
        for r in range(1, n_runs + 1):
            ys = np.flatnonzero(runs == r)
            if ys.size >= rows // 2:
                segments.append(_segment_extent(x, dev, running, ys, threshold))
    return segments


def _segment_extent(
    x: int, dev: np.ndarray, running: np.ndarray, ys: np.ndarray, threshold: float
) -> tuple[int, int, int]:
    """Ends of a column segment: where the running median crosses half its level.

    Near an end the window mixes good and bad rows and its median leaves the
    noise well before half the window is bad, so the detection threshold alone
    would extend a strong segment by several rows; half the segment's own
    level is crossed within a row or so of the true end.
    """
    level = float(np.median(dev[ys]))
    cut = max(threshold, 0.5 * abs(level))
    runs, _ = label(np.sign(level) * running > cut)
    inside = runs[ys[ys.size // 2]]
    if inside == 0:
        return (x, int(ys[0]), int(ys[-1]) + 1)
    rows = np.flatnonzero(runs == inside)
    return (x, int(rows[0]), int(rows[-1]) + 1)


def defects_to_mask(table: pa.Table, shape: tuple[int, int]) -> np.ndarray:
    """The boolean mask of a defect table (any table with ``x0, y0, width, height``)."""
    mask = np.zeros(shape, dtype=bool)
    cols = [table[c].to_numpy() for c in ("x0", "y0", "width", "height")]
    for x0, y0, w, h in zip(*cols, strict=True):
        mask[int(y0) : int(y0) + int(h), int(x0) : int(x0) + int(w)] = True
    return mask


def find_defects(
    dark: np.ndarray | None,
    flat: np.ndarray | None,
    *,
    hot_nsigma: float = 5.0,
    hot_min_e_per_s: float = 0.0,
    cold_threshold: float = 0.8,
    dead_threshold: float = 0.1,
    column_nsigma: float = 5.0,
    column_fraction: float = 0.5,
    column_rows: int = 32,
    column_half_width: int = 3,
    block: int = 32,
) -> Defects:
    """Hot, cold and dead pixels and bad columns from a combined dark and flat.

    Parameters
    ----------
    dark
        Combined dark (e-/s), or ``None`` to skip hot pixels and dark columns.
    flat
        Combined flat (any normalisation), or ``None`` to skip cold and dead
        pixels and flat columns.
    hot_nsigma, hot_min_e_per_s
        A pixel is hot when its dark current exceeds the local model by more
        than both ``hot_nsigma`` robust sigmas and ``hot_min_e_per_s``.
    cold_threshold, dead_threshold
        Flat response relative to the local model below which a pixel is cold,
        and dead.
    column_nsigma
        Threshold for a column segment's departure from its neighbours, in
        robust sigmas of such departures.
    column_fraction
        A column with at least this fraction of bad pixels is bad as a whole.
    column_rows
        Rows per block of the column search, and length of the running
        median along a column; shorter bad segments are not columns.
    column_half_width
        Neighbouring columns on each side that a column is compared with.
    block
        Block size of :func:`large_scale_model`.

    Returns
    -------
    Defects
        The mask and the table (sorted by kind, then ``y0``, then ``x0``).

    Raises
    ------
    ValueError
        When both inputs are ``None`` or their shapes differ.
    """
    planes = [p for p in (dark, flat) if p is not None]
    if not planes:
        raise ValueError("find_defects needs a dark, a flat or both")
    shape = np.shape(planes[0])
    if any(np.shape(p) != shape for p in planes):
        raise ValueError("dark and flat differ in shape")
    no_data = np.zeros(shape, dtype=bool)
    pixel_kind = np.zeros(shape, dtype=np.uint8)  # 0 good, else index into _PIXEL_KINDS
    residuals: list[np.ndarray] = []
    with np.errstate(invalid="ignore", divide="ignore"):
        if dark is not None:
            d = np.asarray(dark, dtype=np.float32)
            no_data |= ~np.isfinite(d)
            excess = d - large_scale_model(d, block=block)
            sigma = robust_sigma(excess)
            hot = excess > max(hot_nsigma * sigma, hot_min_e_per_s)
            pixel_kind[hot] = 1
            residuals.append(excess)
        if flat is not None:
            f = np.asarray(flat, dtype=np.float32)
            no_data |= ~np.isfinite(f)
            relative = f / large_scale_model(f, good=f > 0, block=block)
            pixel_kind[relative < cold_threshold] = 2
            pixel_kind[relative < dead_threshold] = 3
            residuals.append(relative - np.float32(1.0))
    pixel_kind[no_data] = 4

    column_mask = np.zeros(shape, dtype=bool)
    segments: list[tuple[int, int, int]] = []
    for residual in residuals:
        found = _bad_columns(
            residual, nsigma=column_nsigma, rows=column_rows, half_width=column_half_width
        )
        segments += found
        for x, y0, y1 in found:
            column_mask[y0:y1, x] = True
    ny = shape[0]
    fraction = ((pixel_kind > 0) & (pixel_kind < 4)).sum(axis=0) / ny
    for xc in np.flatnonzero(fraction >= column_fraction):
        if not column_mask[:, xc].any():
            segments.append((int(xc), 0, ny))
            column_mask[:, xc] = True
    segments = _merge_segments(segments)

    rows = []
    for x, y0, y1 in segments:
        rows.append((DefectKind.BAD_COLUMN.value, x, y0, 1, y1 - y0))
    pixel_kind[column_mask] = 0
    for index, kind in enumerate(_PIXEL_KINDS, start=1):
        ys, xs = np.nonzero(pixel_kind == index)
        rows += [(kind.value, int(x), int(y), 1, 1) for y, x in zip(ys, xs, strict=True)]
    order = {k.value: i for i, k in enumerate(DefectKind)}
    rows.sort(key=lambda r: (order[r[0]], r[2], r[1]))
    table = pa.table(
        {name: [r[i] for r in rows] for i, name in enumerate(DEFECT_SCHEMA.names)},
        schema=DEFECT_SCHEMA,
    )
    mask = column_mask | (pixel_kind > 0)
    return Defects(mask=mask, table=table)


_PIXEL_KINDS = (DefectKind.HOT, DefectKind.COLD, DefectKind.DEAD, DefectKind.NO_DATA)


def _merge_segments(segments: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Union of overlapping or touching segments of the same column."""
    merged: list[tuple[int, int, int]] = []
    for x, y0, y1 in sorted(segments):
        if merged and merged[-1][0] == x and y0 <= merged[-1][2]:
            px, py0, py1 = merged[-1]
            merged[-1] = (px, py0, max(py1, y1))
        else:
            merged.append((x, y0, y1))
    return merged
