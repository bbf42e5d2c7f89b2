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
