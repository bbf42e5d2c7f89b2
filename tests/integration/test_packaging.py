"""The wheel carries ppray.actors (from actors/) and the configs, importable from anywhere."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_wheel_installs_ppray_actors_outside_the_repo(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("ppray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ppray/actors/worker.py" in names
    assert "ppray/_configs/instruments/lsstcam.yaml" in names
    # The packages' public APIs are loaded lazily from their stubs: no stub, no API.
    assert {
        f"ppray/{p}/__init__.pyi" for p in ("visit", "apdb", "alerts", "calib", "science")
    } <= set(names)
    assert not any(n.startswith("actors/") for n in names), "actors must not be top-level"
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import ppray.actors.runtime, ppray.instrument as i, ppray.actors as a;"
        "from ppray.science import measure_psf;"
        "print(a.__file__); print(len(i.load_instrument('lsstcam').detectors))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = ran.stdout.split()
    assert out[0].startswith(str(target)), out
    assert out[1] == "189"
