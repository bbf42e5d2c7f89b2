"""A science and a template FITS file as a camera would write them: astropy only.

Nothing from ppray makes these files, so the reader is tested against plain
FITS: standard WCS keywords (``CTYPE``, ``CRVAL``, ``CRPIX``, ``CD``), counts in
ADU with ``GAIN``/``SATURATE``/``RDNOISE``/``SEEING`` (science) and
``EGAIN``/``SATLEVEL``/``READNOIS``/``FWHM`` in pixels (template), stars of a
pixel-integrated Gaussian PSF, Gaussian noise of the Poisson and read-noise
variance, and transients in the science only.

The science: 512 x 512, 0.4"/px, 60 s, seeing 1.5", sky not subtracted, a
20 x 20 patch of NaN, three stars bright enough to saturate. The template: 560 x 560
in its own primary-less layout (``SCI`` and an inverse-variance ``WHT``
extension), pointed 6" and 4" away and rotated 0.4 deg (so it is warped),
240 s deep, seeing 3 px (sharper: the template is the one convolved), sky
subtracted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

__all__ = ["FitsPair", "tan_header", "write_pair"]

PIXEL_SCALE_ARCSEC = 0.4
ZERO_POINT = 27.0  # AB mag of 1 e-/s
GAIN = 1.8  # e-/ADU
READ_NOISE_E = 5.0
SATURATION_ADU = 30000.0
SKY_E_PER_S = 30.0
SCIENCE = {"shape": (512, 512), "exptime": 60.0, "fwhm_px": 1.5 / PIXEL_SCALE_ARCSEC}
TEMPLATE = {"shape": (560, 560), "exptime": 240.0, "fwhm_px": 3.0}
CENTRE = (150.0, 2.2)
# Nominal S/N of the transients: from below the threshold to bright.
TRANSIENT_SNR = (6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 45.0, 70.0, 100.0)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def tan_header(
    shape: tuple[int, int], ra: float, dec: float, rotation_deg: float = 0.0
) -> fits.Header:
    """Standard TAN WCS cards: the reference pixel at the centre, north up, east left."""
    scale = PIXEL_SCALE_ARCSEC / 3600.0
    th = math.radians(rotation_deg)
    cd = np.array([[-scale, 0.0], [0.0, scale]]) @ np.array(
        [[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]
    )
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = ra, dec
    header["CRPIX1"], header["CRPIX2"] = (shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0
    header["CD1_1"], header["CD1_2"] = cd[0, 0], cd[0, 1]
    header["CD2_1"], header["CD2_2"] = cd[1, 0], cd[1, 1]
    return header


def _render(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm_px: float
) -> np.ndarray:
    """Pixel-integrated round Gaussians (sum ``flux`` each) at 0-based ``(x, y)``."""
    sigma = fwhm_px / FWHM_PER_SIGMA
    half = math.ceil(5 * sigma) + 1
    image = np.zeros(shape, dtype=np.float64)
    ny, nx = shape
    offsets = np.arange(-half, half + 1)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        cx, cy = round(xi), round(yi)
        ex = (np.arange(-half, half + 2) - 0.5 + cx - xi) / (math.sqrt(2) * sigma)
        ey = (np.arange(-half, half + 2) - 0.5 + cy - yi) / (math.sqrt(2) * sigma)
        px, py = 0.5 * np.diff(erf(ex)), 0.5 * np.diff(erf(ey))
        rows, cols = cy + offsets, cx + offsets
        ok_r, ok_c = (rows >= 0) & (rows < ny), (cols >= 0) & (cols < nx)
        if ok_r.any() and ok_c.any():
            image[np.ix_(rows[ok_r], cols[ok_c])] += fi * np.outer(py[ok_r], px[ok_c])
    return image


@dataclass(frozen=True)
class FitsPair:
    """The files and the truth."""

    science: Path
    template: Path
    refcat: Path
    transient_ra: np.ndarray
    transient_dec: np.ndarray
    transient_x: np.ndarray  # 0-based science pixels
    transient_y: np.ndarray
    transient_snr: np.ndarray  # expected PSF S/N on the difference


def _stars(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stars over a 0.08 deg square about the centre: counts rising as 10^(0.3 m) from
    17th to 23.5th magnitude (none saturated), and three of 15th that saturate."""
    ra0, dec0 = CENTRE
    half = 0.04
    dec = dec0 + rng.uniform(-half, half, n)
    ra = ra0 + rng.uniform(-half, half, n) / math.cos(math.radians(dec0))
    lo, hi = 10.0 ** (0.3 * 17.0), 10.0 ** (0.3 * 23.5)
    mag = np.log10(lo + rng.uniform(0.0, 1.0, n) * (hi - lo)) / 0.3
    mag[:3] = 15.0
    return ra, dec, mag


def _expected_snr_flux(snr: np.ndarray) -> np.ndarray:
    """Science flux (e-) of a point source of PSF S/N ``snr`` on the difference."""
    sigma = SCIENCE["fwhm_px"] / FWHM_PER_SIGMA
    ratio = TEMPLATE["exptime"] / SCIENCE["exptime"]
    sky_s = SKY_E_PER_S * SCIENCE["exptime"] + READ_NOISE_E**2
    sky_t = (SKY_E_PER_S * TEMPLATE["exptime"] + READ_NOISE_E**2) / ratio**2
    # Optimal (PSF-weighted) photometry of a faint source: noise sqrt(4 pi sigma² var).
    return snr * np.sqrt(4.0 * math.pi * sigma**2 * (sky_s + sky_t))


def write_pair(directory: Path, seed: int = 0) -> FitsPair:
    """Write ``science.fits``, ``template.fits`` and ``refcat.csv`` into ``directory``."""
    rng = np.random.default_rng(seed)
    ra, dec, mag = _stars(rng, 900)
    sci_header = tan_header(SCIENCE["shape"], *CENTRE)
    tmp_header = tan_header(
        TEMPLATE["shape"],
        CENTRE[0] + 6.0 / 3600.0 / math.cos(math.radians(CENTRE[1])),
        CENTRE[1] - 4.0 / 3600.0,
        rotation_deg=0.4,
    )
    sci_wcs, tmp_wcs = WCS(sci_header), WCS(tmp_header)

    # Transients away from the edges, the NaN patch and the stars brighter than 21.
    sx, sy = sci_wcs.all_world2pix(ra, dec, 0)
    bright = mag < 21.0
    tx: list[float] = []
    ty: list[float] = []
    while len(tx) < len(TRANSIENT_SNR):
        x, y = rng.uniform(40, 470, 2)
        near_star = np.hypot(sx[bright] - x, sy[bright] - y).min() < 12
        near_other = any(math.hypot(x - a, y - b) < 30 for a, b in zip(tx, ty, strict=True))
        in_patch = x > 400 and y > 400
        if not (near_star or near_other or in_patch):
            tx.append(x)
            ty.append(y)
    t_ra, t_dec = sci_wcs.all_pix2world(np.array(tx), np.array(ty), 0)
    snr = np.array(TRANSIENT_SNR)

    exptime = SCIENCE["exptime"]
    flux = exptime * 10.0 ** (-0.4 * (mag - ZERO_POINT))
    model = _render(SCIENCE["shape"], sx, sy, flux, SCIENCE["fwhm_px"])
    model += _render(
        SCIENCE["shape"], np.array(tx), np.array(ty), _expected_snr_flux(snr), SCIENCE["fwhm_px"]
    )
    model += SKY_E_PER_S * exptime
    counts = model + rng.normal(0.0, 1.0, model.shape) * np.sqrt(model + READ_NOISE_E**2)
    adu = np.minimum(counts / GAIN, SATURATION_ADU).astype(np.float32)
    adu[440:460, 470:490] = np.nan
    sci = fits.PrimaryHDU(adu, header=sci_header)
    sci.header["EXPTIME"] = (exptime, "[s]")
    sci.header["FILTER"] = "r"
    sci.header["GAIN"] = (GAIN, "[e-/ADU]")
    sci.header["SATURATE"] = (SATURATION_ADU, "[ADU]")
    sci.header["RDNOISE"] = (READ_NOISE_E, "[e-]")
    sci.header["SEEING"] = (1.5, "[arcsec] FWHM")
    science = directory / "science.fits"
    sci.writeto(science, overwrite=True)

    exptime = TEMPLATE["exptime"]
    flux = exptime * 10.0 ** (-0.4 * (mag - ZERO_POINT))
    px, py = tmp_wcs.all_world2pix(ra, dec, 0)
    sky = SKY_E_PER_S * exptime
    model = _render(TEMPLATE["shape"], px, py, flux, TEMPLATE["fwhm_px"]) + sky
    var = model + READ_NOISE_E**2
    counts = model + rng.normal(0.0, 1.0, model.shape) * np.sqrt(var)
    adu = (np.minimum(counts / GAIN, SATURATION_ADU) - sky / GAIN).astype(np.float32)
    weight = (GAIN**2 / var).astype(np.float32)  # inverse variance, ADU^-2
    sci_hdu = fits.ImageHDU(adu, header=tmp_header, name="SCI")
    sci_hdu.header["EXPTIME"] = (exptime, "[s]")
    sci_hdu.header["EGAIN"] = (GAIN, "[e-/ADU]")
    sci_hdu.header["SATLEVEL"] = (SATURATION_ADU - sky / GAIN, "[ADU] after sky subtraction")
    sci_hdu.header["READNOIS"] = (READ_NOISE_E, "[e-]")
    sci_hdu.header["FWHM"] = (TEMPLATE["fwhm_px"], "[pix] seeing FWHM")
    template = directory / "template.fits"
    fits.HDUList(
        [fits.PrimaryHDU(), sci_hdu, fits.ImageHDU(weight, header=tmp_header, name="WHT")]
    ).writeto(template, overwrite=True)

    refcat = directory / "refcat.csv"
    keep = mag < 21.5
    lines = ["RAJ2000,DEJ2000,rmag"] + [
        f"{a:.8f},{d:.8f},{m:.4f}" for a, d, m in zip(ra[keep], dec[keep], mag[keep], strict=True)
    ]
    refcat.write_text("\n".join(lines) + "\n")
    return FitsPair(science, template, refcat, t_ra, t_dec, np.array(tx), np.array(ty), snr)
