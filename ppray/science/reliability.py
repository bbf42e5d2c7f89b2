"""A reliability score per DIA source: how likely it is a real astrophysical change.

Most of what a difference image detects on a real sky is not new on the sky:
residuals of bright and saturated stars, dipoles from a slightly wrong
registration, cosmic rays, pieces of trails, edges. Rubin scores every DIA
source with a small classifier trained on injected sources against such
artefacts (its ``reliability`` field) and sends alerts only above a threshold.
ppray does the same:

- :func:`reliability_features` measures, per DIA source, what tells a point
  source that changed from an artefact, from the DIA measurements and from
  cutouts of the difference, science and template images around it (module
  constant :data:`FEATURES` lists them, in order; each is finite);
- :class:`ReliabilityModel` is a small neural network (a multi-layer perceptron
  with ReLU hidden layers and a logistic output) whose weights, feature
  scaling and training provenance are one ``.npz`` file; scoring is a few
  matrix products in numpy, so the pipeline needs no machine-learning library;
- the model shipped in the package (:func:`load_model`, ``models/`` beside
  this module) is trained on the realistic simulator by
  ``scripts/train_reliability.py`` (reproducible: its seeds, the simulator's
  configuration and the scores it reached are in the file's metadata);
- :func:`score_dia_sources` adds the ``reliability`` column (0-1) to a DIA table.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ppray.image import Exposure, MaskBit
from ppray.science.dia import FLAG_CENTROID, FLAG_SATURATED, FLAG_SHAPE
from ppray.science.psf import PsfModel, adaptive_moments
from ppray.science.psfmeasure import cut_stamps

__all__ = [
    "DEFAULT_MODEL",
    "FEATURES",
    "RELIABILITY_COLUMN",
    "ReliabilityModel",
    "load_model",
    "reliability_features",
    "score_dia_sources",
]

RELIABILITY_COLUMN = "reliability"
DEFAULT_MODEL = "reliability-1.npz"
"""The model file shipped in ``ppray/science/models/``."""

FEATURES: tuple[str, ...] = (
    "log_abs_snr",
    "is_negative",
    "is_dipole",
    "is_trailed",
    "dipole_length_fwhm",
    "trail_length_fwhm",
    "log_npix_per_psf",
    "psf_to_ap_flux",
    "log_size_ratio",
    "ellipticity_excess",
    "log_psf_chi2",
    "opposite_fraction",
    "sharpness",
    "log_template_to_diff",
    "log_science_to_diff",
    "log_template_peak_snr",
    "saturation_distance_fwhm",
    "masked_fraction",
    "streak_fraction",
    "edge_distance_fwhm",
    "annulus_rms",
    "centroid_flag",
    "shape_flag",
    "saturated_flag",
)
"""The features, in the order :func:`reliability_features` returns them."""

_UNTRUSTED = np.uint32(
    MaskBit.BAD | MaskBit.SAT | MaskBit.EDGE | MaskBit.NO_DATA | MaskBit.CR | MaskBit.STREAK
)
# Distances are capped (in PSF FWHM): beyond a few FWHM a saturated pixel or the
# border changes nothing.
_CAP_FWHM = 8.0


def _half(psf: PsfModel) -> int:
    return max(10, math.ceil(3.0 * psf.fwhm_px))


def _fit(stamp: np.ndarray, model: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Per stamp, the uniformly weighted least-squares amplitude of ``model``."""
    m = np.where(use, model, 0.0)
    den = (m * m).sum(axis=(1, 2))
    num = (m * np.where(use, stamp, 0.0)).sum(axis=(1, 2))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def reliability_features(
    dia: pa.Table,
    difference: Exposure,
    science: Exposure,
    template: Exposure,
    psf: PsfModel,
) -> np.ndarray:
    """What the classifier sees of each DIA source: ``(n, len(FEATURES))``, finite.

    Parameters
    ----------
    dia
        DIA sources (:func:`ppray.science.dia.detect_dia_sources`, optionally
        with the trails of :func:`ppray.science.streaks.replace_streak_fragments`).
    difference, science, template
        The difference, the calibrated science and the template on the science's
        grid (electrons, background-free), with variance and mask.
    psf
        The difference image's PSF model.

    Notes
    -----
    Per source (see :data:`FEATURES`): its S/N, kind, dipole and trail lengths
    and footprint in PSF units, PSF-to-aperture flux ratio; its size and
    ellipticity against the local PSF's (adaptive moments); on a cutout of the
    difference within 2 FWHM, the PSF fit's reduced chi², the share of flux of
    the opposite sign and the peak's share of the flux against the PSF's (a
    cosmic ray is sharper); the template's and the science's PSF flux over the
    difference's (a residual of a bright star sits on one) and the template's
    peak S/N; the distance to the nearest saturated pixel and to the border, the
    masked and ``STREAK`` share of the cutout; the rms of the difference over its
    noise in an annulus of 2-4 FWHM; and the centroid, shape and saturation flags.
    """
    n = dia.num_rows
    if n == 0:
        return np.zeros((0, len(FEATURES)))
    col = {name: dia[name].to_numpy(zero_copy_only=False) for name in dia.column_names}
    x = np.nan_to_num(col["x"].astype(np.float64))
    y = np.nan_to_num(col["y"].astype(np.float64))
    fwhm = max(psf.fwhm_px, 1.0)
    half = _half(psf)
    d, cx, cy = cut_stamps(difference.image, x, y, half, np.nan)
    v, _, _ = cut_stamps(difference.variance, x, y, half, np.nan)
    m, _, _ = cut_stamps(difference.mask, x, y, half, int(MaskBit.NO_DATA))
    s, _, _ = cut_stamps(science.image, x, y, half, np.nan)
    t, _, _ = cut_stamps(template.image, x, y, half, np.nan)
    tv, _, _ = cut_stamps(template.variance, x, y, half, np.nan)
    finite = np.isfinite(d) & np.isfinite(v) & (v > 0)
    use = finite & ((m & _UNTRUSTED) == 0)
    d = np.where(finite, d, 0.0)
    v = np.where(finite, v, 1.0)
    off = np.arange(-half, half + 1, dtype=np.float64)
    dx, dy = x - cx, y - cy
    r = np.hypot(off[None, None, :] - dx[:, None, None], off[None, :, None] - dy[:, None, None])
    core = r <= 2.0 * fwhm
    model = psf.images_at(cx, cy, dx=dx, dy=dy, half=half)

    sign = np.where(col["isNegative"].astype(bool), -1.0, 1.0)
    dsig = d * sign[:, None, None]
    use_core = use & core
    amp = _fit(dsig, model, use_core)
    resid = (dsig - amp[:, None, None] * model) ** 2 / v
    n_core = np.maximum(use_core.sum(axis=(1, 2)), 1)
    chi2 = (resid * use_core).sum(axis=(1, 2)) / n_core
    absflux = (np.abs(dsig) * use_core).sum(axis=(1, 2))
    opposite = (np.maximum(-dsig, 0.0) * use_core).sum(axis=(1, 2)) / np.maximum(absflux, 1e-30)
    centre = (np.abs(off)[None, :, None] <= 0) & (np.abs(off)[None, None, :] <= 0)
    peak_share = (dsig * centre).sum(axis=(1, 2)) / np.maximum(np.abs(amp), 1e-30)
    psf_peak = (model * centre).sum(axis=(1, 2))
    sharpness = peak_share / np.maximum(psf_peak, 1e-30)

    t_use = np.isfinite(t) & use
    t_amp = _fit(np.where(t_use, t, 0.0), model, t_use & core)
    s_use = np.isfinite(s) & use
    s_amp = _fit(np.where(s_use, s, 0.0), model, s_use & core)
    t_peak = np.nanmax(np.where(core & np.isfinite(t), t, -np.inf), axis=(1, 2))
    t_noise = np.sqrt(np.nanmedian(np.where(np.isfinite(tv) & (tv > 0), tv, np.nan), axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        t_peak_snr = np.where(np.isfinite(t_peak) & (t_noise > 0), t_peak / t_noise, 0.0)

    sat = (m & np.uint32(MaskBit.SAT)) != 0
    sat_dist = np.where(sat, r, np.inf).min(axis=(1, 2)) / fwhm
    masked = ((m & _UNTRUSTED) != 0) | ~finite
    streak = (m & np.uint32(MaskBit.STREAK)) != 0
    ny, nx = difference.shape
    edge = np.minimum(np.minimum(x, nx - 1 - x), np.minimum(y, ny - 1 - y)) / fwhm
    annulus = (r > 2.0 * fwhm) & (r <= 4.0 * fwhm) & use
    ann_rms = np.sqrt(
        (d * d / v * annulus).sum(axis=(1, 2)) / np.maximum(annulus.sum(axis=(1, 2)), 1)
    )

    # The source's size and shape against the local PSF's, measured alike.
    ixx, iyy, ixy = (
        np.nan_to_num(col[k].astype(np.float64), nan=0.0) for k in ("ixx", "iyy", "ixy")
    )
    centred = psf.images_at(cx, cy, half=psf.half)
    pxx, pyy, pxy, *_ = adaptive_moments(centred, psf.sigma_px)
    det_src = np.maximum(ixx * iyy - ixy**2, 1e-6)
    det_psf = np.maximum(np.nan_to_num(pxx * pyy - pxy**2, nan=1.0), 1e-6)
    size_ratio = np.sqrt(np.sqrt(det_src / det_psf))

    def ellipticity(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        mean, rad = 0.5 * (a + b), np.sqrt(0.25 * (a - b) ** 2 + c**2)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(1.0 - np.sqrt(np.maximum(mean - rad, 0.0) / (mean + rad)))

    flags = col["flags"].astype(np.int64)
    psf_flux = np.nan_to_num(col["psfFlux"].astype(np.float64))
    ap_flux = np.nan_to_num(col["apFlux"].astype(np.float64))
    abs_diff = np.maximum(np.abs(psf_flux), 1e-30)
    features = np.column_stack(
        [
            np.log10(np.maximum(np.abs(np.nan_to_num(col["snr"].astype(np.float64))), 1e-3)),
            col["isNegative"].astype(np.float64),
            col["isDipole"].astype(np.float64),
            col["isTrailed"].astype(np.float64),
            np.nan_to_num(col["dipoleLength"].astype(np.float64)) / fwhm,
            np.nan_to_num(col["trailLength"].astype(np.float64)) / fwhm,
            np.log10(np.maximum(col["nPix"].astype(np.float64), 1.0) / fwhm**2),
            np.clip(
                np.where(ap_flux != 0, psf_flux / np.where(ap_flux != 0, ap_flux, 1.0), 0.0), -5, 5
            ),
            np.log10(np.clip(size_ratio, 1e-2, 1e2)),
            ellipticity(ixx, iyy, ixy) - ellipticity(pxx, pyy, pxy),
            np.log10(np.maximum(chi2, 1e-3)),
            opposite,
            np.clip(sharpness, -5, 10),
            np.log10(1.0 + np.abs(t_amp) / abs_diff),
            np.log10(1.0 + np.abs(s_amp) / abs_diff),
            np.log10(1.0 + np.maximum(t_peak_snr, 0.0)),
            np.minimum(sat_dist, _CAP_FWHM),
            masked.mean(axis=(1, 2)),
            streak.mean(axis=(1, 2)),
            np.minimum(edge, _CAP_FWHM),
            np.clip(ann_rms, 0, 20),
            ((flags & FLAG_CENTROID) != 0).astype(np.float64),
            ((flags & FLAG_SHAPE) != 0).astype(np.float64),
            ((flags & FLAG_SATURATED) != 0).astype(np.float64),
        ]
    )
    return np.nan_to_num(features, nan=0.0, posinf=_CAP_FWHM, neginf=-_CAP_FWHM)


MAX_VERSION_LENGTH = 7
"""Rubin's APDB stores ``reliabilityVersion`` as at most 7 characters."""


@dataclass(frozen=True, eq=False)
class ReliabilityModel:
    """A multi-layer perceptron on standardised features: ReLU hidden layers, logistic out.

    Attributes
    ----------
    version
        Its name in the alerts' and the APDB's ``reliabilityVersion`` (at most
        :data:`MAX_VERSION_LENGTH` characters).
    features
        The feature names it was trained on (must match :data:`FEATURES`).
    mean, scale
        Feature standardisation: ``(f - mean) / scale``.
    weights, biases
        One matrix and vector per layer, input to output.
    metadata
        How it was trained (seeds, simulator configuration, scores): JSON-safe.
    """

    version: str
    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Reliability (0-1) of each row of ``features`` ``(n, len(self.features))``."""
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if features.shape[1] != len(self.features):
            raise ValueError(f"{features.shape[1]} features for a model of {len(self.features)}")
        h = (features - self.mean) / self.scale
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = np.maximum(h @ w + b, 0.0)
        z = (h @ self.weights[-1] + self.biases[-1]).ravel()
        return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))  # the logistic, without overflow

    def save(self, path: str | Path) -> None:
        """Write the model as one ``.npz`` (arrays and a JSON metadata string)."""
        arrays: dict[str, Any] = {"mean": self.mean, "scale": self.scale}
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"w{k}"], arrays[f"b{k}"] = w, b
        header = {"version": self.version, "features": list(self.features), **self.metadata}
        arrays["header"] = np.array(json.dumps(header))
        np.savez_compressed(Path(path), **arrays)

    @classmethod
    def read(cls, path: str | Path) -> ReliabilityModel:
        """A model written by :meth:`save`.

        Raises
        ------
        ValueError
            If the file is not such a model, or was trained on other features.
        """
        with np.load(Path(path), allow_pickle=False) as data:
            try:
                header = json.loads(str(data["header"]))
                layers = sum(1 for k in data.files if k.startswith("w"))
                weights = tuple(np.asarray(data[f"w{k}"]) for k in range(layers))
                biases = tuple(np.asarray(data[f"b{k}"]) for k in range(layers))
                mean, scale = np.asarray(data["mean"]), np.asarray(data["scale"])
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}: not a reliability model ({exc})") from exc
        features = tuple(header.pop("features"))
        if features != FEATURES:
            raise ValueError(f"{path}: trained on features {features}, this ppray has {FEATURES}")
        version = str(header.pop("version"))
        if len(version) > MAX_VERSION_LENGTH:
            raise ValueError(
                f"{path}: version {version!r} is longer than {MAX_VERSION_LENGTH} characters, "
                "the APDB's reliabilityVersion column (lsst-sdm-schemas)"
            )
        return cls(version, features, mean, scale, weights, biases, header)


@functools.cache
def load_model(path: str | None = None) -> ReliabilityModel:
    """The model at ``path``, or the one shipped with ppray (read once per process)."""
    if path is not None:
        return ReliabilityModel.read(path)
    with resources.as_file(resources.files("ppray.science") / "models" / DEFAULT_MODEL) as p:
        return ReliabilityModel.read(p)


def score_dia_sources(
    dia: pa.Table,
    difference: Exposure,
    science: Exposure,
    template: Exposure,
    psf: PsfModel,
    model: ReliabilityModel | None = None,
) -> pa.Table:
    """``dia`` with a ``reliability`` column (0-1) and the model's version in its metadata."""
    model = model or load_model()
    scores = model.score(reliability_features(dia, difference, science, template, psf))
    metadata = dict(dia.schema.metadata or {})
    metadata[b"ppray.reliability_version"] = model.version.encode()
    if RELIABILITY_COLUMN in dia.column_names:
        dia = dia.drop_columns([RELIABILITY_COLUMN])
    table = dia.append_column(RELIABILITY_COLUMN, pa.array(scores, pa.float64()))
    return table.replace_schema_metadata(metadata)
