"""Bad input through the whole detector pipeline, difference imaging included.

Each case must give an ``ok`` result that says what was wrong (a flag, logged)
and no false DIA sources from the damage: the field has no transients, so
every DIA source is false.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits

from ppray.apdb.service import LocalAssociation, ShardRouter, load_shard
from ppray.config import DeploymentConfig, load_config
from ppray.errors import RetriableError
from ppray.messages import DetectorResult
from ppray.refcat import RefcatStore
from ppray.science.detection import FLAG_SATURATED
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import read_uri
from ppray.visit.processor import DetectorProcessor

DETECTOR = "R22_S01"


def _config(tmp_path: Path) -> DeploymentConfig:
    base = load_config(env={}).rooted_at(str(tmp_path)).with_overrides(detectors=(DETECTOR,))
    no_transients = {"n_new_transients": 0, "n_variables": 0, "n_movers": 0}
    return base.with_overrides(sim={**base.sim.model_dump(), **no_transients})


def _flag(result: DetectorResult, prefix: str) -> str:
    found = [f for f in result.flags if f.startswith(prefix)]
    assert found, (prefix, result.flags)
    return found[0]


def _xy(table: pa.Table) -> np.ndarray:
    return np.c_[table["x"].to_numpy(), table["y"].to_numpy()]


@pytest.fixture
def observatory(tmp_path: Path) -> SimulatedObservatory:
    obs = SimulatedObservatory(_config(tmp_path), start_time=1_795_000_000.0)
    obs.write_reference_data()
    return obs


def test_all_nan_amplifier(
    observatory: SimulatedObservatory, caplog: pytest.LogCaptureFixture
) -> None:
    proc = DetectorProcessor.load(observatory.config, DETECTOR)
    visit = observatory.visit(0)
    raw = observatory.expose(visit)[0]
    amp = proc.detector.amplifiers[1]

    def nan_amp(uri: str) -> bytes:
        with fits.open(io.BytesIO(read_uri(uri))) as hdul:
            hdul[amp.name].data = np.full(hdul[amp.name].data.shape, np.nan, np.float32)
            buf = io.BytesIO()
            hdul.writeto(buf)
        return buf.getvalue()

    clean = proc.process(proc.prepare(visit), [raw])
    with caplog.at_level(logging.WARNING, logger="ppray.visit.processor"):
        result = proc.process(proc.prepare(visit), [raw], read=nan_amp)
    assert result.status == "ok", result.reason
    assert f"{amp.nx * amp.ny} px" in _flag(result, "no_data")
    assert "no_data" in caplog.text
    assert result.dia_sources is not None and clean.dia_sources is not None
    # Nothing is found in the dead amplifier or along its border...
    xy = _xy(result.dia_sources)
    (ys, xs) = amp.slices
    near = (xy[:, 0] > xs.start - 5) & (xy[:, 0] < xs.stop + 5)
    near &= (xy[:, 1] > ys.start - 5) & (xy[:, 1] < ys.stop + 5)
    assert not near.any(), xy[near]
    # ...and the rest of the detector is measured as without the damage.
    assert result.dia_sources.num_rows <= clean.dia_sources.num_rows
    live = 1.0 - amp.nx * amp.ny / (proc.instrument.layout.nx * proc.instrument.layout.ny)
    assert result.n_sources >= 0.8 * live * clean.n_sources


def test_saturated_bright_star(tmp_path: Path) -> None:
    obs = SimulatedObservatory(_config(tmp_path), start_time=1_795_000_000.0)
    visit = obs.visit(0)
    wcs = obs.true_wcs(visit, DETECTOR)
    catalog = obs.catalog
    x, y = wcs.all_world2pix(catalog["ra"].to_numpy(), catalog["dec"].to_numpy(), 0)
    inside = np.flatnonzero((x > 100) & (x < 400) & (y > 100) & (y < 400))
    star = int(inside[0])
    # 9 magnitudes brighter: ~50x the full well in its core, bleeding nothing (the
    # simulator clips), its wings bright for tens of pixels.
    columns = {}
    for name in catalog.column_names:
        values = catalog[name].to_numpy().copy()
        if name.startswith("mag"):
            values[star] -= 9.0
        columns[name] = values
    obs._catalog = pa.table(columns, schema=catalog.schema)
    obs.write_reference_data()
    proc = DetectorProcessor.load(obs.config, DETECTOR)
    result = proc.process(proc.prepare(visit), obs.expose(visit))
    assert result.status == "ok", result.reason
    _flag(result, "saturated")
    assert result.metrics["n_saturated_px"] > 10
    sources = result.sources
    assert sources is not None and result.dia_sources is not None
    where = np.array([x[star], y[star]])
    d_src = np.hypot(*(_xy(sources) - where).T)
    assert sources["flags"].to_numpy()[d_src < 3] & FLAG_SATURATED
    # The calibration survives the star (it is left out of the fits)...
    assert abs(result.metrics["zero_point_mag"] - 28.0) < 0.02
    assert result.metrics["astrom_rms_arcsec"] < 0.03
    # ...and its residual in the difference is not passed off as a new source.
    dia = result.dia_sources
    d_dia = np.hypot(*(_xy(dia) - where).T)
    unflagged = (dia["flags"].to_numpy() & FLAG_SATURATED) == 0
    assert not (unflagged & (d_dia < 25)).any(), dia.filter(pa.array(d_dia < 25)).to_pylist()


def test_missing_template_is_single_frame(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    obs = SimulatedObservatory(cfg, start_time=1_795_000_000.0)
    obs.write_calibrations()
    RefcatStore(cfg.refcat_root).write(obs.catalog)
    proc = DetectorProcessor.load(cfg, DETECTOR)
    visit = obs.visit(0)
    result = proc.process(proc.prepare(visit), obs.expose(visit))
    assert result.status == "ok", result.reason
    _flag(result, "no_template")
    assert result.dia_sources is None
    assert result.n_sources > 10


def test_undelivered_alerts_fail_the_detector_retriably(
    observatory: SimulatedObservatory,
) -> None:
    """Alerts the sink could not deliver (Kafka down) must not pass for a done detector."""

    class DownSink:
        def write(self, key: str, alerts: object) -> str:
            raise RetriableError("alerts: not acknowledged by Kafka: broker down")

        def close(self) -> None:
            pass

    association = LocalAssociation([load_shard(ShardRouter(1), 0, None)])
    proc = DetectorProcessor.load(observatory.config, DETECTOR, association)
    proc.alert_sink = DownSink()
    visit = observatory.visit(0)
    result = proc.process(proc.prepare(visit), observatory.expose(visit))
    assert result.status == "failed" and result.retriable, result
    assert "not acknowledged by Kafka" in result.reason


def test_no_stars_with_a_template(tmp_path: Path) -> None:
    """Clouds (or an empty field): nothing to fit the kernel or the PSF on, still a result."""
    base = _config(tmp_path)
    cfg = base.with_overrides(sim={**base.sim.model_dump(), "star_density_per_deg2": 0.0})
    obs = SimulatedObservatory(cfg, start_time=1_795_000_000.0)
    obs.write_reference_data()
    proc = DetectorProcessor.load(cfg, DETECTOR)
    visit = obs.visit(0)
    result = proc.process(proc.prepare(visit), obs.expose(visit))
    assert result.status == "ok", result.reason
    _flag(result, "psf_fallback")
    _flag(result, "subtraction_degraded")
    _flag(result, "dia_psf_fallback")
    assert result.dia_sources is not None
    assert result.dia_sources.num_rows <= 3  # nothing is there: noise peaks at most
