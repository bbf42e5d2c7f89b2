"""Alert packets: schema validity, Avro round trips, cutouts with WCS, sinks."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from fastavro.validation import ValidationError, validate
from lsst.alert.packet import Schema
from numpy.testing import assert_allclose

from ppray.alerts.diasource import dia_source_table
from ppray.alerts.forced import forced_photometry, psf_fluxes
from ppray.alerts.packet import (
    AlertBatch,
    CutoutMaker,
    build_alerts,
    deserialize_alert,
    serialize_alert,
    serialize_alerts,
)
from ppray.alerts.sinks import AlertSink, FileAlertSink, InMemoryAlertSink, read_alert_file
from ppray.apdb.shard import ApdbShard
from ppray.image import Exposure
from ppray.schema import load_alert_schema
from ppray.science.dia import detect_dia_sources

from .simdata_apdb import render, tan_wcs, visit_info

SIGMA = 1.6
SHAPE = (150, 170)


@dataclass
class Visit:
    alerts: list[dict[str, Any]]
    batch: AlertBatch
    difference: Exposure
    science: Exposure
    template: Exposure
    njy: float
    truth: np.ndarray  # x, y, science flux (e-) of each variable star


def _process(shard: ApdbShard, k: int, wcs: WCS) -> Visit:
    """One visit of a field with variable stars: render, detect, associate, force, alert."""
    rng = np.random.default_rng(100)
    x = np.array([20.0, 60.3, 100.7, 140.2, 30.5, 8.0])
    y = np.array([20.0, 80.6, 40.2, 120.9, 130.1, 75.0])
    base = rng.uniform(2000, 4000, x.size)
    change = np.array([1500.0, -1800.0, 2500.0, 1200.0, 3000.0, 2000.0]) * (1 + 0.3 * k)
    template = render(SHAPE, x, y, base, SIGMA, sky_var=200.0, seed=10 * k + 1, wcs=wcs)
    science = render(SHAPE, x, y, base + change, SIGMA, sky_var=400.0, seed=10 * k + 2, wcs=wcs)
    difference = render(SHAPE, x, y, change, SIGMA, sky_var=600.0, seed=10 * k + 3, wcs=wcs)
    info = visit_info(k, detector=42, band="g")
    dia = detect_dia_sources(difference, SIGMA)
    sx = dia["x"].to_numpy()
    sy = dia["y"].to_numpy()
    science_flux = psf_fluxes(science, sx, sy, SIGMA)
    rows = dia_source_table(dia, info, wcs=wcs, science_flux=science_flux)
    res = shard.associate(rows)
    forced = forced_photometry(
        shard.snapshot().dia_objects, info, difference=difference, science=science, psf=SIGMA
    )
    shard.record_forced(forced)
    njy = info.njy_per_electron
    assert njy is not None
    objects = shard.snapshot().dia_objects
    batch = AlertBatch(
        res.dia_sources,
        objects,
        res.prv_dia_sources,
        res.prv_dia_forced_sources,
        difference=difference,
        science=science,
        template=template,
        njy_per_electron=njy,
        observation_reason="test",
    )
    truth = np.stack([x, y, base + change])
    return Visit(batch.records(), batch, difference, science, template, njy, truth)


@pytest.fixture(scope="module")
def visits() -> list[Visit]:
    shard = ApdbShard()
    wcs = tan_wcs(210.0, -35.0, SHAPE)
    return [_process(shard, k, wcs) for k in range(3)]


def test_every_alert_validates(visits: list[Visit]) -> None:
    schema = load_alert_schema()
    packet = Schema.from_file()  # the package's own loader and serializer
    assert packet == schema.packet
    n = 0
    for visit in visits:
        assert len(visit.alerts) == 6
        for alert in visit.alerts:
            assert validate(alert, schema.definition, raise_errors=True)
            data = serialize_alert(alert)
            assert data == packet.serialize(alert)
            back = packet.deserialize(data)
            assert back["diaSourceId"] == alert["diaSourceId"]
            assert back["diaSource"] == alert["diaSource"]
            assert back["cutoutScience"] == alert["cutoutScience"]
            n += 1
    assert n == 18


def test_columnar_serialization_matches_fastavro(visits: list[Visit]) -> None:
    for visit in visits:
        expect = [serialize_alert(a) for a in visit.alerts]
        assert visit.batch.serialized() == expect
        framed = visit.batch.serialized(confluent=True, schema_id=7)
        assert framed == [b"\x00" + (7).to_bytes(4, "big") + e for e in expect]
    # The functional forms say the same, with and without cutouts and history.
    b = visits[1].batch
    plain = build_alerts(b.dia_sources, b.dia_objects)
    assert serialize_alerts(b.dia_sources, b.dia_objects) == [serialize_alert(a) for a in plain]
    assert all(a["cutoutScience"] is None and a["prvDiaSources"] is None for a in plain)
    with pytest.raises(ValueError, match="not among dia_objects"):
        build_alerts(b.dia_sources, b.dia_objects.slice(0, 1))


def test_alert_contents(visits: list[Visit]) -> None:
    last = visits[-1]
    for alert in last.alerts:
        src, obj = alert["diaSource"], alert["diaObject"]
        assert alert["diaSourceId"] == src["diaSourceId"]
        assert src["diaObjectId"] == obj["diaObjectId"]
        assert obj["nDiaSources"] == 3  # seen in all three visits
        assert [s["visit"] for s in alert["prvDiaSources"]] == [visit_info(k).visit for k in (0, 1)]
        assert len(alert["prvDiaForcedSources"]) == 2
        assert obj["g_fpFluxMean"] is not None and obj["g_psfFluxNdata"] == 3
        assert alert["ssSource"] is None and alert["mpc_orbits"] is None
        assert alert["observation_reason"] == "test"
        assert src["band"] == "g" and src["detector"] == 42
        # scienceFlux: forced photometry on the science image (template + change), nJy.
        k = np.argmin(np.hypot(last.truth[0] - src["x"], last.truth[1] - src["y"]))
        expect = last.truth[2, k] * last.njy
        assert abs(src["scienceFlux"] - expect) < 5 * src["scienceFluxErr"]
    # The first visit's alerts have no history.
    assert all(a["prvDiaSources"] is None for a in visits[0].alerts)


def test_alert_rejects_bad_values(visits: list[Visit]) -> None:
    alert = dict(visits[0].alerts[0])
    alert["diaSource"] = {**alert["diaSource"], "ra": None}
    with pytest.raises(ValidationError, match="ra"):
        validate(alert, load_alert_schema().definition, raise_errors=True)


def test_confluent_wire_format(visits: list[Visit]) -> None:
    alert = visits[1].alerts[0]
    schema = load_alert_schema()
    bare = serialize_alert(alert)
    framed = serialize_alert(alert, confluent=True)
    assert framed[:1] == b"\x00"
    assert int.from_bytes(framed[1:5], "big") == schema.schema_id == 1101
    assert framed[5:] == bare
    for data in (bare, framed):
        assert deserialize_alert(data) == alert
    assert deserialize_alert(framed, confluent=True) == alert
    with pytest.raises(ValueError, match="no Confluent"):
        deserialize_alert(bare, confluent=True)
    with pytest.raises(ValueError, match="schema id 4242"):
        deserialize_alert(b"\x00" + (4242).to_bytes(4, "big") + bare, confluent=True)


def test_cutouts_carry_pixels_and_wcs(visits: list[Visit]) -> None:
    visit = visits[2]
    wcs = visit.science.wcs
    assert wcs is not None
    for alert in visit.alerts:
        src = alert["diaSource"]
        for name, exposure in (
            ("cutoutDifference", visit.difference),
            ("cutoutScience", visit.science),
            ("cutoutTemplate", visit.template),
        ):
            with fits.open(io.BytesIO(alert[name])) as hdul:
                data = hdul[0].data
                header = hdul[0].header
            assert data.shape == (30, 30) and data.dtype.kind == "f"
            assert header["BUNIT"] == "nJy"
            x0, y0 = -int(header["LTV1"]), -int(header["LTV2"])
            assert abs(x0 + 15 - src["x"]) <= 0.5 and abs(y0 + 15 - src["y"]) <= 0.5
            ny, nx = exposure.shape
            ys, xs = slice(max(y0, 0), min(y0 + 30, ny)), slice(max(x0, 0), min(x0 + 30, nx))
            part = data[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
            assert_allclose(part, exposure.image[ys, xs] * np.float32(visit.njy), rtol=1e-6)
            assert np.isnan(data).sum() == 900 - part.size  # off-image pixels are NaN
            cut = WCS(header)
            px, py = np.array([0.0, 29.0, 13.3]), np.array([0.0, 7.0, 29.0])
            sky_cut = cut.all_pix2world(px, py, 0)
            sky_full = wcs.all_pix2world(px + x0, py + y0, 0)
            assert_allclose(sky_cut, sky_full, atol=1e-9)


def test_cutout_maker_without_wcs() -> None:
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    exp = Exposure(image, np.ones_like(image), np.zeros((10, 10), np.uint32))
    with fits.open(io.BytesIO(CutoutMaker(exp, size=4)(4.4, 5.6))) as hdul:
        assert hdul[0].header["BUNIT"] == "electron"
        assert_allclose(hdul[0].data, image[4:8, 2:6])


@pytest.mark.parametrize("confluent", [False, True])
def test_file_sink(tmp_path: Path, visits: list[Visit], confluent: bool) -> None:
    alerts = visits[1].alerts
    sink = FileAlertSink(str(tmp_path))
    assert isinstance(sink, AlertSink)
    payload = [serialize_alert(a, confluent=confluent) for a in alerts]
    uri = sink.write("LSSTCam/20260102/group/R22_S11", payload)
    path = tmp_path / "alerts/LSSTCam/20260102/group/R22_S11.avro"
    assert uri.endswith("R22_S11.avro") and path.exists()
    first = path.read_bytes()
    assert read_alert_file(first) == alerts
    with open(path, "rb") as fh:  # any Avro reader, with the embedded schema
        assert len(list(fastavro.reader(fh))) == len(alerts)
    sink.write("LSSTCam/20260102/group/R22_S11", alerts)  # dicts, and a rewrite
    assert path.read_bytes() == first
    assert sink.read("LSSTCam/20260102/group/R22_S11") == alerts
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.write("x", alerts)


def test_memory_sink(visits: list[Visit]) -> None:
    sink = InMemoryAlertSink()
    assert isinstance(sink, AlertSink)
    sink.write("v/1", [serialize_alert(a, confluent=True) for a in visits[0].alerts])
    sink.write("v/1", visits[0].alerts)  # a retry replaces
    sink.write("v/2", visits[1].alerts)
    assert sink.alerts == visits[0].alerts + visits[1].alerts
    sink.close()
    with pytest.raises(RuntimeError):
        sink.write("v/3", [])
