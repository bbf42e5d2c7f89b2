"""Pipelines chosen per visit: ordered rules per instrument (survey pattern, sky region),
what each pipeline runs and writes, and the rotation check."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import ppray
from ppray.config import DeploymentConfig, PipelinesConfig, load_config
from ppray.layout import visit_prefix
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import Storage
from ppray.visit.pipelines import choose_pipeline, rotation_offset_deg
from ppray.visit.processor import DetectorProcessor
from ppray.visit.provenance import config_digest

from .helpers import next_visit


def _rules(**rules: object) -> PipelinesConfig:
    return PipelinesConfig.model_validate({"rules": rules})


def test_first_matching_rule_wins_else_the_default() -> None:
    visit = next_visit(survey="BLOCK-365", position=[150.0, 2.0])
    config = _rules(
        Synthetic=[
            {"survey": "BLOCK-1*", "pipeline": "skip"},  # not this survey
            {"survey": "BLOCK-*", "region": [10.0, -30.0, 5.0], "pipeline": "isr"},  # elsewhere
            {"survey": "BLOCK-*", "region": [150.5, 2.0, 1.0], "pipeline": "single_frame"},
            {"survey": "*", "pipeline": "skip"},
        ],
        LSSTCam=[{"survey": "*", "pipeline": "skip"}],
    )
    choice = choose_pipeline(config, visit)
    assert choice.pipeline == "single_frame"
    assert choice.rule == "Synthetic[2]: survey='BLOCK-*', region=[150.5, 2.0, 1.0]"
    assert choose_pipeline(config, next_visit(survey="other")).pipeline == "skip"
    nothing = choose_pipeline(_rules(LSSTCam=[{"pipeline": "skip"}]), visit)
    assert (nothing.pipeline, nothing.rule) == ("ap", "default")


def test_bad_rules_are_named() -> None:
    with pytest.raises(ValidationError, match="pipeline"):
        _rules(Synthetic=[{"survey": "*", "pipeline": "everything"}])
    with pytest.raises(ValidationError, match="radius"):
        _rules(Synthetic=[{"region": [0.0, 0.0, 0.0], "pipeline": "ap"}])


def test_rotation_offset_the_short_way_round() -> None:
    assert rotation_offset_deg(10.0, 12.5) == pytest.approx(2.5)
    assert rotation_offset_deg(179.0, -179.0) == pytest.approx(2.0)
    assert rotation_offset_deg(0.0, 360.0) == pytest.approx(0.0)


@pytest.fixture
def observatory(tmp_path: Path) -> tuple[DeploymentConfig, SimulatedObservatory]:
    cfg = load_config(env={}).rooted_at(str(tmp_path)).with_overrides(detectors=("R22_S01",))
    obs = SimulatedObservatory(cfg, start_time=1_795_000_000.0)
    obs.write_reference_data()
    return cfg, obs


def _run(cfg: DeploymentConfig, obs: SimulatedObservatory, pipeline: str) -> object:
    cfg = cfg.with_overrides(
        pipelines={"rules": {"Synthetic": [{"survey": "ppray-*", "pipeline": pipeline}]}}
    )
    proc = DetectorProcessor.load(cfg, "R22_S01")
    visit = obs.visit(0)
    prepared = proc.prepare(visit)
    assert prepared.pipeline.pipeline == pipeline
    return proc.process(prepared, obs.expose(visit)), visit


@pytest.mark.parametrize("pipeline", ["skip", "isr", "single_frame"])
def test_each_pipeline_runs_its_steps_and_no_more(
    observatory: tuple[DeploymentConfig, SimulatedObservatory], pipeline: str
) -> None:
    cfg, obs = observatory
    result, visit = _run(cfg, obs, pipeline)
    assert result.status == "ok", result.reason  # type: ignore[attr-defined]
    out = Storage(cfg.output_root)
    written = {k.rsplit("/", 1)[1] for k in out.list(f"{visit_prefix(visit)}/R22_S01")}  # type: ignore[arg-type]
    want = {
        "skip": set(),
        "isr": {"postISRCCD.fits"},
        "single_frame": {"sources.parquet", "calexp.fits"},
    }[pipeline]
    assert written == want | {"provenance.json"}
    prov = out.read_json(f"{visit_prefix(visit)}/R22_S01/provenance.json")  # type: ignore[arg-type]
    assert (prov["pipeline"], prov["pipeline_rule"]) == (pipeline, "Synthetic[0]: survey='ppray-*'")
    assert prov["templates"] == [] and prov["alert_schema"] is None
    assert not out.list("alerts")
    if pipeline != "single_frame":
        assert any(f.startswith(f"pipeline_{pipeline}: Synthetic[0]") for f in result.flags)  # type: ignore[attr-defined]
    else:
        assert result.n_sources > 10  # type: ignore[attr-defined]
        assert "difference" not in result.outputs and result.n_alerts == 0  # type: ignore[attr-defined]


def test_a_visit_rotated_off_its_next_visit_is_flagged(
    observatory: tuple[DeploymentConfig, SimulatedObservatory],
) -> None:
    cfg, obs = observatory
    proc = DetectorProcessor.load(cfg, "R22_S01")
    visit = obs.visit(0)
    raws = obs.expose(visit)
    announced = visit.model_copy(update={"cameraAngle": visit.cameraAngle + 3.0})
    result = proc.process(proc.prepare(announced), raws)
    assert any(f.startswith("rotation_mismatch: snap 0") for f in result.flags), result.flags
    fine = proc.process(proc.prepare(visit), raws)
    assert not any(f.startswith("rotation_mismatch") for f in fine.flags)


def test_outputs_record_what_they_were_made_with(
    observatory: tuple[DeploymentConfig, SimulatedObservatory],
) -> None:
    cfg, obs = observatory
    proc = DetectorProcessor.load(cfg, "R22_S01")
    visit = obs.visit(0)
    result = proc.process(proc.prepare(visit), obs.expose(visit))
    assert result.status == "ok", result.reason
    prov = Storage(cfg.output_root).read_json(f"{visit_prefix(visit)}/R22_S01/provenance.json")
    assert prov["schema"] == "ppray.provenance/1" and prov["ppray_version"] == ppray.__version__
    assert prov["config_sha256"] == config_digest(cfg)
    assert prov["config_sha256"] != config_digest(cfg.with_overrides(image_timeout_s=21.0))
    assert (prov["pipeline"], prov["pipeline_rule"]) == ("ap", "default")
    assert prov["calibrations"] == result.calib_ids and prov["calibrations"]
    assert prov["templates"] and all(t.startswith("templates/") for t in prov["templates"])
    assert prov["refcat"] and all(k.endswith(".parquet") for k in prov["refcat"])
    assert prov["reliability_model"] == "ppray1" and prov["alert_schema"] == "11.1"
    assert result.outputs["provenance"].endswith("provenance.json")
    assert result.metrics["s3_retries"] == 0.0  # local disk: nothing to retry
