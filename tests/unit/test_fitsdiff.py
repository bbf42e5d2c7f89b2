"""``ppray diff``: calibrated FITS images of any camera in, DIA sources and pictures out.

The images are written with astropy alone (``fitsdata.py``): standard WCS and
camera keywords, no ppray object, so the reader is tested against what a
camera's pipeline writes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from matplotlib.image import imread
from ppray.actors.cli import main

from ppray.fitsdiff import (
    DiffOptions,
    DiffProducts,
    FitsInputError,
    ImageOptions,
    dia_kinds,
    difference_exposures,
    difference_fits,
    grid_offset_px,
    read_image,
    read_reference_catalog,
    write_products,
)
from ppray.image import MaskBit

from .fitsdata import (
    CENTRE,
    GAIN,
    SCIENCE,
    ZERO_POINT,
    FitsPair,
    _expected_snr_flux,
    tan_header,
    write_pair,
)

TEMPLATE_OPTIONS = ImageOptions(hdu="SCI", weight_hdu="WHT")
REFCAT_COLUMNS = {"refcat_ra": "RAJ2000", "refcat_dec": "DEJ2000", "refcat_mag": "rmag"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> FitsPair:
    return write_pair(tmp_path_factory.mktemp("fitsdiff"))


@pytest.fixture(scope="module")
def products(pair: FitsPair) -> DiffProducts:
    options = DiffOptions(template=TEMPLATE_OPTIONS, refcat=pair.refcat, **REFCAT_COLUMNS)
    return difference_fits(pair.science, pair.template, options)


def _nearest(table: pa.Table, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each ``(x, y)``: the distance (px) to the nearest DIA source, and its row."""
    dx = table["x"].to_numpy()[None, :] - x[:, None]
    dy = table["y"].to_numpy()[None, :] - y[:, None]
    d = np.hypot(dx, dy)
    return d.min(axis=1), d.argmin(axis=1)


def test_finds_the_injected_transients_and_little_else(
    pair: FitsPair, products: DiffProducts
) -> None:
    dia = products.dia_sources
    assert dia.num_rows > 0
    distance, _ = _nearest(dia, pair.transient_x, pair.transient_y)
    bright = pair.transient_snr >= 10
    found = distance[bright] < 1.5
    assert found.mean() >= 0.9, (distance, pair.transient_snr)
    # On the sky too: the science's fitted WCS puts them where they were injected.
    ra, dec = dia["ra"].to_numpy(), dia["dec"].to_numpy()
    cos_dec = math.cos(math.radians(CENTRE[1]))
    sky = (
        np.hypot(
            (ra[None, :] - pair.transient_ra[:, None]) * cos_dec,
            dec[None, :] - pair.transient_dec[:, None],
        ).min(axis=1)
        * 3600.0
    )
    assert np.all(sky[bright][found] < 0.3), sky
    # Everything else is a false detection: stars, saturated stars and the NaN patch
    # must leave none, and 5 sigma noise peaks are rare on 512 x 512 px.
    x, y = dia["x"].to_numpy(), dia["y"].to_numpy()
    to_transient = np.hypot(
        x[:, None] - pair.transient_x[None, :], y[:, None] - pair.transient_y[None, :]
    ).min(axis=1)
    assert np.count_nonzero(to_transient > 3.0) <= 2, dia.to_pandas()
    assert set(dia_kinds(dia)) <= {"positive", "dipole", "trailed", "negative"}
    assert not np.any(dia["isNegative"].to_numpy()[to_transient <= 3.0])


def test_header_values_are_read_with_their_units(products: DiffProducts) -> None:
    sci, tmp = products.science_input, products.template_input
    assert (sci.gain.value, sci.gain.source) == (GAIN, "GAIN")
    assert (tmp.gain.value, tmp.gain.source) == (GAIN, "EGAIN")
    assert sci.saturation is not None and sci.saturation.source == "SATURATE"
    assert tmp.saturation is not None and tmp.saturation.source == "SATLEVEL"
    assert (sci.read_noise_e.source, tmp.read_noise_e.source) == ("RDNOISE", "READNOIS")
    # SEEING is in arcsec (1.5" at 0.4"/px); the template's FWHM card says [pix].
    assert sci.seeing_px.value == pytest.approx(SCIENCE["fwhm_px"], rel=1e-6)
    assert tmp.seeing_px.value == pytest.approx(3.0) and tmp.seeing_px.source.startswith("FWHM")
    assert sci.exptime_s.value == 60.0 and tmp.exptime_s.value == 240.0
    assert sci.pixel_scale_arcsec == pytest.approx(0.4, rel=1e-6)
    assert sci.variance_source == "model" and tmp.variance_source.startswith("weight HDU 2")
    # Variance planes agree with the noise the images show.
    assert sci.noise_ratio == pytest.approx(1.0, abs=0.08)
    assert tmp.noise_ratio == pytest.approx(1.0, abs=0.08)
    assert products.metrics["template_warped"] == 1.0
    assert products.metrics["template_coverage"] == 1.0
    # The science's three 15th-magnitude stars saturate; its NaN patch carries no data.
    mask = products.science.mask
    assert np.count_nonzero(mask & MaskBit.SAT) > 20
    assert np.all(mask[440:460, 470:490] & MaskBit.NO_DATA)
    assert products.psf.measured and products.psf.fwhm_arcsec == pytest.approx(1.5, rel=0.05)
    # Twice the template's exposure time per flux unit: the kernel scales it by 60/240.
    assert products.template_flux_scale == pytest.approx(0.25, rel=0.03)
    assert not any(f.startswith(("no_saturation", "variance_check")) for f in products.flags)


def test_calibrated_against_the_reference_catalogue(pair: FitsPair, products: DiffProducts) -> None:
    assert products.zero_point_mag == pytest.approx(ZERO_POINT, abs=0.02)
    astrometry = products.calibration.astrometry
    assert astrometry is not None and astrometry.ok and astrometry.rms_arcsec < 0.1
    assert not any(f.startswith("no_refcat") for f in products.flags)
    # Bright transients' magnitudes: the PSF flux on the difference, in science units.
    distance, row = _nearest(products.dia_sources, pair.transient_x, pair.transient_y)
    bright = (pair.transient_snr >= 30) & (distance < 1.5)
    assert np.count_nonzero(bright) >= 3
    measured = products.dia_sources["psfMag"].to_numpy()[row[bright]]
    true_flux = _expected_snr_flux(pair.transient_snr[bright])
    true_mag = ZERO_POINT - 2.5 * np.log10(true_flux / SCIENCE["exptime"])
    np.testing.assert_allclose(measured, true_mag, atol=0.1)


def test_outputs_are_written_and_the_png_opens(products: DiffProducts, tmp_path: Path) -> None:
    paths = write_products(products, tmp_path / "out", png=tmp_path / "out" / "diff.png")
    assert set(paths) == {"dia_sources", "sources", "difference", "png", "summary"}
    dia = pq.read_table(paths["dia_sources"])
    assert dia.num_rows == products.dia_sources.num_rows
    assert {"ra", "dec", "psfFlux", "snr", "isDipole", "psfMag"} <= set(dia.column_names)
    assert pq.read_table(paths["sources"]).num_rows == products.sources.num_rows
    with fits.open(paths["difference"]) as hdul:
        assert [h.name for h in hdul[1:]] == ["IMAGE", "VARIANCE", "MASK"]
        for hdu in hdul[1:]:
            assert hdu.data.shape == SCIENCE["shape"]
            assert WCS(hdu.header).has_celestial
        assert hdul[0].header["SCIFILE"] == "science.fits[0]"
        assert hdul[0].header["MAGZP"] == pytest.approx(ZERO_POINT, abs=0.02)
        np.testing.assert_array_equal(hdul["MASK"].data, products.difference.mask)
    image = imread(paths["png"])
    assert image.shape[:2] == (900, 1600)
    assert image[..., :3].std() > 0.05  # drawn, not blank
    summary = json.loads(paths["summary"].read_text())
    assert summary["n_dia_sources"] == dia.num_rows
    assert summary["science"]["gain_e_per_unit"] == [GAIN, "GAIN"]
    for step in ("read", "cosmic_rays", "psf", "astrometry", "warp", "subtract", "dia", "png"):
        assert summary["timings_s"][step] >= 0.0, step


def test_the_command_line_end_to_end(pair: FitsPair, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    # One thread: OpenMP's spinning threads, on a machine others share, cost 10x.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppray.actors.cli",
            "diff",
            str(pair.science),
            str(pair.template),
            "--template-hdu",
            "SCI",
            "--template-weight-hdu",
            "WHT",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "DIA sources: " in text and "positive" in text and "dipole" in text
    assert "PSF FWHM 3.7" in text or "PSF FWHM 3.8" in text
    assert "not calibrated: no_refcat" in text
    assert "times (s): read" in text and "subtract" in text
    for name in ("diaSources.parquet", "difference.fits", "diff.png", "summary.json"):
        assert (out / name).is_file(), name
        assert str(out / name) in text
    assert imread(out / "diff.png").shape[:2] == (900, 1600)
    n = int(text.split("DIA sources: ")[1].split()[0])
    assert n == pq.read_table(out / "diaSources.parquet").num_rows >= 8


def test_a_template_on_the_same_grid_is_not_warped(pair: FitsPair, tmp_path: Path) -> None:
    science = read_image(pair.science)
    products = difference_exposures(
        science, read_image(pair.science), DiffOptions(template_cosmic_rays=False)
    )
    assert products.metrics["template_warped"] == 0.0
    # The science minus itself: nothing changed.
    assert products.dia_sources.num_rows == 0
    assert any(f.startswith("no_refcat") for f in products.flags)
    assert products.zero_point_mag is None
    paths = write_products(products, tmp_path, png=tmp_path / "empty.png")
    assert imread(paths["png"]).shape[:2] == (900, 1600)
    assert pq.read_table(paths["dia_sources"]).num_rows == 0


def test_seeing_measured_when_the_header_has_none(pair: FitsPair, tmp_path: Path) -> None:
    with fits.open(pair.science) as hdul:
        del hdul[0].header["SEEING"]
        hdul.writeto(tmp_path / "noseeing.fits")
    seeing = read_image(tmp_path / "noseeing.fits").seeing_px
    assert seeing.source == "measured on the image"
    assert seeing.value == pytest.approx(SCIENCE["fwhm_px"], rel=0.15)


def test_grid_offset_ignores_how_the_header_writes_the_wcs() -> None:
    header = tan_header((100, 120), *CENTRE, rotation_deg=10.0)
    wcs = WCS(header)
    pc_header = header.copy()
    cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        del pc_header[key]
    scale = 0.4 / 3600.0
    pc_header["CDELT1"], pc_header["CDELT2"] = scale, scale
    pc = cd / scale
    pc_header["PC1_1"], pc_header["PC1_2"] = pc[0, 0], pc[0, 1]
    pc_header["PC2_1"], pc_header["PC2_2"] = pc[1, 0], pc[1, 1]
    assert grid_offset_px(WCS(pc_header), wcs, (100, 120)) < 1e-6
    shifted = header.copy()
    shifted["CRPIX1"] += 1.0
    assert grid_offset_px(WCS(shifted), wcs, (100, 120)) == pytest.approx(1.0, abs=1e-6)


def _write(
    path: Path, data: np.ndarray, header: fits.Header | None = None, **cards: object
) -> Path:
    hdu = fits.PrimaryHDU(data.astype(np.float32), header=header)
    for key, value in cards.items():
        hdu.header[key] = value
    hdu.writeto(path, overwrite=True)
    return path


def test_variance_from_the_ccd_noise_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shape = (96, 128)
    gain, rn, sky_adu = 2.0, 4.0, 1000.0
    data = sky_adu + rng.normal(0.0, math.sqrt(sky_adu / gain + (rn / gain) ** 2), shape)
    data[10, 10] = 70000.0
    data[20:22, 30:33] = np.nan
    path = _write(
        tmp_path / "img.fits",
        data,
        tan_header(shape, *CENTRE),
        GAIN=gain,
        SATURATE=65000.0,
        RDNOISE=rn,
        EXPTIME=30.0,
        SEEING=1.2,
    )
    image = read_image(path)
    exposure = image.exposure
    good = np.isfinite(data)
    np.testing.assert_allclose(exposure.image[good], gain * data[good], rtol=1e-6)
    # (max(image, 0) + sky) / gain + (rn / gain)² in ADU², times gain² for electrons;
    # the image still holds its sky, so none is added.
    expected = (np.maximum(data, 0) / gain + (rn / gain) ** 2) * gain**2
    np.testing.assert_allclose(exposure.variance[good], expected[good], rtol=1e-5)
    assert exposure.mask[10, 10] & MaskBit.SAT
    assert np.all(exposure.mask[20:22, 30:33] & MaskBit.NO_DATA)
    assert np.all(exposure.image[20:22, 30:33] == 0) and np.all(
        np.isinf(exposure.variance[20:22, 30:33])
    )
    assert image.noise_ratio == pytest.approx(1.0, abs=0.05)
    assert not image.notes  # every value came from the header
    assert image.seeing_px.value == pytest.approx(3.0, rel=1e-6)  # 1.2" at 0.4"/px

    # Given the sky already subtracted, it comes back into the variance...
    path = _write(
        tmp_path / "sub.fits", data - sky_adu, tan_header(shape, *CENTRE), GAIN=gain, RDNOISE=rn
    )
    given = read_image(path, ImageOptions(sky=sky_adu))
    expected = (np.maximum(data - sky_adu, 0) + sky_adu) * gain + rn**2
    np.testing.assert_allclose(given.exposure.variance[good], expected[good], rtol=1e-5)
    assert any(f.startswith("no_saturation_level") for f in given.flags)
    # ... and without it the image's own noise says how much was subtracted.
    guessed = read_image(path)
    assert any("looks sky-subtracted" in n for n in guessed.notes)
    assert guessed.noise_ratio == pytest.approx(1.0, abs=0.05)


def test_gain_from_bunit_and_options(tmp_path: Path) -> None:
    shape = (80, 80)
    rng = np.random.default_rng(1)
    data = rng.normal(100.0, 10.0, shape)
    header = tan_header(shape, *CENTRE)
    # In electrons: the raw ADU's CCDGAIN does not apply.
    path = _write(tmp_path / "e.fits", data, header, BUNIT="electron", CCDGAIN=1.5)
    assert read_image(path).gain.value == 1.0
    path = _write(tmp_path / "eps.fits", data, header, BUNIT="ELECTRONS/S", EXPTIME=400.0)
    rate = read_image(path)
    assert (rate.gain.value, rate.exptime_s.value) == (400.0, 400.0)
    path = _write(tmp_path / "adu.fits", data, header, GAIN=0.0, EGAIN=3.0)  # 0: unknown
    assert read_image(path).gain.source == "EGAIN"
    assert read_image(path, ImageOptions(gain=7.0)).gain.value == 7.0
    # A template without a gain takes the science's option.
    bare = _write(tmp_path / "bare.fits", data, header)
    template = read_image(bare, role="template", defaults=ImageOptions(gain=2.5))
    assert (template.gain.value, template.gain.source) == (2.5, "option (science)")


def _error(call: object) -> str:
    with pytest.raises(FitsInputError) as info:
        call()  # type: ignore[operator]
    return str(info.value)


def test_clear_errors_say_which_file_and_what_to_pass(tmp_path: Path, pair: FitsPair) -> None:
    shape = (80, 80)
    data = np.full(shape, 100.0)
    header = tan_header(shape, *CENTRE)
    no_gain = _write(tmp_path / "science.fits", data, header)
    message = _error(lambda: read_image(no_gain))
    assert message.startswith("science.fits[0]: no gain (tried GAIN, EGAIN, CCDGAIN, BUNIT")
    assert "pass --gain E_PER_ADU" in message
    message = _error(lambda: read_image(no_gain, role="template"))
    assert "--template-gain E_PER_ADU" in message

    no_wcs = _write(tmp_path / "nowcs.fits", data, None, GAIN=1.0)
    message = _error(lambda: read_image(no_wcs))
    assert message.startswith("nowcs.fits[0]: no WCS") and "solve-field" in message
    linear = fits.Header({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR"})
    flat = _write(tmp_path / "linear.fits", data, linear, GAIN=1.0)
    assert "not celestial (CTYPE1='LINEAR'" in _error(lambda: read_image(flat))

    message = _error(lambda: read_image(pair.template, ImageOptions(hdu="NOPE")))
    assert message.startswith("template.fits: no HDU named 'NOPE'")
    assert "1 SCI (560x560)" in message and "2 WHT" in message and "--science-hdu" in message
    assert "no HDU 7" in _error(lambda: read_image(pair.template, ImageOptions(hdu=7)))
    message = _error(lambda: read_image(pair.science, ImageOptions(weight_hdu="WHT")))
    assert message.startswith("science.fits: no HDU named 'WHT'")
    assert "--science-weight-hdu" in message
    cube = _write(tmp_path / "cube.fits", np.ones((3, 80, 80)), header, GAIN=1.0)
    assert "no HDU with 2-D image data" in _error(lambda: read_image(cube))
    assert "no such file" in _error(lambda: read_image(tmp_path / "missing.fits"))

    far_header = tan_header(shape, CENTRE[0] + 10.0, CENTRE[1])
    far = _write(
        tmp_path / "far.fits", np.random.default_rng(2).normal(100, 10, shape), far_header, GAIN=1.0
    )
    near = _write(
        tmp_path / "near.fits", np.random.default_rng(3).normal(100, 10, shape), header, GAIN=1.0
    )
    message = _error(lambda: difference_fits(near, far))
    assert message.startswith("near.fits[0] and far.fits[0] do not overlap")
    assert "9.993 deg apart" in message


def test_plane_shapes_must_match(tmp_path: Path) -> None:
    shape = (80, 80)
    path = tmp_path / "planes.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(np.full(shape, 100.0, np.float32), header=tan_header(shape, *CENTRE)),
            fits.ImageHDU(np.ones((80, 81), np.float32), name="VAR"),
        ]
    ).writeto(path)
    message = _error(lambda: read_image(path, ImageOptions(gain=1.0, variance_hdu="VAR")))
    assert message.startswith("planes.fits[1]: the variance plane has shape (80, 81)")
    assert "(80, 80)" in message


def test_reference_catalogue_columns(tmp_path: Path) -> None:
    csv = tmp_path / "ref.csv"
    csv.write_text("RA,DEC,g\n150.0,2.2,18.0\n150.01,2.21,nan\n")
    table = read_reference_catalog(csv, ra="ra", dec="dec", mag="G")
    assert table.column_names == ["id", "ra", "dec", "mag"] and table.num_rows == 1
    message = _error(lambda: read_reference_catalog(csv, mag="rmag"))
    assert "no column 'rmag' (columns: RA, DEC, g); pass --refcat-mag NAME" in message
    path = tmp_path / "ref.parquet"
    pq.write_table(pa.table({"ra": [1.0], "dec": [2.0], "mag": [3.0]}), path)
    assert read_reference_catalog(path).num_rows == 1


def test_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shape = (80, 80)
    science = _write(tmp_path / "science.fits", np.full(shape, 100.0), tan_header(shape, *CENTRE))
    code = main(["diff", str(science), str(science), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0
    assert err.startswith("ppray: error: science.fits[0]: no gain (tried GAIN, EGAIN, CCDGAIN")
    assert "--gain E_PER_ADU" in err
    code = main(["diff", str(science), str(science), "--gain", "-1"])
    assert code == 2 and "gain must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
