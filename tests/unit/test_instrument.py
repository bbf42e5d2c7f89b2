from __future__ import annotations

import numpy as np
import pytest

from ppray.instrument import detector_wcs, list_instruments, load_instrument


def test_shipped_instruments() -> None:
    assert set(list_instruments()) >= {"lsstcam", "lsstcomcam", "latiss", "synthetic"}
    cam = load_instrument("lsstcam")
    assert len(cam.detectors) == 189
    assert [d.id for d in cam.detectors] == list(range(189))
    assert cam.detectors[0].name == "R01_S00"
    assert cam.detectors[188].name == "R43_S22"
    assert cam.detector("R22_S11").id == 94
    assert len(cam.detectors[0].amplifiers) == 16
    assert (cam.layout.nx, cam.layout.ny, cam.pixel_scale_arcsec) == (4072, 4000, 0.2)
    assert len(load_instrument("lsstcomcam").detectors) == 9
    assert len(load_instrument("latiss").detectors) == 1
    syn = load_instrument("synthetic")
    assert len(syn.detectors) == 4 and syn.layout.nx == 512
    assert len(syn.detectors[0].amplifiers) == 4


def test_amplifiers_tile_the_detector() -> None:
    cam = load_instrument("lsstcam")
    cover = np.zeros((cam.layout.ny, cam.layout.nx), dtype=int)
    for amp in cam.detectors[0].amplifiers:
        cover[amp.slices] += 1
    assert (cover == 1).all()


def test_unknown_instrument_and_detector() -> None:
    with pytest.raises(ValueError, match="known: "):
        load_instrument("hsc")
    with pytest.raises(KeyError, match="R99_S99"):
        load_instrument("lsstcam").detector("R99_S99")


def test_center_detector_wcs_points_at_boresight() -> None:
    cam = load_instrument("lsstcam")
    det = cam.detector("R22_S11")
    wcs = detector_wcs(cam, det, 150.0, -30.0, 0.0)
    ra, dec = wcs.all_pix2world([(cam.layout.nx - 1) / 2], [(cam.layout.ny - 1) / 2], 0)
    assert ra[0] == pytest.approx(150.0, abs=1e-9)
    assert dec[0] == pytest.approx(-30.0, abs=1e-9)
    scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600
    assert scale == pytest.approx(0.2, rel=1e-9)


def test_footprint_follows_focal_plane_position_and_rotation() -> None:
    cam = load_instrument("lsstcam")
    det = cam.detector("R22_S12")  # one sensor pitch (+x) from the centre
    offset_deg = det.fp_x_mm * cam.mm_to_px * cam.pixel_scale_arcsec / 3600
    cx, cy = (cam.layout.nx - 1) / 2, (cam.layout.ny - 1) / 2
    for rot, (dra_sign, ddec_sign) in {0.0: (-1, 0), 90.0: (0, 1)}.items():
        wcs = detector_wcs(cam, det, 10.0, 0.0, rot)
        ra, dec = wcs.all_pix2world([cx], [cy], 0)
        assert (ra[0] - 10.0) == pytest.approx(dra_sign * offset_deg, abs=1e-4)
        assert dec[0] == pytest.approx(ddec_sign * offset_deg, abs=1e-4)
