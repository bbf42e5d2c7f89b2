"""A detector's pipeline picks certified calibrations per visit (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ppray.calib import LEGACY_CALIB_ID, CalibRegistry
from ppray.config import load_config
from ppray.layout import calib_key
from ppray.sim.observatory import SimulatedObservatory
from ppray.sim.render import make_calibrations
from ppray.storage import Storage
from ppray.visit.processor import DetectorProcessor

DETECTOR = "R22_S01"
FACTOR = 1.25  # the certified flat is the true one times this: images come out 1/FACTOR


def test_certified_flat_is_swapped_in_between_visits(tmp_path: Path) -> None:
    cfg = load_config(env={}).rooted_at(str(tmp_path)).with_overrides(detectors=(DETECTOR,))
    obs = SimulatedObservatory(cfg, start_time=1_795_000_000.0)
    obs.write_reference_data()
    proc = DetectorProcessor.load(cfg, DETECTOR)
    v0, v1 = obs.visit(0), obs.visit(1)
    first = proc.prepare(v0)
    legacy_calibs = proc.calibs
    truth = make_calibrations(obs.instrument, obs.instrument.detector(DETECTOR), seed=cfg.sim.seed)
    registry = CalibRegistry(Storage(cfg.calib_root), obs.instrument.name)
    flat = registry.certify(
        "flat", DETECTOR, truth.flat * FACTOR, band=v1.filter_band, valid_from=v1.startTime - 1
    )
    second = proc.prepare(v1)
    assert proc.calib_ids["flat"] == flat.calib_id
    r1 = proc.process(second, obs.expose(v1))
    # Visit 0 was prepared before the certification: it keeps the legacy flat.
    r0 = proc.process(first, obs.expose(v0))
    assert (r0.status, r1.status) == ("ok", "ok"), (r0.reason, r1.reason)
    assert r0.calib_ids == dict.fromkeys(("bias", "dark", "flat", "defects"), LEGACY_CALIB_ID)
    assert r1.calib_ids == {**r0.calib_ids, "flat": flat.calib_id}
    assert legacy_calibs is not None and proc.calibs is not legacy_calibs
    np.testing.assert_array_equal(legacy_calibs.flat, truth.flat)  # never changed in place
    # Against the truth: the sky (flat-fielded e-) comes out 1/FACTOR with the new flat,
    # and the zero point (AB mag of 1 e-/s) gets brighter by the same factor.
    sky = cfg.sim.sky_e_per_px_per_s * cfg.sim.exposure_time_s
    assert r0.metrics["bg_mean"] == pytest.approx(sky, rel=0.02)
    assert r1.metrics["bg_mean"] == pytest.approx(sky / FACTOR, rel=0.02)
    shift = r1.metrics["zero_point_mag"] - r0.metrics["zero_point_mag"]
    assert shift == pytest.approx(-2.5 * math.log10(FACTOR), abs=0.02)
    # A visit in another band does not pick up the r flat.
    v2 = obs.visit(2).model_copy(update={"filters": "g"})
    r2 = proc.process(proc.prepare(v2), obs.expose(v2))
    assert r2.status == "ok", r2.reason
    assert r2.calib_ids["flat"] == LEGACY_CALIB_ID
    assert r2.metrics["bg_mean"] == pytest.approx(sky, rel=0.02)


def test_certified_calibrations_alone_are_enough(tmp_path: Path) -> None:
    """Without a legacy calib.fits a detector loads once it has certified products."""
    cfg = load_config(env={}).rooted_at(str(tmp_path)).with_overrides(detectors=(DETECTOR,))
    obs = SimulatedObservatory(cfg, start_time=1_795_000_000.0)
    obs.write_reference_data()
    store = Storage(cfg.calib_root)
    store.delete(calib_key(obs.instrument.name, DETECTOR))
    truth = make_calibrations(obs.instrument, obs.instrument.detector(DETECTOR), seed=cfg.sim.seed)
    registry = CalibRegistry(store, obs.instrument.name)
    visit = obs.visit(0)
    start = visit.startTime - 3600
    for kind, plane in (("bias", truth.bias), ("dark", truth.dark), ("defects", truth.defects)):
        registry.certify(kind, DETECTOR, plane, valid_from=start)  # type: ignore[arg-type]
    proc = DetectorProcessor.load(cfg, DETECTOR)
    assert proc.calibs is None
    no_flat = proc.process(proc.prepare(visit), [])  # fails before reading any raw
    assert no_flat.status == "failed" and not no_flat.retriable
    assert "no flat certified" in no_flat.reason
    registry.certify("flat", DETECTOR, truth.flat, band=visit.filter_band, valid_from=start)
    v1 = obs.visit(1)
    result = proc.process(proc.prepare(v1), obs.expose(v1))
    assert result.status == "ok", result.reason
    assert LEGACY_CALIB_ID not in result.calib_ids.values()
    sky = cfg.sim.sky_e_per_px_per_s * cfg.sim.exposure_time_s
    assert result.metrics["bg_mean"] == pytest.approx(sky, rel=0.02)
