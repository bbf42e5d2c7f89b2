"""Raw files: one detector's amplifier segments as multi-extension FITS.

A raw is an empty primary HDU that carries the exposure header (``INSTRUME``,
``DETNAME``, ``DETECTOR``, ``OBSID``, ``GROUPID``, ``EXPID``, ``EXPTIME``...)
followed by one image HDU per amplifier, ``EXTNAME`` = amplifier name (``C00``).
Each amplifier HDU holds the raw segment in the layout of
:mod:`ppray.instrument` (prescan, data, serial overscan columns; parallel
overscan rows on top) with the usual IRAF-style section keywords, 1-based and
inclusive:

``DATASEC``
    The data section within the segment.
``BIASSEC``
    The serial overscan columns of the data rows.
``PRESEC``
    The serial prescan columns (only when there is a prescan).
``DETSEC``
    Where the data section lands in the assembled detector.

Segments are stored as ``int32`` (ADU are integers); a segment holding
non-finite values (a simulated dead amplifier) is stored as ``float32``
instead, since an integer image cannot carry NaN. Both read back as ``float32``,
which is exact for the ADU range of any 18-bit or 24-bit converter.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
from astropy.io import fits

from ppray.errors import NonRetriableError
from ppray.image import RawExposure
from ppray.instrument import AmplifierGeometry, Detector, Instrument

__all__ = ["raw_header", "read_raw", "write_raw"]

# Structural cards astropy writes itself; they are not exposure metadata.
_STRUCTURAL = frozenset(
    {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "COMMENT", "HISTORY", ""}
)


def _section(x0: int, x1: int, y0: int, y1: int) -> str:
    """FITS section ``[x0+1:x1,y0+1:y1]`` of the 0-based half-open numpy ranges."""
    return f"[{x0 + 1}:{x1},{y0 + 1}:{y1}]"


def _amp_header(amp: AmplifierGeometry, instrument: Instrument) -> fits.Header:
    layout = instrument.layout
    pre, nx, ny = layout.serial_prescan, amp.nx, amp.ny
    hdr = fits.Header()
    hdr["EXTNAME"] = amp.name
    hdr["AMPINDEX"] = (amp.index, "amplifier index within the detector")
    hdr["GAIN"] = (amp.gain_e_per_adu, "e-/ADU")
    hdr["RDNOISE"] = (amp.read_noise_e, "read noise, e-")
    hdr["BIASLVL"] = (amp.bias_level_adu, "nominal bias level, ADU")
    hdr["SATURATE"] = (amp.saturation_adu, "saturation level, ADU")
    hdr["DATASEC"] = (_section(pre, pre + nx, 0, ny), "data section in this segment")
    hdr["BIASSEC"] = (
        _section(pre + nx, pre + nx + layout.serial_overscan, 0, ny),
        "serial overscan",
    )
    if pre:
        hdr["PRESEC"] = (_section(0, pre, 0, ny), "serial prescan")
    hdr["DETSEC"] = (
        _section(amp.x0, amp.x0 + nx, amp.y0, amp.y0 + ny),
        "data section in the assembled detector",
    )
    # Real LSST raws flip half the amplifiers; ours are already in detector orientation.
    hdr["FLIPX"] = (False, "segment is stored in detector orientation")
    hdr["FLIPY"] = (False, "segment is stored in detector orientation")
    return hdr


def _card_value(value: Any) -> Any:
    """A value a FITS card can hold (scalars as they are, anything else as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def raw_header(header: dict[str, Any]) -> fits.Header:
    """The primary FITS header of a raw, from a plain dict.

    Keys longer than eight characters, or with characters FITS keywords may
    not hold, become ``HIERARCH`` cards (explicitly, so astropy does not warn);
    values that are not FITS scalars are written as their ``str``.
    """
    out = fits.Header()
    for key, value in header.items():
        name = str(key).upper()
        plain = len(name) <= 8 and all(c.isalnum() or c in "-_" for c in name)
        card = name if plain else f"HIERARCH {name}"
        out[card] = _card_value(value)
    return out


def write_raw(
    raw_segments: dict[str, np.ndarray],
    header: dict[str, Any],
    instrument: Instrument,
    detector: Detector,
) -> bytes:
    """Serialise one detector's raw segments and header as multi-extension FITS.

    Parameters
    ----------
    raw_segments
        Amplifier name -> segment in ADU, numpy ``[y, x]`` of
        ``instrument.layout.raw_amp_shape``; integer-valued floats or integers.
    header
        Exposure metadata for the primary HDU, passed through as given.
    instrument, detector
        The camera and detector; every amplifier of ``detector`` must have a segment.

    Returns
    -------
    bytes
        The FITS file.

    Raises
    ------
    ValueError
        For a missing amplifier or a segment of the wrong shape: writing a raw
        that :func:`read_raw` would reject is a bug in the caller.
    """
    expected = instrument.layout.raw_amp_shape
    hdus: list[Any] = [fits.PrimaryHDU(header=raw_header(header))]
    for amp in detector.amplifiers:
        if amp.name not in raw_segments:
            raise ValueError(f"{detector.name}: no segment for amplifier {amp.name}")
        seg = np.asarray(raw_segments[amp.name])
        if seg.shape != expected:
            raise ValueError(
                f"{detector.name}: amplifier {amp.name} has shape {seg.shape}, expected {expected}"
            )
        if np.issubdtype(seg.dtype, np.integer) or np.isfinite(seg).all():
            data = np.rint(seg).astype(np.int32) if seg.dtype.kind == "f" else seg.astype(np.int32)
        else:
            data = seg.astype(np.float32)
        hdus.append(fits.ImageHDU(data=data, header=_amp_header(amp, instrument)))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def _open(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, np.ndarray | None]]:
    """Primary header and every extension's data, read eagerly so truncation shows here."""
    try:
        with warnings.catch_warnings():
            # astropy *warns* about a truncated file; for a raw that means corrupt.
            warnings.simplefilter("error")
            with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False) as hdul:
                # Fix what is fixable quietly (real cameras write odd cards); refuse the rest.
                hdul.verify("silentfix+exception")
                primary = {k: v for k, v in hdul[0].header.items() if k not in _STRUCTURAL}
                planes: dict[str, np.ndarray | None] = {}
                for hdu in hdul[1:]:
                    planes[str(hdu.name).upper()] = None if hdu.data is None else np.array(hdu.data)
    except NonRetriableError:
        raise
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError or a warning
        raise NonRetriableError(f"{where}: not a valid FITS file ({exc})") from exc
    return primary, planes


def _check_header(
    header: dict[str, Any], instrument: Instrument, detector: Detector, where: str
) -> None:
    detname = header.get("DETNAME")
    if detname is None:
        raise NonRetriableError(f"{where}: primary header has no DETNAME")
    if str(detname) != detector.name:
        raise NonRetriableError(
            f"{where}: primary header DETNAME is {detname!r}, expected {detector.name!r}"
        )
    instrume = header.get("INSTRUME")
    if instrume is not None and str(instrume).lower() not in {
        instrument.name.lower(),
        instrument.short_name.lower(),
    }:
        raise NonRetriableError(
            f"{where}: primary header INSTRUME is {instrume!r}, expected {instrument.name!r}"
        )
    if "EXPTIME" not in header:
        raise NonRetriableError(f"{where}: primary header has no EXPTIME")
    # DARKTIME is optional (RawExposure falls back to EXPTIME) but must be sane if there.
    for key in ("EXPTIME", "DARKTIME"):
        if key not in header:
            continue
        value = header[key]
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(float(value)) or float(value) < 0:
            raise NonRetriableError(
                f"{where}: primary header {key} is {value!r}, expected a finite number >= 0"
            )


def read_raw(data: bytes, instrument: Instrument, detector: Detector) -> RawExposure:
    """Parse and validate a raw written by :func:`write_raw` (or by a camera like it).

    Parameters
    ----------
    data
        The FITS file's bytes.
    instrument, detector
        What the raw is expected to be: its ``DETNAME`` must be ``detector.name``
        and it must hold a segment of ``instrument.layout.raw_amp_shape`` for
        every amplifier.

    Returns
    -------
    RawExposure
        Segments as ``float32`` ADU and the primary header as a dict.

    Raises
    ------
    NonRetriableError
        For bytes that are not FITS or are truncated, a wrong or missing
        ``DETNAME``/``INSTRUME``, a missing or invalid ``EXPTIME``, a missing
        amplifier extension, or a segment of the wrong shape; the message names
        the part of the file and the field at fault.
    """
    where = f"raw for {detector.name}"
    if not data:
        raise NonRetriableError(f"{where}: empty file")
    header, planes = _open(data, where)
    _check_header(header, instrument, detector, where)
    expected = instrument.layout.raw_amp_shape
    segments: dict[str, np.ndarray] = {}
    finite = True  # integers (what cameras write) cannot be NaN or inf
    for amp in detector.amplifiers:
        if amp.name not in planes:
            have = ", ".join(sorted(planes)) or "none"
            raise NonRetriableError(
                f"{where}: amplifier {amp.name}: extension missing (extensions: {have})"
            )
        plane = planes[amp.name]
        if plane is None:
            raise NonRetriableError(f"{where}: amplifier {amp.name}: extension has no data")
        if plane.shape != expected:
            raise NonRetriableError(
                f"{where}: amplifier {amp.name}: shape {plane.shape}, expected {expected}"
            )
        segments[amp.name] = plane.astype(np.float32, copy=False)
        finite &= np.issubdtype(plane.dtype, np.integer)
    return RawExposure(segments=segments, header=header, finite=finite)
