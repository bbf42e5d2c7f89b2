"""Sky background: a smooth map estimated with ``sep`` (SExtractor's algorithm).

The image is cut into boxes; each box's background is a sigma-clipped mode
estimate of its unmasked pixels, the box values are median-filtered and a
bicubic spline interpolates them to every pixel.
"""

from __future__ import annotations

import numpy as np
import sep

from ppray.image import Exposure, MaskBit

__all__ = ["BACKGROUND_IGNORE", "estimate_background", "subtract_background"]

# Every mask bit except DETECTED: a source footprint is sky for the first pass, and
# a caller that wants sources out of the background can OR DETECTED in itself.
BACKGROUND_IGNORE = np.uint32(
    MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.EDGE | MaskBit.NO_DATA
)


def estimate_background(
    exposure: Exposure, *, box_size: int = 128, filter_size: int = 3
) -> tuple[np.ndarray, dict[str, float]]:
    """Estimate the smooth sky background of an exposure.

    Parameters
    ----------
    exposure
        A post-ISR exposure (electrons).
    box_size
        Side of the boxes in pixels (clipped to the image size).
    filter_size
        Side of the median filter over boxes, in boxes.

    Returns
    -------
    background
        ``float32`` map of the image's shape (electrons).
    stats
        ``bg_mean`` and ``bg_rms``: sep's global background and its RMS
        (electrons), and ``bg_masked_fraction``, the fraction of pixels that
        did not inform the estimate. With every pixel masked the map is zero
        and the statistics are 0.0, 0.0 and 1.0.

    Notes
    -----
    Pixels with any mask bit other than ``DETECTED`` (:data:`BACKGROUND_IGNORE`),
    or a non-finite value, are ignored.
    """
    if box_size < 1 or filter_size < 1:
        raise ValueError(f"box_size and filter_size must be >= 1, not {box_size}, {filter_size}")
    image = np.ascontiguousarray(exposure.image, dtype=np.float32)
    ignore = (exposure.mask & BACKGROUND_IGNORE) != 0
    finite = np.isfinite(image)
    if not finite.all():
        ignore |= ~finite
        # sep reads masked pixels too; a NaN there must not reach its arithmetic.
        image = np.where(finite, image, np.float32(0.0))
    masked_fraction = float(np.count_nonzero(ignore)) / ignore.size
    if masked_fraction == 1.0:
        return np.zeros(image.shape, dtype=np.float32), {
            "bg_mean": 0.0,
            "bg_rms": 0.0,
            "bg_masked_fraction": 1.0,
        }
    ny, nx = image.shape
    bkg = sep.Background(
        image,
        mask=ignore,
        bw=min(box_size, nx),
        bh=min(box_size, ny),
        fw=filter_size,
        fh=filter_size,
    )
    background = bkg.back(dtype=np.float32)
    return background, {
        "bg_mean": float(bkg.globalback),
        "bg_rms": float(bkg.globalrms),
        "bg_masked_fraction": masked_fraction,
    }


def subtract_background(exposure: Exposure, background: np.ndarray) -> Exposure:
    """Subtract a background map, returning a new exposure.

    Parameters
    ----------
    exposure
        The exposure; it is not modified.
    background
        Map of the image's shape, e.g. from :func:`estimate_background`.

    Returns
    -------
    Exposure
        A new exposure whose ``image`` is a new array, ``image - background``
        (0 on ``NO_DATA`` pixels); ``variance``, ``mask`` and ``wcs`` are the
        input's objects, shared rather than copied; ``metadata`` is a copy with
        ``BGMEAN`` (mean of the map) added.
    """
    if background.shape != exposure.image.shape:
        raise ValueError(
            f"background shape {background.shape} != image shape {exposure.image.shape}"
        )
    image = np.subtract(exposure.image, background, dtype=np.float32)
    no_data = (exposure.mask & np.uint32(MaskBit.NO_DATA)) != 0
    if no_data.any():
        image[no_data] = 0.0
    metadata = dict(exposure.metadata)
    metadata["BGMEAN"] = float(np.mean(background, dtype=np.float64))
    return Exposure(
        image=image,
        variance=exposure.variance,
        mask=exposure.mask,
        wcs=exposure.wcs,
        metadata=metadata,
    )
