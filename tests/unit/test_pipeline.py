"""The per-detector pipeline without Ray: outputs, snaps, and failures as results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from ppray.config import DeploymentConfig, load_config
from ppray.errors import RetriableError
from ppray.imageio import exposure_from_fits
from ppray.layout import truth_key, visit_prefix
from ppray.messages import DetectorResult, RawArrival
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import Storage, read_uri
from ppray.visit.processor import DetectorProcessor


def calexp_wcs(result: DetectorResult) -> WCS:
    wcs = exposure_from_fits(read_uri(result.outputs["calexp"])).wcs
    assert wcs is not None
    return wcs


@pytest.fixture
def setup(tmp_path: Path) -> tuple[DeploymentConfig, SimulatedObservatory]:
    cfg = load_config(env={}).rooted_at(str(tmp_path)).with_overrides(detectors=("R22_S01",))
    obs = SimulatedObservatory(cfg, start_time=1_795_000_000.0)
    obs.write_reference_data()
    return cfg, obs


def test_processes_a_visit_and_writes_outputs(
    setup: tuple[DeploymentConfig, SimulatedObservatory],
) -> None:
    cfg, obs = setup
    proc = DetectorProcessor.load(cfg, "R22_S01")
    visit = obs.visit(0)
    raws = obs.expose(visit)
    result = proc.process(proc.prepare(visit), raws)
    assert result.status == "ok", result.reason
    assert result.n_sources > 10 and result.sources is not None
    assert result.sources.num_rows == result.n_sources
    assert set(result.timings_s) >= {
        "prepare",
        "read",
        "isr",
        "background",
        "cosmic_rays",
        "detect",
        "psf",
        "astrometry",
        "photometry",
        "write",
    }
    out = Storage(cfg.output_root)
    table = out.read_parquet(f"{visit_prefix(visit)}/R22_S01/sources.parquet")
    assert table.num_rows == result.n_sources
    assert (table["detector"].to_numpy() == 1).all()
    assert result.outputs["calexp"].endswith("calexp.fits")
    # Characterized and calibrated against the preloaded reference catalog.
    assert abs(result.metrics["zero_point_mag"] - 28.0) < 0.05
    assert result.metrics["astrom_rms_arcsec"] < 0.05
    assert result.metrics["psf_fwhm_arcsec"] > 0
    assert not any(f.startswith("no_template") for f in result.flags)
    assert result.outputs["difference"].endswith("difference.fits")
    assert result.dia_sources is not None
    assert result.metrics["n_dia_sources"] == result.dia_sources.num_rows
    # The fitted WCS recovers where the telescope really pointed (not the nominal WCS).
    truth = obs.raw_store.read_parquet(truth_key(visit.groupId, "R22_S01"))
    x, y = truth["x"].to_numpy(), truth["y"].to_numpy()
    ra, dec = obs.true_wcs(visit, "R22_S01").all_pix2world(x, y, 0)
    for wcs, within in ((proc.prepare(visit).wcs, False), (calexp_wcs(result), True)):
        fra, fdec = wcs.all_pix2world(x, y, 0)
        off = np.hypot((fra - ra) * np.cos(np.radians(dec)), fdec - dec) * 3600
        assert bool(np.sqrt(np.mean(off**2)) < 0.03) == within
    mags = table["mag"].to_numpy()
    assert (mags[table["snr"].to_numpy() > 50] < 24).all()


def test_two_snaps_are_combined(setup: tuple[DeploymentConfig, SimulatedObservatory]) -> None:
    cfg, obs = setup
    proc = DetectorProcessor.load(cfg, "R22_S01")
    visit = obs.visit(1).model_copy(update={"nimages": 2})
    raws = obs.expose(visit, 0) + obs.expose(visit, 1)
    assert raws[0].exposure_id != raws[1].exposure_id
    one = proc.process(proc.prepare(visit), raws[:1])
    both = proc.process(proc.prepare(visit), raws)
    assert both.status == "ok"
    assert both.exposure_id == min(r.exposure_id for r in raws)
    # Twice the exposure: fainter stars come above threshold.
    assert both.n_sources > one.n_sources


def test_failures_become_results(setup: tuple[DeploymentConfig, SimulatedObservatory]) -> None:
    cfg, obs = setup
    proc = DetectorProcessor.load(cfg, "R22_S01")
    visit = obs.visit(0)
    prepared = proc.prepare(visit)
    raw = obs.expose(visit)[0]

    def corrupt(uri: str) -> bytes:
        return read_uri(uri)[:5000]

    bad = proc.process(prepared, [raw], read=corrupt)
    assert bad.status == "failed" and not bad.retriable and "FITS" in bad.reason
    missing = proc.process(prepared, [raw.model_copy(update={"uri": raw.uri + ".gone"})])
    assert missing.status == "failed" and missing.retriable
    other = obs.expose(visit, detectors=("R22_S00",))[0]
    wrong = proc.process(
        prepared, [RawArrival.model_validate({**raw.model_dump(), "uri": other.uri})]
    )
    assert wrong.status == "failed" and "DETNAME" in wrong.reason


def test_missing_calibrations_are_retriable(tmp_path: Path) -> None:
    cfg = load_config(env={}).with_overrides(calib_root=str(tmp_path / "nocalib"))
    with pytest.raises(RetriableError):
        DetectorProcessor.load(cfg, "R22_S00")


def test_prepare_preloads_the_reference_stars_of_the_footprint(
    setup: tuple[DeploymentConfig, SimulatedObservatory],
) -> None:
    cfg, obs = setup
    proc = DetectorProcessor.load(cfg, "R22_S01")
    prepared = proc.prepare(obs.visit(0))
    assert prepared.refcat is not None
    x, y = prepared.wcs.all_world2pix(
        prepared.refcat["ra"].to_numpy(), prepared.refcat["dec"].to_numpy(), 0
    )
    on_chip = (x >= 0) & (x < 512) & (y >= 0) & (y < 512)
    assert on_chip.sum() > 20
    # Only the padded footprint is loaded, not the whole sky catalog.
    assert prepared.refcat.num_rows < obs.catalog.num_rows / 2


def test_missing_refcat_and_clouds_give_flagged_results(tmp_path: Path) -> None:
    base = load_config(env={}).rooted_at(str(tmp_path)).with_overrides(detectors=("R22_S10",))
    cloudy = base.with_overrides(
        sim={
            **base.sim.model_dump(),
            "star_density_per_deg2": 0.0,
            "n_new_transients": 0,
            "n_variables": 0,
            "n_movers": 0,
        },
        refcat_root=str(tmp_path / "no-refcat"),
    )
    obs = SimulatedObservatory(cloudy, start_time=1_795_000_000.0)
    obs.write_calibrations()
    proc = DetectorProcessor.load(cloudy, "R22_S10")
    visit = obs.visit(0)
    prepared = proc.prepare(visit)
    assert prepared.refcat is None
    result = proc.process(prepared, obs.expose(visit))
    assert result.status == "ok", result.reason
    assert any(f.startswith("no_refcat") for f in result.flags)
    assert any(f.startswith("psf_fallback") for f in result.flags)
    assert "zero_point_mag" not in result.metrics


def test_dia_finds_the_injected_transients(tmp_path: Path) -> None:
    """>= 95% of transients with difference-image S/N >= 10 found within 1 arcsec."""
    base = load_config(env={}).rooted_at(str(tmp_path))
    cfg = base.with_overrides(
        sim={**base.sim.model_dump(), "n_new_transients": 60, "n_variables": 60, "n_movers": 10}
    )
    obs = SimulatedObservatory(cfg, start_time=1_795_000_000.0)
    obs.write_reference_data()
    procs = {d: DetectorProcessor.load(cfg, d) for d in obs.detectors}
    found = total = 0
    for index in range(2):
        visit = obs.visit(index)
        raws = obs.expose(visit)
        truth = obs.raw_store.read_parquet(f"truth/{visit.groupId}/transients_0.parquet")
        sigma = obs.seeing_arcsec(visit) / 2.3548 / 0.2
        delta = np.abs(truth["delta_flux_e"].to_numpy())
        # Sky + dark + read noise per pixel, and the template's 1/20 of it.
        noise = (30.0 * 30.0 + 0.05 * 30.0 + 36.0) * (1 + 1 / 20)
        snr = delta / np.sqrt(delta + 4 * np.pi * sigma**2 * noise)
        cos_dec = np.cos(np.radians(visit.dec_deg))
        t_xy = np.c_[truth["ra"].to_numpy() * cos_dec, truth["dec"].to_numpy()]
        for raw in raws:
            proc = procs[raw.detector]
            prepared = proc.prepare(visit)
            result = proc.process(prepared, [raw])
            assert result.status == "ok" and result.dia_sources is not None
            x, y = prepared.wcs.all_world2pix(truth["ra"].to_numpy(), truth["dec"].to_numpy(), 0)
            target = (snr >= 10) & (x > 5) & (x < 506) & (y > 5) & (y < 506)
            dia = result.dia_sources
            d_xy = np.c_[dia["ra"].to_numpy() * cos_dec, dia["dec"].to_numpy()]
            dist = cKDTree(d_xy).query(t_xy)[0] * 3600 if len(d_xy) else np.full(len(t_xy), 99)
            found += int(np.count_nonzero(dist[target] < 1.0))
            total += int(np.count_nonzero(target))
    assert total >= 100
    assert found / total >= 0.95, (found, total)
