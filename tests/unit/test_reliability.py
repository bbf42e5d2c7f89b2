"""The DIA reliability score: the shipped model, its file, and what it tells apart.

The model's numbers on the realistic sky (false sources per CCD, completeness)
are in ``test_realistic_sky.py``; here a small synthetic difference holds one of
each thing a difference image detects, with the science and template behind it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ppray.image import Exposure
from ppray.science.dia import detect_dia_sources
from ppray.science.psf import PsfModel, pixel_gaussian
from ppray.science.reliability import (
    FEATURES,
    RELIABILITY_COLUMN,
    ReliabilityModel,
    load_model,
    reliability_features,
    score_dia_sources,
)

SHAPE = (256, 256)
SIGMA = 1.7  # px
SKY_VAR = 400.0


def _star(image: np.ndarray, x: float, y: float, flux: float, sigma: float = SIGMA) -> None:
    half = 12
    cx, cy = round(x), round(y)
    gx = pixel_gaussian(np.array([x - cx]), sigma, half)[0]
    gy = pixel_gaussian(np.array([y - cy]), sigma, half)[0]
    image[cy - half : cy + half + 1, cx - half : cx + half + 1] += flux * np.outer(gy, gx)


def _scene() -> tuple[Exposure, Exposure, Exposure, dict[str, tuple[float, float]]]:
    """A new point source, a cosmic ray, a misregistration dipole and a bright star's
    ring residual, on noise; the template holds the bright stars."""
    rng = np.random.default_rng(5)
    template = np.zeros(SHAPE)
    diff = np.zeros(SHAPE)
    where = {"new": (60.3, 60.7), "cosmic": (190.0, 60.0), "dipole": (60.0, 190.0),
             "ring": (190.0, 190.0)}  # fmt: skip
    _star(diff, *where["new"], 6000.0)
    diff[60, 190] += 3000.0
    diff[61, 191] += 1500.0
    # Misregistration: a bright star minus itself 0.5 px away.
    _star(template, *where["dipole"], 3e5)
    _star(diff, where["dipole"][0] + 0.25, where["dipole"][1], 3e5)
    _star(diff, where["dipole"][0] - 0.25, where["dipole"][1], -3e5)
    # A PSF mismatch: a narrow bright core minus a broader one.
    _star(template, *where["ring"], 4e5)
    _star(diff, *where["ring"], 4e5, sigma=1.55)
    _star(diff, *where["ring"], -4e5, sigma=1.7)
    variance = np.full(SHAPE, SKY_VAR) + np.abs(template)
    noisy = diff + rng.standard_normal(SHAPE) * np.sqrt(variance)
    zeros = np.zeros(SHAPE, dtype=np.uint32)

    def exposure(image: np.ndarray) -> Exposure:
        return Exposure(image.astype(np.float32), variance.astype(np.float32), zeros.copy(), None)

    return exposure(noisy), exposure(template + noisy), exposure(template), where


def _nearest(table: pa.Table, xy: tuple[float, float]) -> int:
    d = np.hypot(table["x"].to_numpy() - xy[0], table["y"].to_numpy() - xy[1])
    return int(np.argmin(d))


def test_the_shipped_model_loads_with_its_provenance() -> None:
    model = load_model()
    assert model.features == FEATURES
    assert model.version
    meta = model.metadata
    assert meta["trained_by"] == "scripts/train_reliability.py"
    scores = meta["test_scores"]
    # What training measured on its held-out visits is what the issue asks for.
    assert scores["false_per_ccd_after"] < 5
    assert scores["completeness_snr10_after"] >= 0.9
    assert scores["n_bright_injected"] >= 100


def test_a_model_file_round_trips_and_refuses_other_features(tmp_path: Path) -> None:
    model = load_model()
    path = tmp_path / "model.npz"
    model.save(path)
    again = ReliabilityModel.read(path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, len(FEATURES)))
    np.testing.assert_array_equal(again.score(x), model.score(x))
    assert np.all((model.score(x) >= 0) & (model.score(x) <= 1))
    other = ReliabilityModel(
        "x", (*FEATURES[:-1], "other"), model.mean, model.scale, model.weights, model.biases
    )
    other.save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="trained on features"):
        ReliabilityModel.read(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="features for a model of"):
        model.score(x[:, :3])


def test_features_tell_the_kinds_apart_and_the_model_ranks_the_real_one_first() -> None:
    difference, science, template, where = _scene()
    psf = PsfModel.gaussian(SIGMA * 2.3548)
    dia = detect_dia_sources(difference, psf)
    features = reliability_features(dia, difference, science, template, psf)
    assert features.shape == (dia.num_rows, len(FEATURES)) and np.isfinite(features).all()
    column = {name: k for k, name in enumerate(FEATURES)}
    row = {kind: _nearest(dia, xy) for kind, xy in where.items()}
    new, cosmic, dipole, ring = (features[row[k]] for k in ("new", "cosmic", "dipole", "ring"))
    # A cosmic ray is sharper than the PSF; a dipole has a lobe of the other sign;
    # a residual sits on a bright template star.
    assert cosmic[column["sharpness"]] > 2 * new[column["sharpness"]]
    assert dipole[column["opposite_fraction"]] > 0.2 > new[column["opposite_fraction"]]
    assert ring[column["log_template_to_diff"]] > 1.0 > new[column["log_template_to_diff"]]
    scored = score_dia_sources(dia, difference, science, template, psf)
    reliability = scored[RELIABILITY_COLUMN].to_numpy()
    assert reliability[row["new"]] >= 0.5
    for kind in ("cosmic", "dipole", "ring"):
        assert reliability[row[kind]] < 0.5, (kind, reliability[row[kind]])
    assert (scored.schema.metadata or {})[
        b"ppray.reliability_version"
    ] == load_model().version.encode()


def test_no_dia_sources_no_features() -> None:
    difference, science, template, _ = _scene()
    psf = PsfModel.gaussian(4.0)
    empty = detect_dia_sources(difference, psf).slice(0, 0)
    assert reliability_features(empty, difference, science, template, psf).shape == (
        0,
        len(FEATURES),
    )
    assert score_dia_sources(empty, difference, science, template, psf).num_rows == 0
