from __future__ import annotations

from pathlib import Path

import pytest

from ppray.config import default_config_path, load_config


def test_embedded_default_loads() -> None:
    cfg = load_config(env={})
    assert cfg.instrument == "synthetic"
    assert cfg.source.kind == "memory"
    assert default_config_path().exists()


def test_environment_overrides_top_level_and_nested() -> None:
    cfg = load_config(
        env={
            "PPRAY_OUTPUT_ROOT": "s3://bucket/out",
            "PPRAY_WORKER__NUM_CPUS": "1",
            "PPRAY_SIM__N_VISITS": "7",
            "UNRELATED": "x",
        }
    )
    assert cfg.output_root == "s3://bucket/out"
    assert cfg.worker.num_cpus == 1.0
    assert cfg.sim.n_visits == 7


def test_invalid_config_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_timeout_s: -1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: field 'image_timeout_s'"):
        load_config(bad, env={})
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", env={})
    with pytest.raises(ValueError, match=r"sim\.n_visits"):
        load_config(env={"PPRAY_SIM__N_VISITS": "0"})


@pytest.mark.parametrize("name", ["local.yaml", "directory.yaml", "lsstcam.yaml", "kafka.yaml"])
def test_shipped_deployments_validate(name: str) -> None:
    load_config(default_config_path().parent / name, env={})


def test_ray_task_retries_of_workers_are_refused(tmp_path: Path) -> None:
    """The coordinator re-runs a dead worker's detector; Ray's retry would just time out."""
    bad = tmp_path / "retries.yaml"
    bad.write_text("worker:\n  max_task_retries: 1\n")
    with pytest.raises(ValueError, match="detector_retries"):
        load_config(bad, env={})
    assert load_config(env={}).worker.scheduling_strategy == "SPREAD"


def test_calibration_defaults_are_documented_values() -> None:
    calib = load_config(env={}).calibration
    assert (calib.surveys.bias, calib.surveys.dark, calib.surveys.flat) == (
        "CALIB-BIAS",
        "CALIB-DARK",
        "CALIB-FLAT",
    )
    assert calib.validity_days is None  # open-ended until superseded
    assert (calib.combine.method, calib.combine.nsigma, calib.combine.n_reference) == (
        "clipped_mean",
        4.0,
        5,
    )
    assert calib.combine.grow == 1 and calib.find_defects and calib.flat_quantiles == 257
    assert calib.surveys.kind_of("CALIB-DARK") == "dark"
    assert calib.surveys.kind_of("BLOCK-365") is None


def test_calibration_is_configurable_from_yaml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "calib.yaml"
    path.write_text(
        "calibration:\n  surveys: {flat: DOME-FLAT}\n  combine: {nsigma: 3.5}\n"
        "  defects: {cold_threshold: 0.7}\n"
    )
    cfg = load_config(path, env={"PPRAY_CALIBRATION__VALIDITY_DAYS": "30"})
    assert cfg.calibration.surveys.flat == "DOME-FLAT"
    assert cfg.calibration.surveys.bias == "CALIB-BIAS"
    assert cfg.calibration.combine.nsigma == 3.5
    assert cfg.calibration.defects.cold_threshold == 0.7
    assert cfg.calibration.validity_days == 30.0
    env = {"PPRAY_CALIBRATION__SURVEYS__DARK": "DARKS"}
    assert load_config(env=env).calibration.surveys.kind_of("DARKS") == "dark"


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"PPRAY_CALIBRATION__SURVEYS__DARK": "CALIB-BIAS"}, "calibration.surveys"),
        ({"PPRAY_CALIBRATION__VALIDITY_DAYS": "0"}, "calibration.validity_days"),
        ({"PPRAY_CALIBRATION__COMBINE__METHOD": "median"}, "calibration.combine.method"),
        ({"PPRAY_CALIBRATION__COMBINE__N_REFERENCE": "0"}, "calibration.combine.n_reference"),
        ({"PPRAY_CALIBRATION__SURVEYS__FLAT": ""}, "calibration.surveys.flat"),
    ],
)
def test_bad_calibration_settings_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(env=env)
