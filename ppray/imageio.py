"""FITS serialisation of calibrations and processed exposures."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from ppray.errors import NonRetriableError
from ppray.image import Calibrations, Exposure

__all__ = [
    "calibrations_from_fits",
    "calibrations_to_fits",
    "exposure_from_fits",
    "exposure_to_fits",
]

_CALIB_PLANES = ("BIAS", "DARK", "FLAT", "DEFECTS")


def _header_safe(metadata: dict[str, Any]) -> list[tuple[str, Any]]:
    cards = []
    for key, value in metadata.items():
        if isinstance(value, bool | int | float | str) and len(key) <= 8:
            cards.append((key.upper(), value))
    return cards


def calibrations_to_fits(calibs: Calibrations) -> bytes:
    """Bias, dark, flat and defects as one multi-extension FITS file."""
    primary = fits.PrimaryHDU()
    for key, value in _header_safe(calibs.metadata):
        primary.header[key] = value
    hdus: list[Any] = [primary]
    for name, plane in zip(
        _CALIB_PLANES,
        (calibs.bias, calibs.dark, calibs.flat, calibs.defects.astype(np.uint8)),
        strict=True,
    ):
        hdus.append(fits.ImageHDU(np.asarray(plane), name=name))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def calibrations_from_fits(data: bytes, expected_shape: tuple[int, int]) -> Calibrations:
    """Read calibrations written by :func:`calibrations_to_fits`.

    Raises
    ------
    NonRetriableError
        For a corrupt file, a missing plane or a shape other than ``expected_shape``.
    """
    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            planes = {}
            for name in _CALIB_PLANES:
                if name not in hdul:
                    raise NonRetriableError(f"calibration file has no {name} extension")
                planes[name] = np.array(hdul[name].data)
                if planes[name].shape != expected_shape:
                    raise NonRetriableError(
                        f"calibration {name} has shape {planes[name].shape}, "
                        f"expected {expected_shape}"
                    )
            meta = {
                k: v
                for k, v in hdul[0].header.items()
                if k not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND")
            }
    except OSError as exc:
        raise NonRetriableError(f"calibration file is not valid FITS: {exc}") from exc
    return Calibrations(
        bias=planes["BIAS"].astype(np.float32),
        dark=planes["DARK"].astype(np.float32),
        flat=planes["FLAT"].astype(np.float32),
        defects=planes["DEFECTS"].astype(bool),
        metadata=meta,
    )


def exposure_to_fits(exposure: Exposure) -> bytes:
    """Image, variance and mask planes with the WCS in each header."""
    # relax=True keeps the SIP distortion terms of a fitted WCS.
    header = exposure.wcs.to_header(relax=True) if exposure.wcs is not None else fits.Header()
    primary = fits.PrimaryHDU()
    for key, value in _header_safe(exposure.metadata):
        primary.header[key] = value
    hdus = fits.HDUList(
        [
            primary,
            fits.ImageHDU(exposure.image, header=header, name="IMAGE"),
            fits.ImageHDU(exposure.variance, header=header, name="VARIANCE"),
            fits.ImageHDU(exposure.mask, header=header, name="MASK"),
        ]
    )
    buf = io.BytesIO()
    hdus.writeto(buf)
    return buf.getvalue()


def exposure_from_fits(data: bytes) -> Exposure:
    """Read an exposure written by :func:`exposure_to_fits`."""
    with fits.open(io.BytesIO(data), memmap=False) as hdul:
        wcs = WCS(hdul["IMAGE"].header) if "CTYPE1" in hdul["IMAGE"].header else None
        return Exposure(
            image=np.array(hdul["IMAGE"].data),
            variance=np.array(hdul["VARIANCE"].data),
            mask=np.array(hdul["MASK"].data),
            wcs=wcs,
            metadata=dict(hdul[0].header.items()),
        )
