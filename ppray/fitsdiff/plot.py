"""The diagnostic picture of a ``ppray diff`` run.

Left, the difference image (zscale limits, grey) with every DIA source marked
by kind (positive, negative, dipole, trailed: colour and marker differ, with a
legend and counts), the brightest numbered. Right, for the ``n_cutouts``
detections of largest ``|S/N|``, cutouts of the science, the template (on the
science's grid) and the difference: science and template (scaled to the
science's flux by the matching kernel's sum) share an asinh stretch, so what
the template lacks shows; the difference is linear and symmetric about zero.
Pixels DIA does not trust (``SAT``, ``EDGE``, ``NO_DATA``, ``BAD``) are blue.

Drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas: no pyplot,
no global state, safe in any thread or process.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from astropy.visualization import AsinhStretch, ImageNormalize, ZScaleInterval
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, FigureBase
from matplotlib.patches import Patch

from ppray.fitsdiff.pipeline import DiffProducts, dia_kinds
from ppray.image import Exposure, MaskBit

__all__ = ["KIND_STYLES", "diagnostic_figure", "write_diagnostic_png"]

KIND_STYLES: dict[str, dict[str, str]] = {
    "positive": {"marker": "o", "color": "#33dd33"},
    "negative": {"marker": "o", "color": "#ff3333"},
    "dipole": {"marker": "D", "color": "#33ccff"},
    "trailed": {"marker": "s", "color": "#ffaa00"},
}
"""Marker and colour of each kind of DIA source."""

# Difference pixels DIA does not trust (ppray.visit.steps): drawn in their own colour,
# or their residuals (a saturated star's) look like missed sources.
_UNTRUSTED = np.uint32(MaskBit.BAD | MaskBit.SAT | MaskBit.EDGE | MaskBit.NO_DATA)
_MASKED_COLOUR = "#2f4f7f"
_CMAP = colormaps["gray"].with_extremes(bad=_MASKED_COLOUR)


_NO_DATA = np.uint32(MaskBit.NO_DATA)


def _display(exposure: Exposure, hide: np.uint32 = _NO_DATA, scale: float = 1.0) -> np.ndarray:
    image = np.array(exposure.image, dtype=np.float32)
    if scale != 1.0:
        image *= np.float32(scale)
    image[(exposure.mask & hide) != 0] = np.nan
    return image


def _cutout(image: np.ndarray, x: float, y: float, half: int) -> np.ndarray:
    """A ``2 half + 1`` square about the nearest pixel; NaN off the image."""
    ny, nx = image.shape
    cx, cy = round(x), round(y)
    out = np.full((2 * half + 1, 2 * half + 1), np.nan, dtype=np.float32)
    y0, y1 = max(cy - half, 0), min(cy + half + 1, ny)
    x0, x1 = max(cx - half, 0), min(cx + half + 1, nx)
    if y0 < y1 and x0 < x1:
        out[y0 - (cy - half) : y1 - (cy - half), x0 - (cx - half) : x1 - (cx - half)] = image[
            y0:y1, x0:x1
        ]
    return out


def _limits(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(finite, [lo, hi]))
    return (vmin, vmax) if vmax > vmin else (vmin, vmin + 1.0)


def _overview(ax: Axes, products: DiffProducts, top: np.ndarray) -> None:
    image = _display(products.difference, _UNTRUSTED)
    finite = image[np.isfinite(image)]
    vmin, vmax = ZScaleInterval().get_limits(finite) if finite.size else (0.0, 1.0)
    ax.imshow(image, origin="lower", cmap=_CMAP, vmin=vmin, vmax=vmax, interpolation="nearest")
    table = products.dia_sources
    kinds = dia_kinds(table)
    x = table["x"].to_numpy(zero_copy_only=False)
    y = table["y"].to_numpy(zero_copy_only=False)
    size = max(60.0, (3.0 * products.psf.fwhm_px) ** 2)
    for kind, style in KIND_STYLES.items():
        sel = kinds == kind
        ax.scatter(
            x[sel],
            y[sel],
            s=size,
            facecolors="none",
            edgecolors=style["color"],
            marker=style["marker"],
            linewidths=1.3,
            label=f"{kind} ({int(sel.sum())})",
        )
    trailed = np.flatnonzero(kinds == "trailed")
    if trailed.size:
        length = table["trailLength"].to_numpy(zero_copy_only=False)[trailed]
        angle = np.radians(table["trailAngle"].to_numpy(zero_copy_only=False)[trailed])
        dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
        for i, k in enumerate(trailed):
            ax.plot(
                [x[k] - dx[i], x[k] + dx[i]],
                [y[k] - dy[i], y[k] + dy[i]],
                color=KIND_STYLES["trailed"]["color"],
                linewidth=1.0,
            )
    offset = 1.2 * math.sqrt(size)
    for rank, k in enumerate(top, start=1):
        ax.annotate(
            str(rank),
            (x[k], y[k]),
            xytext=(offset / 2, offset / 2),
            textcoords="offset points",
            color="yellow",
            fontsize=9,
        )
    handles, _ = ax.get_legend_handles_labels()
    masked = Patch(facecolor=_MASKED_COLOUR, label="masked (SAT, EDGE, NO_DATA, BAD)")
    # Below the image, where it hides nothing.
    ax.legend(
        handles=[*handles, masked],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.07),
        ncol=3,
        fontsize=9,
        frameon=False,
    )
    ny, nx = image.shape
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    sci, tmp = products.science_input.label, products.template_input.label
    ax.set_title(
        f"difference: {sci} - {tmp}\n{table.num_rows} DIA sources, PSF FWHM "
        f'{products.psf.fwhm_arcsec:.2f}"',
        fontsize=11,
    )


def _cutouts(fig: FigureBase, products: DiffProducts, top: np.ndarray, half: int) -> None:
    if top.size == 0:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no DIA sources", ha="center", va="center", fontsize=14)
        return
    table = products.dia_sources
    kinds = dia_kinds(table)
    x = table["x"].to_numpy(zero_copy_only=False)
    y = table["y"].to_numpy(zero_copy_only=False)
    snr = table["snr"].to_numpy(zero_copy_only=False)
    reliability = (
        table["reliability"].to_numpy(zero_copy_only=False)
        if "reliability" in table.column_names
        else np.full(table.num_rows, np.nan)
    )
    # The template in science units, so that one stretch serves both and what the
    # template lacks shows.
    planes = [
        _display(products.science),
        _display(products.template, scale=products.template_flux_scale),
        _display(products.difference, _UNTRUSTED),
    ]
    sigma = np.sqrt(
        np.where(np.isfinite(products.difference.variance), products.difference.variance, np.nan)
    )
    axes = np.atleast_2d(fig.subplots(top.size, 3, squeeze=False))
    for row, k in enumerate(top):
        sci, tmp, diff = (_cutout(p, x[k], y[k], half) for p in planes)
        lo, hi = _limits(sci, 1.0, 99.8)
        norm = ImageNormalize(vmin=lo, vmax=hi, stretch=AsinhStretch(0.1), clip=True)
        noise = float(np.nanmedian(_cutout(sigma, x[k], y[k], half)))
        peak = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
        level = max(peak, 5.0 * noise if math.isfinite(noise) else 0.0, 1e-6)
        for col, (cut, kw) in enumerate(
            (
                (sci, {"norm": norm}),
                (tmp, {"norm": norm}),
                (diff, {"vmin": -level, "vmax": level}),
            )
        ):
            ax = axes[row, col]
            ax.imshow(cut, origin="lower", cmap=_CMAP, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(("science", "template", "difference")[col], fontsize=10)
        color = KIND_STYLES[str(kinds[k])]["color"]
        axes[row, 0].set_ylabel(
            f"#{row + 1} S/N {snr[k]:.1f}\n{kinds[k]}"
            + (f"\nreliability {reliability[k]:.2f}" if np.isfinite(reliability[k]) else ""),
            fontsize=8,
            color="black",
            rotation=0,
            ha="right",
            va="center",
        )
        for spine in axes[row, 2].spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2.0)


def diagnostic_figure(
    products: DiffProducts, *, n_cutouts: int = 8, cutout_px: int | None = None
) -> Figure:
    """The difference with its detections marked, and cutouts of the strongest.

    Parameters
    ----------
    products
        From :func:`~ppray.fitsdiff.pipeline.difference_fits`.
    n_cutouts
        Rows of cutouts: the detections of largest ``|S/N|``.
    cutout_px
        Side of the cutouts; default 8 PSF FWHM, at least 21 px (odd).

    Returns
    -------
    matplotlib.figure.Figure
        16 x 9 inches with an Agg canvas (1600 x 900 px at 100 dpi).
    """
    if n_cutouts < 0:
        raise ValueError(f"n_cutouts must be >= 0, not {n_cutouts}")
    fwhm = products.psf.fwhm_px if math.isfinite(products.psf.fwhm_px) else 4.0
    side = cutout_px if cutout_px is not None else max(21, round(8 * fwhm))
    half = max(side // 2, 3)
    snr = products.dia_sources["snr"].to_numpy(zero_copy_only=False)
    order = np.argsort(-np.nan_to_num(np.abs(snr)), kind="stable")
    top = order[: min(n_cutouts, order.size)]
    fig = Figure(figsize=(16, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    subfigures = fig.subfigures(1, 2, width_ratios=[1.45, 1], squeeze=False)
    assert isinstance(subfigures, np.ndarray)  # squeeze=False: always the 1 x 2 array
    left, right = subfigures[0]
    _overview(left.subplots(), products, top)
    _cutouts(right, products, top, half)
    if top.size:
        right.suptitle(f"the {top.size} strongest by |S/N|", fontsize=11)
    return fig


def write_diagnostic_png(
    products: DiffProducts, path: str | Path, *, n_cutouts: int = 8, dpi: int = 100
) -> Path:
    """Draw :func:`diagnostic_figure` into a PNG file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    diagnostic_figure(products, n_cutouts=n_cutouts).savefig(path, dpi=dpi, format="png")
    return path
