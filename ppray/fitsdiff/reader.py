"""Calibrated FITS images from any camera as ppray exposures, in electrons.

The pipeline's steps work in electrons with a variance and a mask plane;
:func:`read_image` makes that :class:`~ppray.image.Exposure` from one HDU of a
calibrated (bias-subtracted, flat-fielded) image with a celestial WCS.

Header keywords
    Gain, saturation, read noise, seeing and exposure time: :mod:`.headers`.

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

import numpy as np
import sep
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from ppray.fitsdiff.headers import (
    EXPTIME_KEYS,
    READ_NOISE_KEYS,
    SATURATION_KEYS,
    FitsInputError,
    HduKey,
    ImageOptions,
    Resolved,
    lookup,
    option_flag,
    resolve_gain,
    resolve_seeing,
    resolve_value,
)
from ppray.image import Exposure, MaskBit

__all__ = ["ImageInput", "read_image"]

# Keys worth carrying into the products' headers (the rest of a camera's header is not).
_KEPT_KEYS = ("DATE-OBS", "MJD-OBS", "FILTER", "OBJECT", "INSTRUME", "TELESCOP")
# Below this the kernel fit and the backgrounds have nothing to work with.
_MIN_SIDE_PX = 64
# The sky's noise compared with the variance plane's: beyond these, say so.
_SKY_SUBTRACTED_EXCESS = 1.2
_NOISE_RATIO_TOLERANCE = 0.3
_NO_DATA = np.uint32(MaskBit.NO_DATA)


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
    flag = option_flag(role, "hdu") if what == "hdu" else f"--{role}-{what}-hdu"
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
                f"pass {option_flag(role, 'hdu')} with the image's"
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
        exptime_found = lookup(headers, EXPTIME_KEYS)
        if exptime_found is not None:
            exptime = Resolved(exptime_found[1], exptime_found[0])
        else:
            exptime = Resolved(1.0, "default")
            notes.append(f"no exposure time ({', '.join(EXPTIME_KEYS)}): 1 s assumed")
        gain = resolve_gain(headers, options, defaults, exptime, label, role)
        saturation, _ = resolve_value(
            headers, SATURATION_KEYS, options.saturation, defaults.saturation if defaults else None
        )
        read_noise, _ = resolve_value(
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
                f"saturated stars are not masked (pass {option_flag(role, 'saturation')})"
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
    seeing = resolve_seeing(headers, options, defaults, scale_arcsec, image_e, unusable, notes)
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
