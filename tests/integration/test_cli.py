"""The CLI as a user runs it: ``ppray demo``, and ``ppray simulate`` feeding ``ppray run``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppray.storage import Storage

pytestmark = pytest.mark.integration

PPRAY = [sys.executable, "-m", "ppray.actors.cli"]


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run(
        [*PPRAY, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_demo_processes_three_visits_and_writes_catalogs(tmp_path: Path) -> None:
    out = run_cli(["demo", "--output", str(tmp_path / "demo")], cwd=tmp_path).stdout
    assert "Ray dashboard: http://127.0.0.1:" in out
    table = out[out.index("group") :].splitlines()[2:5]
    assert len(table) == 3
    for row in table:
        assert " 4/4 " in row
    store = Storage(str(tmp_path / "demo" / "out"))
    catalogs = store.list(suffix="sources.parquet")
    assert len(catalogs) == 3 * 4
    assert all(store.read_parquet(k).num_rows > 0 for k in catalogs)
    assert len(store.list(suffix="summary.json")) == 3
    # The alerts the demo wrote, as a user reads them back.
    n_alerts = sum(int(row.split()[-2]) for row in table)
    assert n_alerts > 0
    shown = run_cli(["alerts", str(tmp_path / "demo" / "out" / "alerts"), "--validate"], tmp_path)
    assert f"{n_alerts} alerts in 12 files" in shown.stdout
    assert f"{n_alerts} valid, 0 invalid" in shown.stdout


def test_simulate_then_run_from_directories(tmp_path: Path) -> None:
    cfg = ["--config", "configs/deployments/directory.yaml"]
    repo = Path(__file__).resolve().parents[2]
    root = ["--output", str(tmp_path / "o"), "--inbox", str(tmp_path / "inbox")]
    run_cli(["simulate", *cfg, *root, "--visits", "2"], cwd=repo)
    assert len(Storage(str(tmp_path / "inbox")).list(suffix=".json")) == 2
    # A malformed next_visit in the inbox is reported and does not stop the service.
    (tmp_path / "inbox" / "broken.json").write_text('{"groupId": "x"}')
    out = run_cli(["run", *cfg, *root, "--max-visits", "2", "--idle-exit-s", "60"], cwd=repo)
    assert "2 visits done" in out.stdout
    assert out.stdout.count("visit_done") == 2
    assert "broken.json" in out.stderr and "salIndex" in out.stderr
    store = Storage(str(tmp_path / "o" / "out"))
    assert len(store.list(suffix="sources.parquet")) == 2 * 4
    assert len(Storage(str(tmp_path / "inbox")).list("done", suffix=".json")) == 2
