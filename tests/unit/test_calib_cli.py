"""``ppray calib`` without Ray: list, certify, and the errors ``run`` gives before starting Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from ppray.actors.cli import main

from ppray.calib.registry import CalibRegistry
from ppray.storage import Storage


def _fits(path: Path, shape: tuple[int, int] = (512, 512), value: float = 2.5) -> Path:
    fits.PrimaryHDU(np.full(shape, value, dtype=np.float32)).writeto(path)
    return path


def test_certify_then_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--output", str(tmp_path / "o")]
    image = _fits(tmp_path / "bias.fits")
    args = ["calib", "certify", *out, "--kind", "bias", "--detector", "R22_S10"]
    assert (
        main(
            [
                *args,
                "--file",
                str(image),
                "--valid-from",
                "2026-01-01T00:00:00",
                "--valid-to",
                "2026-02-01",
                "--calib-id",
                "bias-imported",
            ]
        )
        == 0
    )
    assert "bias-imported" in capsys.readouterr().out
    registry = CalibRegistry(Storage(str(tmp_path / "o" / "calib")), "Synthetic")
    (record,) = registry.records()
    assert (record.kind, record.detector, record.valid_to is not None) == ("bias", "R22_S10", True)
    assert main(["calib", "list", *out]) == 0
    listed = capsys.readouterr().out
    assert "bias-imported" in listed and "2026-01-01T00:00:00" in listed
    assert "1 certified calibrations" in listed
    assert main(["calib", "list", *out, "--kind", "dark"]) == 0
    assert "no certified calibrations" in capsys.readouterr().out
    assert main(["calib", "list", *out, "--valid-at", "2026-03-01"]) == 0
    assert "no certified calibrations" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kind", "bias", "--detector", "R99_S99"], "no detector 'R99_S99'"),
        (["--kind", "flat", "--detector", "R22_S00"], "band"),
        (["--kind", "bias", "--detector", "R22_S00", "--valid-from", "soon"], "ISO 8601"),
    ],
)
def test_certify_refuses_bad_input_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    image = _fits(tmp_path / "m.fits")
    code = main(["calib", "certify", "--output", str(tmp_path), "--file", str(image), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_certify_refuses_a_wrong_shape_or_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = _fits(tmp_path / "small.fits", shape=(10, 10))
    base = [
        "calib",
        "certify",
        "--output",
        str(tmp_path),
        "--kind",
        "dark",
        "--detector",
        "R22_S00",
        "--file",
    ]
    assert main([*base, str(small)]) == 2
    assert "shape (10, 10)" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "none.fits")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kind", "dark"], "dark sequences need a master bias"),
        (["--kind", "flat"], "flat sequences need a master bias"),
        (["--kind", "flat", "--band", "q"], "--band 'q'"),
        (["--kind", "bias", "--exposures", "0"], "at least 1"),
        (["--kind", "all", "--valid-days", "-1"], "--valid-days"),
        (["--kind", "all", "--start", "tomorrow"], "ISO 8601"),
    ],
)
def test_run_refuses_what_cannot_work_before_starting_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    # The unit tests' fixture forbids ray.init: these must fail before it.
    assert main(["calib", "run", "--output", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
