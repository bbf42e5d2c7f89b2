"""Injected transients: the truth per visit, and that DIA recovers it from rendered images."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from scipy.spatial import cKDTree

from ppray.image import Exposure
from ppray.instrument import detector_wcs, load_instrument
from ppray.science.dia import detect_dia_sources
from ppray.sim.render import make_calibrations, render_detector
from ppray.sim.transients import (
    TRANSIENT_ID_OFFSET,
    TRANSIENT_SCHEMA,
    VISIT_TRUTH_SCHEMA,
    make_transients,
    science_catalog,
    template_catalog,
    transients_for_visit,
)

from .simdata import BORESIGHT, OBS, sky_catalog

RA, DEC, _ = BORESIGHT
RADIUS = 0.05


def _col(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_numpy(zero_copy_only=False))


@pytest.fixture(scope="module")
def transients() -> pa.Table:
    return make_transients(
        RA, DEC, RADIUS, n_new=5, n_variable=6, n_moving=4, seed=0, base_catalog=sky_catalog()
    )


def test_make_transients_is_deterministic_and_well_formed(transients: pa.Table) -> None:
    assert transients.schema == TRANSIENT_SCHEMA
    again = make_transients(
        RA, DEC, RADIUS, n_new=5, n_variable=6, n_moving=4, seed=0, base_catalog=sky_catalog()
    )
    assert again.equals(transients)
    other = make_transients(
        RA, DEC, RADIUS, n_new=5, n_variable=6, n_moving=4, seed=1, base_catalog=sky_catalog()
    )
    assert not np.array_equal(_col(other, "ra"), _col(transients, "ra"))
    kinds = list(_col(transients, "kind"))
    assert kinds == ["new"] * 5 + ["variable"] * 6 + ["moving"] * 4
    np.testing.assert_array_equal(_col(transients, "id"), TRANSIENT_ID_OFFSET + np.arange(15))
    # Half the variables are catalog stars, carrying the catalog's position and magnitudes.
    cat = sky_catalog()
    cid = _col(transients, "catalog_id")
    from_cat = np.flatnonzero(cid >= 0)
    assert from_cat.size == 3
    assert all(kinds[i] == "variable" for i in from_cat)
    for i in from_cat:
        row = int(cid[i])
        assert _col(cat, "id")[row] == cid[i]
        assert _col(transients, "ra")[i] == _col(cat, "ra")[row]
        assert _col(transients, "mag_g")[i] == _col(cat, "mag_g")[row]
    # Everything lies inside the cap.
    d = np.hypot((_col(transients, "ra") - RA) * math.cos(math.radians(DEC)),
                 _col(transients, "dec") - DEC)  # fmt: skip
    assert d.max() <= RADIUS * 1.0001


def test_moving_object_positions_and_trails(transients: pa.Table) -> None:
    start, exptime = 1800.0, 30.0
    rows, truth = transients_for_visit(transients, start, exptime, "r", pixel_scale_arcsec=0.2)
    assert truth.schema == VISIT_TRUTH_SCHEMA
    mov = np.flatnonzero(_col(truth, "kind") == "moving")
    t_mid_h = (start + exptime / 2) / 3600.0
    dec0 = _col(transients, "dec")[mov]
    ra_rate = _col(transients, "ra_rate_arcsec_per_hour")[mov]
    dec_rate = _col(transients, "dec_rate_arcsec_per_hour")[mov]
    np.testing.assert_allclose(
        _col(truth, "dec")[mov], dec0 + dec_rate * t_mid_h / 3600.0, rtol=0, atol=1e-12
    )
    expected_ra = _col(transients, "ra")[mov] + ra_rate * t_mid_h / 3600.0 / np.cos(
        np.radians(dec0)
    )
    np.testing.assert_allclose(_col(truth, "ra")[mov], expected_ra, rtol=0, atol=1e-12)
    speed = np.hypot(ra_rate, dec_rate)
    np.testing.assert_allclose(
        _col(truth, "trail_length_px")[mov], speed * exptime / 3600.0 / 0.2, rtol=1e-12
    )
    for i, t_id in zip(mov, _col(truth, "id")[mov], strict=True):
        sub = _col(rows, "id") == t_id
        n = int(sub.sum())
        length = _col(truth, "trail_length_px")[i]
        assert n == max(math.ceil(length / 0.5), 1)
        # The sub-points share the flux and are centred on the mid-exposure position.
        flux = (10 ** (-0.4 * _col(rows, "mag")[sub])).sum()
        assert flux == pytest.approx(10 ** (-0.4 * _col(truth, "mag")[i]), rel=1e-12)
        assert _col(rows, "ra")[sub].mean() == pytest.approx(_col(truth, "ra")[i], abs=1e-12)
        assert _col(rows, "dec")[sub].mean() == pytest.approx(_col(truth, "dec")[i], abs=1e-12)
        # End to end the sub-points span the trail less one slice.
        span = math.hypot(
            (_col(rows, "ra")[sub][-1] - _col(rows, "ra")[sub][0])
            * math.cos(math.radians(_col(transients, "dec")[i])),
            _col(rows, "dec")[sub][-1] - _col(rows, "dec")[sub][0],
        )  # fmt: skip
        assert span * 3600 / 0.2 == pytest.approx(length * (n - 1) / n, rel=1e-6)
    # Truth at another time moves on by rate x dt.
    _, later = transients_for_visit(transients, start + 3600.0, exptime, "r")
    np.testing.assert_allclose(_col(later, "dec")[mov] - _col(truth, "dec")[mov],
                               dec_rate / 3600.0, rtol=0, atol=1e-12)  # fmt: skip


def test_variable_and_new_flux_changes(transients: pa.Table) -> None:
    zp, exptime = 28.0, 30.0
    _, truth = transients_for_visit(transients, 0.0, exptime, "g", zero_point_mag=zp)
    kind = _col(truth, "kind")
    var, new = kind == "variable", kind == "new"
    base_g = _col(transients, "mag_g")
    np.testing.assert_allclose(_col(truth, "template_mag")[var], base_g[var])
    # Step variables: the visit magnitude is base + delta_mag in every visit.
    np.testing.assert_allclose(
        _col(truth, "mag")[var], base_g[var] + _col(transients, "delta_mag")[var], rtol=1e-12
    )
    flux = lambda m: 10 ** (-0.4 * (m - zp)) * exptime  # noqa: E731
    expected = flux(_col(truth, "mag")[var]) - flux(base_g[var])
    np.testing.assert_allclose(_col(truth, "delta_flux_e")[var], expected, rtol=1e-12)
    np.testing.assert_array_equal(_col(truth, "sign")[var], np.sign(expected))
    assert set(np.sign(expected)) == {-1.0, 1.0}  # both brighter and fainter ones
    assert np.isinf(_col(truth, "template_mag")[new]).all()
    np.testing.assert_allclose(_col(truth, "delta_flux_e")[new], flux(_col(truth, "mag")[new]))
    assert (_col(truth, "sign")[new] == 1).all()
    # Periodic variables follow their sinusoid at mid-exposure.
    periodic = make_transients(RA, DEC, RADIUS, n_new=0, n_variable=3, n_moving=0, seed=0,
                               period_range_s=(3600.0, 7200.0))  # fmt: skip
    _, pt = transients_for_visit(periodic, 100.0, exptime, "r")
    phase = 2 * math.pi * 115.0 / _col(periodic, "period_s") + _col(periodic, "phase_rad")
    np.testing.assert_allclose(
        _col(pt, "mag"), _col(periodic, "mag") + _col(periodic, "delta_mag") * np.sin(phase)
    )


def test_rendered_difference_recovers_transients() -> None:
    """Science and template rendered by the simulator: DIA finds what the truth says."""
    inst = load_instrument("synthetic")
    det = inst.detector("R22_S11")
    wcs = detector_wcs(inst, det, *BORESIGHT)
    ((ra_c, dec_c),) = wcs.all_pix2world([[255.5, 255.5]], 0)
    radius = 200 * 0.2 / 3600  # inside the detector, away from its edges
    base = sky_catalog()
    tr = make_transients(float(ra_c), float(dec_c), radius, n_new=6, n_variable=6, n_moving=3,
                         mag_range=(19.0, 20.5), seed=0, base_catalog=base,
                         rate_range_arcsec_per_hour=(300.0, 600.0))  # fmt: skip
    calibs = make_calibrations(inst, det, seed=0)
    sci_cat, truth = science_catalog(base, tr, 0.0, OBS.exptime_s, OBS.band)
    _, sci = render_detector(sci_cat, inst, det, wcs, OBS, calibs, seed=1, cosmic_rays=0)
    _, tmpl = render_detector(template_catalog(base, tr, OBS.band), inst, det, wcs, OBS,
                              calibs, seed=2, cosmic_rays=0)  # fmt: skip
    # An ideal subtraction: the expected images differ by the transients alone; noise
    # is that of both exposures.
    rng = np.random.default_rng(0)
    variance = (sci.image_e + tmpl.image_e).astype(np.float32)
    image = sci.image_e - tmpl.image_e + rng.standard_normal(variance.shape) * np.sqrt(variance)
    diff = Exposure(image.astype(np.float32), variance, np.zeros(variance.shape, np.uint32), wcs)
    found = detect_dia_sources(diff, sci.psf_sigma_px)
    tx, ty = wcs.all_world2pix(_col(truth, "ra"), _col(truth, "dec"), 0)
    dist, index = cKDTree(np.column_stack([_col(found, "x"), _col(found, "y")])).query(
        np.column_stack([tx, ty])
    )
    snr = np.abs(_col(truth, "delta_flux_e")) / np.sqrt(4 * math.pi * sci.psf_sigma_px**2
                                                         * 2 * sci.sky_e)  # fmt: skip
    expect = snr >= 10
    assert expect.sum() >= 10
    assert (dist[expect] < 1.5).all()
    i = index[expect]
    np.testing.assert_array_equal(_col(found, "isNegative")[i], _col(truth, "sign")[expect] < 0)
    fixed = expect & (_col(truth, "kind") != "moving")
    ratio = _col(found, "psfFlux")[index[fixed]] / _col(truth, "delta_flux_e")[fixed]
    np.testing.assert_allclose(ratio, 1.0, atol=0.15)
    moving = expect & (_col(truth, "kind") == "moving")
    assert _col(found, "isTrailed")[index[moving]].all()
    assert not _col(found, "isTrailed")[index[fixed]].any()
