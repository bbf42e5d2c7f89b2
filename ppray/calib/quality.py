"""Quality metrics of master calibrations, as flat ``dict[str, float]`` for logs and tables.

For a combined image (bias, dark or flat):

``n_inputs``, ``n_used_min``, ``n_used_median``
    Inputs added and kept per pixel (clipping removes cosmic rays).
``no_data_fraction``
    Fraction of pixels without a value.
``median``
    Median over good pixels (e-, e-/s or relative response).
``noise``
    Median of the propagated standard deviation per pixel.
``noise_ratio``
    Empirical over propagated variance of the inputs (common master noise left
    out; median over pixels): about 1 when the noise model is honest, far
    above when inputs disagree beyond their noise.
``pixel_rms``
    Robust scatter of the image about its large-scale model: noise plus real
    pixel-to-pixel structure (dark-current spread, flat response).
``large_scale_rms``
    RMS of block medians about the image's median: large-scale structure.
``large_scale_residual_rms``
    The same after a quadratic surface is taken out: structure that no smooth
    gradient explains (amplifier steps, glow, ripples).

For defects: ``n_<kind>`` per :class:`~ppray.calib.defects.DefectKind`,
``n_defect_pixels`` and ``defect_fraction``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyarrow as pa

from ppray.calib.combine import CombinedImage
from ppray.calib.defects import DefectKind, defects_to_mask, large_scale_model, robust_sigma

__all__ = ["calibration_quality", "combined_quality", "defect_quality", "image_quality"]


def _block_medians(image: np.ndarray, good: np.ndarray, block: int) -> np.ndarray:
    ny, nx = image.shape
    nby, nbx = ny // block, nx // block
    if nby == 0 or nbx == 0:
        return np.full((1, 1), np.nan)
    cut = np.where(good, image, np.nan)[: nby * block, : nbx * block]
    cells = cut.reshape(nby, block, nbx, block).transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(cells, axis=2)


def _quadratic_residual_rms(coarse: np.ndarray) -> float:
    """RMS of block medians about a least-squares quadratic surface."""
    nby, nbx = coarse.shape
    v, u = np.mgrid[0:nby, 0:nbx]
    u = u / max(nbx - 1, 1) - 0.5
    v = v / max(nby - 1, 1) - 0.5
    ok = np.isfinite(coarse)
    design = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1)[ok]
    if ok.sum() <= design.shape[1]:
        return math.nan
    coef, *_ = np.linalg.lstsq(design, coarse[ok], rcond=None)
    return float(np.sqrt(np.mean((coarse[ok] - design @ coef) ** 2)))


def image_quality(
    image: np.ndarray,
    *,
    variance: np.ndarray | None = None,
    good: np.ndarray | None = None,
    block: int = 32,
) -> dict[str, float]:
    """Noise and structure of an image (see the module docstring for the keys).

    Parameters
    ----------
    image
        The image.
    variance
        Its variance per pixel, for ``noise`` (NaN without).
    good
        ``True`` on pixels to measure (e.g. not defects); non-finite ones never are.
    block
        Block size (pixels) of the large-scale measures.
    """
    img = np.asarray(image, dtype=np.float32)
    ok = np.isfinite(img)
    if good is not None:
        ok &= np.asarray(good, dtype=bool)
    out: dict[str, float] = {"no_data_fraction": float(1.0 - np.isfinite(img).mean())}
    if not ok.any():
        return out | dict.fromkeys(
            ("median", "noise", "pixel_rms", "large_scale_rms", "large_scale_residual_rms"),
            math.nan,
        )
    median = float(np.median(img[ok]))
    out["median"] = median
    out["noise"] = (
        float(np.sqrt(np.nanmedian(np.where(ok, variance, np.nan))))
        if variance is not None
        else math.nan
    )
    model = large_scale_model(img, good=ok, block=block)
    out["pixel_rms"] = robust_sigma((img - model)[ok])
    coarse = _block_medians(img, ok, block)
    finite = np.isfinite(coarse)
    out["large_scale_rms"] = (
        float(np.sqrt(np.mean((coarse[finite] - median) ** 2))) if finite.any() else math.nan
    )
    out["large_scale_residual_rms"] = _quadratic_residual_rms(coarse)
    return out


def combined_quality(
    combined: CombinedImage, *, good: np.ndarray | None = None, block: int = 32
) -> dict[str, float]:
    """:func:`image_quality` of a combination, with its input counts and noise check."""
    out = image_quality(combined.image, variance=combined.variance, good=good, block=block)
    used = combined.n_used if good is None else combined.n_used[good]
    out["n_inputs"] = float(combined.n_inputs)
    out["n_used_min"] = float(used.min()) if used.size else math.nan
    out["n_used_median"] = float(np.median(used)) if used.size else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = combined.empirical_variance / (combined.variance - combined.common_variance)
    if good is not None:
        ratio = np.where(good, ratio, np.nan)
    finite = np.isfinite(ratio)
    out["noise_ratio"] = float(np.median(ratio[finite])) if finite.any() else math.nan
    return out


def defect_quality(table: pa.Table, shape: tuple[int, int]) -> dict[str, float]:
    """Counts of defects by kind, pixels covered, and that as a fraction of the detector."""
    kinds = table["kind"].to_pylist()
    out = {f"n_{k.value}": float(kinds.count(k.value)) for k in DefectKind}
    n_pixels = int(defects_to_mask(table, shape).sum())
    out["n_defect_pixels"] = float(n_pixels)
    out["defect_fraction"] = n_pixels / float(shape[0] * shape[1])
    return out


def calibration_quality(
    *,
    bias: CombinedImage | None = None,
    dark: CombinedImage | None = None,
    flat: CombinedImage | None = None,
    defects: pa.Table | None = None,
    defect_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of a detector's products in one dict, keys prefixed by product.

    ``bias_*``, ``dark_*`` and ``flat_*`` are :func:`combined_quality` over
    pixels outside ``defect_mask``; ``defects_*`` is :func:`defect_quality`.
    """
    good = None if defect_mask is None else ~np.asarray(defect_mask, dtype=bool)
    out: dict[str, float] = {}
    for name, product in (("bias", bias), ("dark", dark), ("flat", flat)):
        if product is not None:
            out |= {f"{name}_{k}": v for k, v in combined_quality(product, good=good).items()}
    if defects is not None:
        shape = next(
            (p.image.shape for p in (bias, dark, flat) if p is not None),
            None if defect_mask is None else defect_mask.shape,
        )
        if shape is None:
            raise ValueError("defects need an image or defect_mask for the detector's shape")
        out |= {f"defects_{k}": v for k, v in defect_quality(defects, shape).items()}
    return out
