"""What ``ppray diff`` writes, and the summary it prints.

Under the output directory:

- ``diaSources.parquet`` — the DIA sources (:class:`~ppray.fitsdiff.pipeline.DiffProducts`);
- ``sources.parquet`` — the science's sources;
- ``difference.fits`` — the difference: ``IMAGE``, ``VARIANCE`` and ``MASK``
  extensions (electrons, electrons², :class:`~ppray.image.MaskBit` bits) with
  the science's WCS in each (:func:`ppray.imageio.exposure_to_fits`); the
  primary header names the inputs and holds the PSF FWHM and the zero point;
- ``summary.json`` — flags, notes, metrics, timings, the header values used;
- the diagnostic PNG (:mod:`ppray.fitsdiff.plot`), where asked (``diff.png`` by
  default on the command line).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ppray.fitsdiff.pipeline import DiffProducts, dia_kinds
from ppray.fitsdiff.plot import write_diagnostic_png
from ppray.fitsdiff.reader import ImageInput
from ppray.image import Exposure
from ppray.imageio import exposure_to_fits
from ppray.visit.steps import StepTimer

__all__ = ["format_summary", "summary_dict", "write_products"]

_KINDS = ("positive", "negative", "dipole", "trailed")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _input_dict(image: ImageInput) -> dict[str, Any]:
    return {
        "label": image.label,
        "shape": list(image.exposure.shape),
        "pixel_scale_arcsec": image.pixel_scale_arcsec,
        "gain_e_per_unit": [image.gain.value, image.gain.source],
        "saturation": [image.saturation.value, image.saturation.source]
        if image.saturation is not None
        else None,
        "read_noise_e": [image.read_noise_e.value, image.read_noise_e.source],
        "seeing_guess_px": [image.seeing_px.value, image.seeing_px.source],
        "exptime_s": [image.exptime_s.value, image.exptime_s.source],
        "variance": image.variance_source,
        "noise_ratio": _finite(image.noise_ratio),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summary_dict(products: DiffProducts, outputs: dict[str, Path]) -> dict[str, Any]:
    """The run as JSON-safe values (NaN as ``null``)."""
    kinds = Counter(dia_kinds(products.dia_sources).tolist())
    psf = products.psf
    return {
        "science": _input_dict(products.science_input),
        "template": _input_dict(products.template_input),
        "n_sources": products.sources.num_rows,
        "n_dia_sources": products.dia_sources.num_rows,
        "dia_by_kind": {kind: kinds.get(kind, 0) for kind in _KINDS},
        "psf": {
            "fwhm_px": _finite(psf.fwhm_px),
            "fwhm_arcsec": _finite(psf.fwhm_arcsec),
            "ellipticity": _finite(psf.ellipticity),
            "n_stars": psf.n_stars,
            "order": psf.order,
            "measured": psf.measured,
            "reason": psf.reason,
        },
        "zero_point_mag": products.zero_point_mag,
        "flags": products.flags,
        "notes": products.notes,
        "metrics": {k: _finite(float(v)) for k, v in products.metrics.items()},
        "timings_s": products.timings_s,
        "outputs": {k: str(v) for k, v in outputs.items()},
    }


def _difference_with_header(products: DiffProducts) -> Exposure:
    diff = products.difference
    meta: dict[str, Any] = {
        "SCIFILE": products.science_input.label,
        "TMPLFILE": products.template_input.label,
        "BUNIT": "electron",
        "EXPTIME": products.science_input.exptime_s.value,
        "NDIASRC": products.dia_sources.num_rows,
    }
    for key in ("DATE-OBS", "MJD-OBS", "FILTER", "OBJECT", "INSTRUME", "TELESCOP"):
        if key in products.science.metadata:
            meta[key] = products.science.metadata[key]
    if math.isfinite(products.psf.fwhm_px):
        meta["PSFFWHM"] = round(products.psf.fwhm_px, 4)
    if products.zero_point_mag is not None:
        meta["MAGZP"] = round(products.zero_point_mag, 5)
    return Exposure(diff.image, diff.variance, diff.mask, diff.wcs, meta)


def write_products(
    products: DiffProducts,
    out_dir: str | Path,
    *,
    png: str | Path | None = None,
    n_cutouts: int = 8,
) -> dict[str, Path]:
    """Write the DIA sources, sources, difference, PNG and summary under ``out_dir``.

    Parameters
    ----------
    products
        From :func:`~ppray.fitsdiff.pipeline.difference_fits`.
    out_dir
        Created if missing; files of an earlier run are replaced.
    png
        Where the diagnostic PNG goes (:func:`~ppray.fitsdiff.plot.write_diagnostic_png`);
        ``None``: none is drawn.
    n_cutouts
        Rows of cutouts in the PNG.

    Returns
    -------
    dict
        The paths by kind: ``dia_sources``, ``sources``, ``difference``, ``png``
        (if drawn), ``summary``. The ``write`` and ``png`` times are added to
        ``products.timings_s`` before the summary, written last, records them.
    """
    timer = StepTimer(products.timings_s)
    out = Path(out_dir)
    with timer("write"):
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "dia_sources": out / "diaSources.parquet",
            "sources": out / "sources.parquet",
            "difference": out / "difference.fits",
        }
        _parquet(paths["dia_sources"], products.dia_sources)
        _parquet(paths["sources"], products.sources)
        _atomic_write(paths["difference"], exposure_to_fits(_difference_with_header(products)))
    if png is not None:
        with timer("png"):
            paths["png"] = write_diagnostic_png(products, png, n_cutouts=n_cutouts)
    paths["summary"] = out / "summary.json"
    summary = summary_dict(products, paths)
    _atomic_write(paths["summary"], json.dumps(summary, indent=2).encode())
    return paths


def format_summary(products: DiffProducts, outputs: dict[str, Path]) -> str:
    """A few lines for the terminal: detections by kind, PSF, calibration, outputs, times."""
    kinds = Counter(dia_kinds(products.dia_sources).tolist())
    by_kind = ", ".join(f"{kinds.get(k, 0)} {k}" for k in _KINDS)
    psf = products.psf
    sci, tmp = products.science_input, products.template_input
    lines = [
        f"science  {sci.label}: {sci.exposure.shape[1]}x{sci.exposure.shape[0]} px, "
        f'{sci.pixel_scale_arcsec:.3f}"/px, gain {sci.gain.value:g} ({sci.gain.source})',
        f"template {tmp.label}: {tmp.exposure.shape[1]}x{tmp.exposure.shape[0]} px, "
        f"gain {tmp.gain.value:g} ({tmp.gain.source}), "
        + ("warped" if products.metrics.get("template_warped") else "same grid, not warped"),
        f"DIA sources: {products.dia_sources.num_rows} ({by_kind})"
        + (
            f"; {int(np.sum(products.reliability >= 0.5))} with reliability >= 0.5"
            if products.reliability is not None
            else ""
        )
        + (
            f"; {len(products.streaks.streaks)} trails masked"
            if products.streaks is not None and products.streaks.streaks
            else ""
        ),
        f"science sources: {products.sources.num_rows}",
        f'PSF FWHM {psf.fwhm_px:.2f} px = {psf.fwhm_arcsec:.2f}", ellipticity '
        f"{psf.ellipticity:.3f}, "
        + (
            f"{psf.n_stars} stars, order {psf.order}"
            if psf.measured
            else f"fallback ({psf.reason})"
        ),
    ]
    zp = products.zero_point_mag
    cal = products.calibration
    if zp is not None:
        rms = cal.astrometry.rms_arcsec if cal.astrometry is not None else math.nan
        lines.append(f'calibrated: zero point {zp:.3f} mag (1 e-/s), astrometry rms {rms:.3f}"')
    elif cal.astrometry is not None and cal.astrometry.ok:
        lines.append("astrometry fitted; no zero point: " + "; ".join(cal.flags))
    else:
        lines.append("not calibrated: " + ("; ".join(cal.flags) or "no zero point"))
    lines.extend(f"flag: {flag}" for flag in products.flags if flag not in cal.flags)
    lines.extend(f"note: {note}" for note in products.notes)
    lines.append("outputs:")
    lines.extend(f"  {kind:<12} {path}" for kind, path in outputs.items())
    steps = ", ".join(f"{k} {v:.2f}" for k, v in products.timings_s.items())
    lines.append(f"times (s): {steps}; total {sum(products.timings_s.values()):.2f}")
    return "\n".join(lines)
