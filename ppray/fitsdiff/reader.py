"""Calibrated FITS images from any camera as ppray exposures, in electrons.

The pipeline's steps work in electrons with a variance and a mask plane;
:func:`read_image` makes that :class:`~ppray.image.Exposure` from one HDU of a
calibrated (bias-subtracted, flat-fielded) image with a celestial WCS.

Header keywords
    Each value comes from the options if given, else from the first of its
    keywords found in the image HDU's header, then the primary header, else
    from the ``defaults`` options (the science's, for a template from the same
    camera); a keyword that is not a positive number is skipped.

    * gain, electrons per image unit: ``GAIN``, ``EGAIN``, ``CCDGAIN``. An image
      whose ``BUNIT`` says electrons has gain 1, one in electrons per second
      (``BUNIT`` ``e-/s``, as HST's drizzled products) has gain ``EXPTIME``;
      ``BUNIT`` wins over the gain keywords, which then describe the raw ADU.
      Needed: without it, :class:`FitsInputError`.
    * saturation, image units: ``SATURATE``, ``SATLEVEL``, ``SATURATION``.
      Without it nothing is masked ``SAT`` (flag ``no_saturation_level``).
    * read noise, electrons: ``RDNOISE``, ``READNOIS``, ``READNOISE``, ``RON``.
      Without it 0 (the sky's measured noise covers it, see below).
    * seeing FWHM: ``SEEING``, ``FWHM``, ``PSF_FWHM``, in arcsec unless the
      card's comment says pixels (``[pix]``); without one (or with a value
      outside 0.5-50 px) it is measured on the image. It is only the starting
      guess: the PSF model is measured on the stars.
    * exposure time, s: ``EXPTIME``, ``EXPOSURE``, ``ITIME``; without it 1 s
      (zero points then per exposure, not per second).

Pixels
    ``image_e = image * gain``. ``NaN``/``inf`` pixels are ``NO_DATA`` (image 0,
    variance inf, as ISR makes them); pixels at or above the saturation level
    (in image units) are ``SAT``; non-zero pixels of a mask HDU are ``BAD``.

Variance, electrons²
    * a variance HDU (image units²): ``variance * gain²``;
    * a weight HDU, taken as *inverse variance* in image units⁻² (SWarp's
      ``MAP_WEIGHT``, the DECam Community Pipeline's ``wtmap``; a *relative*
      weight map is wrong here): ``1 / (weight / gain²)``; weight 0 is ``NO_DATA``;
    * otherwise the CCD noise model, as ISR makes it:
      ``max(image_e, 0) + sky_e + read_noise_e²``, which in the image's units is
      ``(max(image, 0) + sky) / gain + (read_noise_e / gain)²``. ``sky`` is the
      sky level already subtracted from the image (``ImageOptions.sky``, image
      units); when it is not given and the image's background is near zero
      while its measured sky noise exceeds the model's by over 20%, the image
      is taken as sky-subtracted and ``sky_e`` is the missing variance
      (measured noise² minus the model's), said in ``notes``.

    The sky's measured noise over the variance plane's is the ``noise_ratio``;
    off by more than 30% it adds a ``variance_check`` flag (a wrong gain, or a
    relative weight map).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sep
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from ppray.errors import NonRetriableError
from ppray.image import Exposure, MaskBit

__all__ = [
    "EXPTIME_KEYS",
    "GAIN_KEYS",
    "READ_NOISE_KEYS",
    "SATURATION_KEYS",
    "SEEING_KEYS",
    "FitsInputError",
    "ImageInput",
    "ImageOptions",
    "Resolved",
    "estimate_fwhm_px",
    "read_image",
]

GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN")
SATURATION_KEYS = ("SATURATE", "SATLEVEL", "SATURATION")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "READNOISE", "RON")
SEEING_KEYS = ("SEEING", "FWHM", "PSF_FWHM")
EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "ITIME")
_ELECTRON_UNITS = {"e", "e-", "electron", "electrons"}
# Keys worth carrying into the products' headers (the rest of a camera's header is not).
_KEPT_KEYS = ("DATE-OBS", "MJD-OBS", "FILTER", "OBJECT", "INSTRUME", "TELESCOP")
# Below this the kernel fit and the backgrounds have nothing to work with.
_MIN_SIDE_PX = 64
_SEEING_RANGE_PX = (0.5, 50.0)
_FALLBACK_FWHM_PX = 3.0
# The sky's noise compared with the variance plane's: beyond these, say so.
_SKY_SUBTRACTED_EXCESS = 1.2
_NOISE_RATIO_TOLERANCE = 0.3
_NO_DATA = np.uint32(MaskBit.NO_DATA)

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


@dataclass
class ImageInput:
    """One image read by :func:`read_image`.

    Attributes
    ----------
    exposure
        Image and variance in electrons, mask, the image's celestial WCS, and
        ``metadata`` with ``EXPTIME``, ``GAIN`` (used), ``BUNIT`` and a few
        descriptive keys of the header.
    label
        ``file[hdu]``, as messages name it.
    gain, read_noise_e, seeing_px, exptime_s
        The values used and their sources.
    saturation
        Image units, or ``None`` (nothing masked ``SAT``).
    pixel_scale_arcsec
        Mean pixel scale of the WCS.
    variance_source
        ``"model"``, ``"variance HDU ..."`` or ``"weight HDU ..."``.
    noise_ratio
        The sky's measured noise over the variance plane's (NaN if not measured).
    flags, notes
        What degraded (pipeline-style flags), and what was assumed.
    """

    exposure: Exposure = field(repr=False)
    label: str
    gain: Resolved
    saturation: Resolved | None
    read_noise_e: Resolved
    seeing_px: Resolved
    exptime_s: Resolved
    pixel_scale_arcsec: float
    variance_source: str
    noise_ratio: float = math.nan
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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


def _flag(role: str, what: str) -> str:
    return _FLAG_NAMES.get(role, _FLAG_NAMES["science"])[what]


def _describe_hdus(hdul: fits.HDUList) -> str:
    parts = []
    for i, hdu in enumerate(hdul):
        shape = getattr(hdu, "shape", None) if hdu.header.get("NAXIS", 0) else None
        what = "x".join(str(n) for n in reversed(shape)) if shape else "no data"
        parts.append(f"{i} {hdu.name or '(unnamed)'} ({what})")
    return ", ".join(parts)


def _hdu_index(
    hdul: fits.HDUList, key: HduKey | None, name: str, role: str, what: str = "hdu"
) -> int:
    """The index of HDU ``key`` (index or EXTNAME); ``None``: the first with 2-D data."""
    flag = _flag(role, "hdu") if what == "hdu" else f"--{role}-{what}-hdu"
    if key is None:
        for i, hdu in enumerate(hdul):
            if hdu.header.get("NAXIS", 0) >= 2 and _squeezable(hdu.shape):
                return i
        raise FitsInputError(f"{name}: no HDU with 2-D image data (HDUs: {_describe_hdus(hdul)})")
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key < len(hdul):
            return key
        raise FitsInputError(
            f"{name}: no HDU {key}: the file has {len(hdul)} (HDUs: {_describe_hdus(hdul)}); "
            f"pass {flag} with one of them"
        )
    try:
        return int(hdul.index_of(str(key)))
    except (KeyError, IndexError):
        raise FitsInputError(
            f"{name}: no HDU named {key!r} (HDUs: {_describe_hdus(hdul)}); "
            f"pass {flag} with one of them"
        ) from None


def _squeezable(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and all(n == 1 for n in shape[:-2]) and min(shape[-2:]) > 1


def _plane(
    hdul: fits.HDUList, key: HduKey, name: str, role: str, what: str, shape: tuple[int, int]
) -> tuple[np.ndarray, str]:
    index = _hdu_index(hdul, key, name, role, what)
    hdu = hdul[index]
    data = hdu.data
    label = f"{name}[{index}]"
    if data is None or not _squeezable(data.shape):
        got = "no data" if data is None else f"shape {data.shape}"
        raise FitsInputError(f"{label}: the {what} HDU holds {got}, not a 2-D plane")
    data = data.reshape(data.shape[-2:])
    if data.shape != shape:
        raise FitsInputError(
            f"{label}: the {what} plane has shape {data.shape}, the image {shape}: "
            "they must match pixel for pixel"
        )
    return np.asarray(data), f"{what} HDU {index} ({hdu.name or 'unnamed'})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _lookup(
    headers: list[fits.Header], keys: tuple[str, ...], *, positive: bool = True
) -> tuple[str, float, str] | None:
    """The first usable ``(key, value, comment)`` of ``keys`` in ``headers``, in order."""
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


def _resolve_gain(
    headers: list[fits.Header],
    options: ImageOptions,
    defaults: ImageOptions | None,
    exptime: Resolved,
    label: str,
    role: str,
) -> Resolved:
    if options.gain is not None:
        return Resolved(options.gain, "option")
    by_unit = _bunit_gain(headers, exptime)
    if by_unit is not None:
        return by_unit
    found = _lookup(headers, GAIN_KEYS)
    if found is not None:
        return Resolved(found[1], found[0])
    if defaults is not None and defaults.gain is not None:
        return Resolved(defaults.gain, "option (science)")
    hint = f"pass {_flag(role, 'gain')} E_PER_ADU"
    if role == "template":
        hint += " (or --gain for both images)"
    raise FitsInputError(f"{label}: no gain ({_tried((*GAIN_KEYS, 'BUNIT'), headers)}); {hint}")


def _resolve(
    headers: list[fits.Header],
    keys: tuple[str, ...],
    option: float | None,
    default: float | None,
    *,
    positive: bool = True,
) -> tuple[Resolved | None, str]:
    """A value from the option, the header or the default; and its card's comment."""
    if option is not None:
        return Resolved(option, "option"), ""
    found = _lookup(headers, keys, positive=positive)
    if found is not None:
        return Resolved(found[1], found[0]), found[2]
    if default is not None:
        return Resolved(default, "option (science)"), ""
    return None, ""


def _celestial_wcs(
    header: fits.Header, hdul: fits.HDUList, label: str, shape: tuple[int, int]
) -> WCS:
    ctypes = [str(header.get(f"CTYPE{i}", "")) for i in (1, 2)]
    if not any(ctypes):
        raise FitsInputError(
            f"{label}: no WCS (no CTYPE1/CTYPE2 in its header): ppray diff needs images "
            "with a celestial WCS; solve them first (e.g. astrometry.net's solve-field)"
        )
    try:
        with warnings.catch_warnings():
            # Cards astropy fixes on reading (DATE-OBS formats, RADECSYS) are not errors here.
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, fobj=hdul)
    except Exception as exc:  # astropy raises a zoo of types for broken WCS cards
        raise FitsInputError(f"{label}: unreadable WCS: {type(exc).__name__}: {exc}") from exc
    if not wcs.has_celestial:
        raise FitsInputError(
            f"{label}: the WCS is not celestial (CTYPE1={ctypes[0]!r}, CTYPE2={ctypes[1]!r}): "
            "ppray diff needs RA/Dec axes (e.g. RA---TAN, DEC--TAN)"
        )
    wcs = wcs.celestial
    ny, nx = shape
    xs = np.array([0.0, nx - 1.0, nx - 1.0, 0.0, (nx - 1) / 2])
    ys = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2])
    with np.errstate(invalid="ignore"):
        ra, dec = wcs.all_pix2world(xs, ys, 0)
    scale = proj_plane_pixel_scales(wcs)
    if not (np.isfinite(ra).all() and np.isfinite(dec).all() and np.all(scale > 0)):
        raise FitsInputError(f"{label}: the WCS does not map the image's pixels onto the sky")
    return wcs


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


def _seeing(
    headers: list[fits.Header],
    options: ImageOptions,
    defaults: ImageOptions | None,
    scale_arcsec: float,
    image: np.ndarray,
    bad: np.ndarray,
    notes: list[str],
) -> Resolved:
    default = defaults.seeing_arcsec if defaults is not None else None
    seeing, comment = _resolve(headers, SEEING_KEYS, options.seeing_arcsec, default)
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


def _sky_noise(image_e: np.ndarray, bad: np.ndarray) -> tuple[float, float]:
    """The sky's level and its per-pixel noise (electrons), from sep's background."""
    data = np.ascontiguousarray(np.where(bad, np.float32(0.0), image_e), dtype=np.float32)
    try:
        background = sep.Background(data, mask=np.ascontiguousarray(bad))
    except Exception:
        return math.nan, math.nan
    return float(background.globalback), float(background.globalrms)


def _variance(
    hdul: fits.HDUList,
    options: ImageOptions,
    name: str,
    role: str,
    image_e: np.ndarray,
    gain: float,
    read_noise_e: float,
    no_data: np.ndarray,
    notes: list[str],
) -> tuple[np.ndarray, str]:
    """The variance plane (electrons²) and where it came from; ``no_data`` is updated."""
    shape = image_e.shape
    if options.variance_hdu is not None:
        plane, source = _plane(hdul, options.variance_hdu, name, role, "variance", shape)
        variance = plane.astype(np.float32) * np.float32(gain * gain)
    elif options.weight_hdu is not None:
        plane, source = _plane(hdul, options.weight_hdu, name, role, "weight", shape)
        weight = plane.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = np.float32(gain * gain) / weight
        variance[~(weight > 0)] = np.inf
    else:
        sky_e = 0.0
        if options.sky is not None:
            sky_e = options.sky * gain
            notes.append(f"sky {options.sky:g} (image units) already subtracted, per the option")
        else:
            level, rms = _sky_noise(image_e, no_data)
            model = max(level, 0.0) + read_noise_e**2
            excess = rms * rms - model
            if (
                math.isfinite(excess)
                and rms * rms > _SKY_SUBTRACTED_EXCESS * model
                and abs(level) < 0.1 * rms * rms
            ):
                sky_e = excess
                notes.append(
                    f"the image looks sky-subtracted (sky {level:.3g} e-, noise {rms:.3g} e-): "
                    f"{sky_e:.4g} e- of subtracted sky assumed in the variance"
                )
        variance = np.maximum(image_e, np.float32(0.0))
        variance += np.float32(sky_e + read_noise_e**2)
        source = "model"
    bad_variance = ~(np.isfinite(variance) & (variance > 0))
    no_data |= bad_variance
    return variance.astype(np.float32, copy=False), source


def _noise_ratio(exposure: Exposure, bad: np.ndarray) -> float:
    """Measured sky noise over the variance plane's median noise on the sky."""
    _, rms = _sky_noise(exposure.image, bad)
    good = ~bad
    if not good.any() or not math.isfinite(rms):
        return math.nan
    median_var = float(np.median(exposure.variance[good][:: max(1, good.sum() // 200_000)]))
    return rms / math.sqrt(median_var) if median_var > 0 else math.nan


def read_image(
    path: str | Path,
    options: ImageOptions | None = None,
    *,
    role: str = "science",
    defaults: ImageOptions | None = None,
) -> ImageInput:
    """Read one calibrated image into an exposure in electrons (module docstring).

    Parameters
    ----------
    path
        The FITS file (compressed HDUs are fine).
    options
        Which HDUs, and values that override the header's.
    role
        ``"science"`` or ``"template"``: which ``ppray diff`` options the error
        messages name.
    defaults
        Gain, saturation, read noise and seeing used where neither ``options``
        nor the header give one (for a template: the science's options).

    Returns
    -------
    ImageInput
        The exposure and the values used, with their sources.

    Raises
    ------
    FitsInputError
        For a missing or unreadable file, a missing HDU, data that are not 2-D,
        planes of another shape, a missing or non-celestial WCS, or no gain.
    """
    options = options or ImageOptions()
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise FitsInputError(f"{path}: no such file")
    try:
        hdul = fits.open(path, memmap=False)
    except (OSError, ValueError) as exc:
        raise FitsInputError(f"{name}: not a readable FITS file: {exc}") from exc
    with hdul:
        index = _hdu_index(hdul, options.hdu, name, role)
        label = f"{name}[{index}]"
        hdu = hdul[index]
        if hdu.data is None or not _squeezable(hdu.data.shape):
            got = "no data" if hdu.data is None else f"{hdu.data.ndim}-D data {hdu.data.shape}"
            raise FitsInputError(
                f"{label}: {got}, not a 2-D image (HDUs: {_describe_hdus(hdul)}); "
                f"pass {_flag(role, 'hdu')} with the image's"
            )
        data = np.asarray(hdu.data, dtype=np.float32).reshape(hdu.data.shape[-2:])
        shape = (int(data.shape[0]), int(data.shape[1]))
        if min(shape) < _MIN_SIDE_PX:
            raise FitsInputError(
                f"{label}: {shape[1]}x{shape[0]} px is too small (at least "
                f"{_MIN_SIDE_PX}x{_MIN_SIDE_PX} for the backgrounds and the matching kernel)"
            )
        headers = [hdu.header] if index == 0 else [hdu.header, hdul[0].header]
        wcs = _celestial_wcs(hdu.header, hdul, label, shape)
        scale_arcsec = float(np.mean(proj_plane_pixel_scales(wcs))) * 3600.0
        flags: list[str] = []
        notes: list[str] = []
        exptime_found = _lookup(headers, EXPTIME_KEYS)
        if exptime_found is not None:
            exptime = Resolved(exptime_found[1], exptime_found[0])
        else:
            exptime = Resolved(1.0, "default")
            notes.append(f"no exposure time ({', '.join(EXPTIME_KEYS)}): 1 s assumed")
        gain = _resolve_gain(headers, options, defaults, exptime, label, role)
        saturation, _ = _resolve(
            headers, SATURATION_KEYS, options.saturation, defaults.saturation if defaults else None
        )
        read_noise, _ = _resolve(
            headers,
            READ_NOISE_KEYS,
            options.read_noise_e,
            defaults.read_noise_e if defaults else None,
            positive=False,
        )
        if read_noise is None:
            read_noise = Resolved(0.0, "default")
            notes.append(f"no read noise ({', '.join(READ_NOISE_KEYS)}): 0 e- assumed")

        no_data = ~np.isfinite(data)
        mask = np.zeros(shape, dtype=np.uint32)
        if saturation is not None:
            with np.errstate(invalid="ignore"):
                mask[data >= np.float32(saturation.value)] |= np.uint32(MaskBit.SAT)
        else:
            flags.append(
                f"no_saturation_level: {label} has none of {', '.join(SATURATION_KEYS)}; "
                f"saturated stars are not masked (pass {_flag(role, 'saturation')})"
            )
        if options.mask_hdu is not None:
            plane, _ = _plane(hdul, options.mask_hdu, name, role, "mask", shape)
            mask[plane != 0] |= np.uint32(MaskBit.BAD)
        image_e = data * np.float32(gain.value)
        image_e[no_data] = 0.0
        variance, variance_source = _variance(
            hdul, options, name, role, image_e, gain.value, read_noise.value, no_data, notes
        )
        metadata = {key: headers[0].get(key, headers[-1].get(key)) for key in _KEPT_KEYS}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    mask[no_data] |= _NO_DATA
    image_e[no_data] = 0.0
    variance[no_data] = np.inf
    metadata.update({"EXPTIME": exptime.value, "GAIN": gain.value, "BUNIT": "electron"})
    exposure = Exposure(image=image_e, variance=variance, mask=mask, wcs=wcs, metadata=metadata)
    unusable = (mask & np.uint32(MaskBit.NO_DATA | MaskBit.SAT | MaskBit.BAD)) != 0
    if unusable.all():
        raise FitsInputError(f"{label}: no usable pixel (all NaN, saturated or masked)")
    seeing = _seeing(headers, options, defaults, scale_arcsec, image_e, unusable, notes)
    ratio = _noise_ratio(exposure, unusable)
    if math.isfinite(ratio) and abs(ratio - 1.0) > _NOISE_RATIO_TOLERANCE:
        flags.append(
            f"variance_check: {label}'s sky noise is {ratio:.2f}x its variance plane's "
            f"({variance_source}, gain {gain.value:g} from {gain.source}): check the gain"
            + (
                " or whether the weights are inverse variances"
                if "weight" in variance_source
                else ""
            )
        )
    sat = Resolved(saturation.value, saturation.source) if saturation is not None else None
    return ImageInput(
        exposure=exposure,
        label=label,
        gain=gain,
        saturation=sat,
        read_noise_e=read_noise,
        seeing_px=seeing,
        exptime_s=exptime,
        pixel_scale_arcsec=scale_arcsec,
        variance_source=variance_source,
        noise_ratio=ratio,
        flags=flags,
        notes=notes,
    )
