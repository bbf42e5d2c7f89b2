"""What a calibrated image's header says about it, or the options instead.

Each value comes from the options if given, else from the first of its
keywords found in the image HDU's header, then the primary header, else from
the ``defaults`` options (the science's, for a template from the same camera);
a keyword that is not a positive number is skipped.

* gain, electrons per image unit: ``GAIN``, ``EGAIN``, ``CCDGAIN``. An image
  whose ``BUNIT`` says electrons has gain 1, one in electrons per second
  (``BUNIT`` ``e-/s``, as HST's drizzled products) has gain ``EXPTIME``;
  ``BUNIT`` wins over the gain keywords, which then describe the raw ADU.
  Needed: without it, :class:`FitsInputError`.
* saturation, image units: ``SATURATE``, ``SATLEVEL``, ``SATURATION``.
  Without it nothing is masked ``SAT`` (flag ``no_saturation_level``).
* read noise, electrons: ``RDNOISE``, ``READNOIS``, ``READNOISE``, ``RON``.
  Without it 0 (the sky's measured noise covers it, :mod:`.reader`).
* seeing FWHM: ``SEEING``, ``FWHM``, ``PSF_FWHM``, in arcsec unless the
  card's comment says pixels (``[pix]``); without one (or with a value
  outside 0.5-50 px) it is measured on the image (:func:`estimate_fwhm_px`).
  It is only the starting guess: the PSF model is measured on the stars.
* exposure time, s: ``EXPTIME``, ``EXPOSURE``, ``ITIME``; without it 1 s
  (zero points then per exposure, not per second).

Error messages name the ``ppray diff`` option to pass (:func:`option_flag`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import sep
from astropy.io import fits

from ppray.errors import NonRetriableError

__all__ = [
    "EXPTIME_KEYS",
    "GAIN_KEYS",
    "READ_NOISE_KEYS",
    "SATURATION_KEYS",
    "SEEING_KEYS",
    "FitsInputError",
    "HduKey",
    "ImageOptions",
    "Resolved",
    "estimate_fwhm_px",
    "lookup",
    "option_flag",
    "resolve_gain",
    "resolve_seeing",
    "resolve_value",
]

GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN")
SATURATION_KEYS = ("SATURATE", "SATLEVEL", "SATURATION")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "READNOISE", "RON")
SEEING_KEYS = ("SEEING", "FWHM", "PSF_FWHM")
EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "ITIME")
_ELECTRON_UNITS = {"e", "e-", "electron", "electrons"}
# Keys worth carrying into the products' headers (the rest of a camera's header is not).
_SEEING_RANGE_PX = (0.5, 50.0)
_FALLBACK_FWHM_PX = 3.0

HduKey = int | str


class FitsInputError(NonRetriableError):
    """An input image that ``ppray diff`` cannot use: the message says which file,
    which HDU, what is wrong and what to pass."""


@dataclass(frozen=True)
class ImageOptions:
    """How to read one image; every value left ``None`` comes from its header.

    Attributes
    ----------
    hdu
        Index or ``EXTNAME`` of the image HDU; ``None``: the first with 2-D data.
    variance_hdu, weight_hdu, mask_hdu
        Optional planes of the same shape: variance (image units²), inverse-variance
        weight (image units⁻²), mask (non-zero is bad). At most one of the first two.
    gain
        Electrons per image unit (for an image in e-/s: the exposure time).
    saturation
        Saturation level, image units.
    read_noise_e
        Read noise, electrons.
    seeing_arcsec
        Seeing FWHM guess, arcsec.
    sky
        Sky level already subtracted from the image, image units (for the
        variance model; ``None``: judged from the image's noise).
    """

    hdu: HduKey | None = None
    variance_hdu: HduKey | None = None
    weight_hdu: HduKey | None = None
    mask_hdu: HduKey | None = None
    gain: float | None = None
    saturation: float | None = None
    read_noise_e: float | None = None
    seeing_arcsec: float | None = None
    sky: float | None = None

    def __post_init__(self) -> None:
        if self.variance_hdu is not None and self.weight_hdu is not None:
            raise ValueError("give a variance HDU or a weight HDU, not both")
        for name in ("gain", "saturation", "seeing_arcsec"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        for name in ("read_noise_e", "sky"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, not {value!r}")


@dataclass(frozen=True)
class Resolved:
    """A value and where it came from (``"GAIN"``, ``"option"``, ``"measured"``...)."""

    value: float
    source: str


_FLAG_NAMES = {
    "science": {
        "hdu": "--science-hdu",
        "gain": "--gain",
        "saturation": "--saturation",
        "read_noise": "--read-noise",
        "seeing": "--seeing-arcsec",
    },
    "template": {
        "hdu": "--template-hdu",
        "gain": "--template-gain",
        "saturation": "--template-saturation",
        "read_noise": "--template-read-noise",
        "seeing": "--template-seeing-arcsec",
    },
}


def option_flag(role: str, what: str) -> str:
    """The ``ppray diff`` option that gives ``what`` (``"gain"``, ``"hdu"``...) for ``role``."""
    return _FLAG_NAMES.get(role, _FLAG_NAMES["science"])[what]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def lookup(
    headers: list[fits.Header], keys: tuple[str, ...], *, positive: bool = True
) -> tuple[str, float, str] | None:
    """The first usable ``(key, value, comment)`` of ``keys`` in ``headers``, in order.

    Headers are searched in turn (the image HDU's, then the primary); a card that
    is not a finite number, positive (or, with ``positive=False``, non-negative),
    is skipped.
    """
    for header in headers:
        for key in keys:
            if key not in header:
                continue
            value = _number(header[key])
            if value is not None and (value > 0 if positive else value >= 0):
                return key, value, str(header.comments[key])
    return None


def _tried(keys: tuple[str, ...], headers: list[fits.Header]) -> str:
    where = "its header" if len(headers) == 1 else "its header and the primary header"
    return f"tried {', '.join(keys)} in {where}"


def _bunit_gain(headers: list[fits.Header], exptime: Resolved) -> Resolved | None:
    """Gain from ``BUNIT``: 1 for electrons, the exposure time for electrons per second."""
    for header in headers:
        unit = str(header.get("BUNIT", "")).strip().lower().replace(" ", "")
        if not unit:
            continue
        if unit in _ELECTRON_UNITS:
            return Resolved(1.0, f"BUNIT={header['BUNIT']}")
        base, _, per = unit.partition("/")
        if (
            base in _ELECTRON_UNITS
            and per in ("s", "sec", "second")
            and exptime.source != "default"
        ):
            return Resolved(exptime.value, f"BUNIT={header['BUNIT']} x {exptime.source}")
        return None
    return None


def resolve_gain(
    headers: list[fits.Header],
    options: ImageOptions,
    defaults: ImageOptions | None,
    exptime: Resolved,
    label: str,
    role: str,
) -> Resolved:
    """The gain (electrons per image unit): option, ``BUNIT``, keywords, default.

    Raises
    ------
    FitsInputError
        When none gives one: naming ``label``, the keywords tried and the option.
    """
    if options.gain is not None:
        return Resolved(options.gain, "option")
    by_unit = _bunit_gain(headers, exptime)
    if by_unit is not None:
        return by_unit
    found = lookup(headers, GAIN_KEYS)
    if found is not None:
        return Resolved(found[1], found[0])
    if defaults is not None and defaults.gain is not None:
        return Resolved(defaults.gain, "option (science)")
    hint = f"pass {option_flag(role, 'gain')} E_PER_ADU"
    if role == "template":
        hint += " (or --gain for both images)"
    raise FitsInputError(f"{label}: no gain ({_tried((*GAIN_KEYS, 'BUNIT'), headers)}); {hint}")


def resolve_value(
    headers: list[fits.Header],
    keys: tuple[str, ...],
    option: float | None,
    default: float | None,
    *,
    positive: bool = True,
) -> tuple[Resolved | None, str]:
    """A value from the option, the header or the default, and its card's comment
    (``""`` when it is not from a card); ``None`` when none gives one."""
    if option is not None:
        return Resolved(option, "option"), ""
    found = lookup(headers, keys, positive=positive)
    if found is not None:
        return Resolved(found[1], found[0]), found[2]
    if default is not None:
        return Resolved(default, "option (science)"), ""
    return None, ""


def estimate_fwhm_px(image: np.ndarray, bad: np.ndarray, max_side: int = 1024) -> float | None:
    """The seeing FWHM (px) of the bright compact sources, or ``None`` if too few.

    Twice the median half-light radius (exact for a Gaussian) of the unflagged
    sources above 20 sigma, in the central ``max_side`` square at most: a first
    guess for the cosmic-ray finder and the PSF's fallback, not a measurement.
    """
    ny, nx = image.shape
    y0, x0 = max((ny - max_side) // 2, 0), max((nx - max_side) // 2, 0)
    box = (slice(y0, y0 + max_side), slice(x0, x0 + max_side))
    data = np.ascontiguousarray(image[box], dtype=np.float32)
    mask = np.ascontiguousarray(bad[box])
    try:
        background = sep.Background(data, mask=mask)
        data = data - background.back()
        objects = sep.extract(data, 20.0, err=background.globalrms, mask=mask, minarea=5)
        objects = objects[(objects["flag"] == 0) & (objects["a"] > 0)]
        if objects.size < 5:
            return None
        radius, rflag = sep.flux_radius(
            data, objects["x"], objects["y"], 6.0 * objects["a"], 0.5, mask=mask, subpix=5
        )
    except Exception:  # sep refuses some odd images; a guess then comes from elsewhere
        return None
    good = (rflag == 0) & np.isfinite(radius) & (radius > 0.5)
    if np.count_nonzero(good) < 5:
        return None
    return float(2.0 * np.median(radius[good]))


def resolve_seeing(
    headers: list[fits.Header],
    options: ImageOptions,
    defaults: ImageOptions | None,
    scale_arcsec: float,
    image: np.ndarray,
    bad: np.ndarray,
    notes: list[str],
) -> Resolved:
    """The seeing FWHM guess in pixels: option, keywords (arcsec unless the card's
    comment says pixels), default, else measured on ``image`` (``bad`` pixels
    left out), else 3 px; what was ignored or assumed goes to ``notes``."""
    default = defaults.seeing_arcsec if defaults is not None else None
    seeing, comment = resolve_value(headers, SEEING_KEYS, options.seeing_arcsec, default)
    if seeing is not None:
        in_px = seeing.source not in ("option", "option (science)") and "pix" in comment.lower()
        px = seeing.value if in_px else seeing.value / scale_arcsec
        lo, hi = _SEEING_RANGE_PX
        unit = "px" if in_px else "arcsec"
        if lo <= px <= hi:
            return Resolved(px, f"{seeing.source} ({seeing.value:g} {unit})")
        notes.append(f"seeing {seeing.source}={seeing.value:g} {unit} ({px:.1f} px) ignored")
    measured = estimate_fwhm_px(image, bad)
    if measured is not None:
        return Resolved(measured, "measured on the image")
    notes.append(f"seeing unknown and not measurable: {_FALLBACK_FWHM_PX:g} px assumed")
    return Resolved(_FALLBACK_FWHM_PX, "assumed")
