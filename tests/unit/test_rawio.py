"""Raw FITS files: round trip, section keywords, and every kind of bad input."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from numpy.testing import assert_array_equal

from ppray.errors import NonRetriableError
from ppray.rawio import read_raw, write_raw

from .simdata import simulate


@pytest.fixture(scope="module")
def raw_bytes() -> bytes:
    sim = simulate()
    return write_raw(sim.segments, sim.header, sim.instrument, sim.detector)


def _rewrite(data: bytes, edit: Callable[[fits.HDUList], Any]) -> bytes:
    with fits.open(io.BytesIO(data), memmap=False) as hdul:
        hdul = fits.HDUList([hdu.copy() for hdu in hdul])
    out = edit(hdul)
    hdul = out if isinstance(out, fits.HDUList) else hdul
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def test_round_trip_is_exact(raw_bytes: bytes) -> None:
    sim = simulate()
    raw = read_raw(raw_bytes, sim.instrument, sim.detector)
    assert set(raw.segments) == {a.name for a in sim.detector.amplifiers}
    for name, seg in raw.segments.items():
        assert seg.dtype == np.float32
        assert seg.shape == sim.instrument.layout.raw_amp_shape
        assert_array_equal(seg, sim.segments[name])
    for key, value in sim.header.items():
        assert raw.header[key] == value, key
    assert raw.exptime_s == sim.obs.exptime_s


def test_amplifier_headers_describe_the_layout(raw_bytes: bytes) -> None:
    with fits.open(io.BytesIO(raw_bytes)) as hdul:
        assert hdul[0].data is None
        names = [hdu.name for hdu in hdul[1:]]
        assert names == ["C00", "C01", "C10", "C11"]
        c01 = hdul["C01"].header
        assert hdul["C01"].data.dtype.kind == "i" and hdul["C01"].data.dtype.itemsize == 4
        assert c01["DATASEC"] == "[4:259,1:256]"
        assert c01["BIASSEC"] == "[260:291,1:256]"
        assert c01["PRESEC"] == "[1:3,1:256]"
        assert c01["DETSEC"] == "[257:512,1:256]"
        assert hdul["C10"].header["DETSEC"] == "[1:256,257:512]"
        assert c01["GAIN"] == 1.6 and c01["RDNOISE"] == 6.0


def test_long_keys_non_scalars_and_nan_segments_survive() -> None:
    sim = simulate()
    header = dict(sim.header, LONGKEYWORD=3, TAGS=["a", "b"])
    segments = dict(sim.segments)
    segments["C11"] = np.full_like(sim.segments["C11"], np.nan)
    raw = read_raw(
        write_raw(segments, header, sim.instrument, sim.detector), sim.instrument, sim.detector
    )
    assert raw.header["LONGKEYWORD"] == 3
    assert raw.header["TAGS"] == "['a', 'b']"
    assert np.isnan(raw.segments["C11"]).all()
    assert_array_equal(raw.segments["C00"], sim.segments["C00"])


def test_write_refuses_an_incomplete_raw() -> None:
    sim = simulate()
    segments = {k: v for k, v in sim.segments.items() if k != "C10"}
    with pytest.raises(ValueError, match="C10"):
        write_raw(segments, sim.header, sim.instrument, sim.detector)
    segments = dict(sim.segments, C10=sim.segments["C10"][:-1])
    with pytest.raises(ValueError, match=r"C10 has shape \(271, 291\)"):
        write_raw(segments, sim.header, sim.instrument, sim.detector)


def _drop_amp(hdul: fits.HDUList) -> None:
    del hdul["C01"]


def _short_amp(hdul: fits.HDUList) -> None:
    hdul["C01"].data = hdul["C01"].data[:-2]


def _set_header(key: str, value: Any) -> Callable[[fits.HDUList], None]:
    def edit(hdul: fits.HDUList) -> None:
        hdul[0].header[key] = value

    return edit


def _del_header(key: str) -> Callable[[fits.HDUList], None]:
    def edit(hdul: fits.HDUList) -> None:
        del hdul[0].header[key]

    return edit


def _empty_amp(hdul: fits.HDUList) -> None:
    hdul["C11"].data = None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_amp, r"amplifier C01: extension missing"),
        (_short_amp, r"amplifier C01: shape \(270, 291\), expected \(272, 291\)"),
        (_empty_amp, r"amplifier C11: extension has no data"),
        (_set_header("DETNAME", "R22_S00"), r"DETNAME is 'R22_S00', expected 'R22_S11'"),
        (_del_header("DETNAME"), r"no DETNAME"),
        (_set_header("INSTRUME", "LSSTCam"), r"INSTRUME is 'LSSTCam'"),
        (_del_header("EXPTIME"), r"no EXPTIME"),
        (_set_header("EXPTIME", "thirty"), r"EXPTIME is 'thirty'"),
        (_set_header("EXPTIME", -1.0), r"EXPTIME is -1.0"),
        (_set_header("DARKTIME", "x"), r"DARKTIME is 'x'"),
    ],
)
def test_bad_content_is_non_retriable(
    raw_bytes: bytes, edit: Callable[[fits.HDUList], Any], message: str
) -> None:
    sim = simulate()
    bad = _rewrite(raw_bytes, edit)
    with pytest.raises(NonRetriableError, match=message) as info:
        read_raw(bad, sim.instrument, sim.detector)
    assert "raw for R22_S11" in str(info.value)
    assert not info.value.retriable


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b"", "empty file"),
        (lambda b: b"this is not a FITS file at all" * 200, "not a valid FITS file"),
        (lambda b: b[: len(b) // 2], "not a valid FITS file"),
        (lambda b: b[:2000], "not a valid FITS file|extension missing"),
    ],
    ids=["empty", "garbage", "truncated-data", "header-only"],
)
def test_corrupt_bytes_are_non_retriable(
    raw_bytes: bytes, mangle: Callable[[bytes], bytes], message: str
) -> None:
    sim = simulate()
    with pytest.raises(NonRetriableError, match=message):
        read_raw(mangle(raw_bytes), sim.instrument, sim.detector)


def test_reading_for_another_detector_is_rejected(raw_bytes: bytes) -> None:
    sim = simulate()
    other = sim.instrument.detector("R22_S01")
    with pytest.raises(NonRetriableError, match="expected 'R22_S01'"):
        read_raw(raw_bytes, sim.instrument, other)
