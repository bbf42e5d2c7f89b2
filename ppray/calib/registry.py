"""Certified calibrations with validity ranges, in the calibration store.

A *certification* writes one master product (bias, dark, flat or defects for
one detector) together with the range of observation times -- and, for flats,
the filter band -- in which it is valid. Workers look up, for each visit, the
newest certified product valid at the visit's start time.

Layout under the calibration store root (``config.calib_root``)::

    {instrument}/{detector}/calib.fits                      legacy combined planes
    {instrument}/{detector}/certified/{kind}/{calib_id}.fits certified product
    {instrument}/registry/{detector}/{calib_id}.json         one record per certification

Every certification writes its own record file (product first, record last),
so any number of certifiers can run at once without a read-modify-write of a
shared file; a reader sees a certification only once its product exists.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, cast, get_args

import numpy as np
from astropy.io import fits
from pydantic import BaseModel, ConfigDict, Field

from ppray.errors import NonRetriableError
from ppray.layout import calib_product_key, calib_record_key
from ppray.storage import Storage

__all__ = [
    "CALIB_KINDS",
    "CalibError",
    "CalibKindName",
    "CalibRecord",
    "CalibRegistry",
    "SequenceKindName",
    "decode_product",
    "encode_product",
    "select",
]

CalibKindName = Literal["bias", "dark", "flat", "defects"]
# The kinds a calibration sequence makes (defects come out of darks and flats).
SequenceKindName = Literal["bias", "dark", "flat"]
CALIB_KINDS: tuple[CalibKindName, ...] = get_args(CalibKindName)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FITS_RESERVED = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "END"}


class CalibError(NonRetriableError, ValueError):
    """A calibration product or certification request is invalid (a retry would repeat it)."""


def _check_kind(kind: str) -> CalibKindName:
    if kind not in CALIB_KINDS:
        raise CalibError(f"unknown calibration kind {kind!r}; expected one of {CALIB_KINDS}")
    return cast(CalibKindName, kind)


def _check_name(what: str, value: str, pattern: re.Pattern[str] = _NAME_RE) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise CalibError(f"{what} {value!r} must be letters, digits, '.', '_' or '-'")
    return value


class CalibRecord(BaseModel):
    """One certified calibration product and where and when it applies."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: CalibKindName
    instrument: str
    detector: str
    band: str | None = Field(description="Filter band for flats ('r'); None for other kinds.")
    valid_from: float = Field(description="Unix seconds, inclusive.")
    valid_to: float | None = Field(description="Unix seconds, exclusive; None = open-ended.")
    calib_id: str
    key: str = Field(description="Storage key of the product, relative to the store root.")
    certified_at: float
    quality: dict[str, float] = Field(default_factory=dict)

    def valid_at(self, when: float) -> bool:
        """Whether ``when`` lies in ``[valid_from, valid_to)``."""
        return self.valid_from <= when and (self.valid_to is None or when < self.valid_to)


def encode_product(
    kind: CalibKindName, image: np.ndarray, metadata: Mapping[str, Any] | None = None
) -> bytes:
    """One master calibration as a FITS file with a single image HDU.

    Parameters
    ----------
    kind
        ``bias`` (e-), ``dark`` (e-/s), ``flat`` (relative response) or ``defects``.
    image
        2-D image; bias, dark and flat are stored as ``float32`` and must be finite,
        defects as ``uint8`` (1 = unusable pixel) from a boolean or 0/1 array.
    metadata
        Scalar header values (bool, int, float, str); keys longer than 8
        characters become ``HIERARCH`` cards, other values are left out.

    Raises
    ------
    CalibError
        For an unknown kind, an image that is not 2-D, non-finite values, or defects
        that are not 0/1.
    """
    kind = _check_kind(kind)
    data = _validated_image(kind, image)
    hdu = fits.PrimaryHDU(data)
    hdu.header["CALKIND"] = kind
    for key, value in (metadata or {}).items():
        if not isinstance(value, bool | int | float | str) or key.upper() in _FITS_RESERVED:
            continue
        if isinstance(value, str) and not value.isascii():
            continue
        if isinstance(value, float) and not np.isfinite(value):
            continue
        card = key.upper() if len(key) <= 8 and key.isalnum() else f"HIERARCH {key}"
        hdu.header[card] = value
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def _validated_image(kind: CalibKindName, image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2 or 0 in arr.shape:
        raise CalibError(f"{kind} image must be a non-empty 2-D array, not shape {arr.shape}")
    if kind == "defects":
        is_01 = np.issubdtype(arr.dtype, np.number) and bool(np.isin(arr, (0, 1)).all())
        if arr.dtype != np.bool_ and not is_01:
            raise CalibError("defects must be a boolean (or 0/1) mask")
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise CalibError(f"{kind} image must be real numbers, not {arr.dtype}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise CalibError(f"{kind} image has non-finite values")
    return out


def decode_product(kind: CalibKindName, data: bytes, expected_shape: tuple[int, int]) -> np.ndarray:
    """Read a product written by :func:`encode_product`.

    Returns
    -------
    numpy.ndarray
        ``float32`` for bias, dark and flat; ``bool`` for defects.

    Raises
    ------
    CalibError
        For data that is not FITS, a product of another kind, or a shape other
        than ``expected_shape``.
    """
    kind = _check_kind(kind)
    try:
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            header = hdul[0].header
            stored = header.get("CALKIND")
            raw = None if hdul[0].data is None else np.array(hdul[0].data)
    except (OSError, ValueError, IndexError) as exc:
        raise CalibError(f"{kind} product is not valid FITS: {exc}") from exc
    if stored != kind:
        raise CalibError(f"product holds a {stored!r} calibration, expected {kind!r}")
    if raw is None or raw.shape != tuple(expected_shape):
        shape = None if raw is None else raw.shape
        raise CalibError(f"{kind} product has shape {shape}, expected {tuple(expected_shape)}")
    if kind == "defects":
        return raw.astype(bool)
    return raw.astype(np.float32)


def _new_calib_id(kind: CalibKindName, band: str | None, valid_from: float) -> str:
    stamp = datetime.fromtimestamp(valid_from, tz=UTC).strftime("%Y%m%dT%H%M%S")
    parts = [kind, band, stamp, secrets.token_hex(3)]
    return "-".join(p for p in parts if p)


class CalibRegistry:
    """Certified calibrations of one instrument in a calibration store.

    Parameters
    ----------
    storage
        The calibration store (``config.calib_root``), local or object store.
    instrument
        Instrument name, the first component of every key.

    Notes
    -----
    Records are immutable once written, so parsed records are cached by key and
    only new record files are read; :meth:`version` costs one listing.
    Thread-safe; several processes may certify into the same store at once.
    """

    def __init__(self, storage: Storage, instrument: str) -> None:
        self.storage = storage
        self.instrument = _check_name("instrument", instrument)
        self._cache: dict[str, CalibRecord] = {}

    def _prefix(self, detector: str | None = None) -> str:
        base = f"{self.instrument}/registry"
        return base if detector is None else f"{base}/{_check_name('detector', detector)}"

    def certify(
        self,
        kind: CalibKindName,
        detector: str,
        image: np.ndarray,
        *,
        band: str | None = None,
        valid_from: float,
        valid_to: float | None = None,
        quality: Mapping[str, float] | None = None,
        calib_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CalibRecord:
        """Write ``image`` as a certified product valid in ``[valid_from, valid_to)``.

        The product is written first and its record last, so a reader never sees
        a record without its product. Certifying the same ``calib_id`` for the same
        detector again with the same kind, band and validity (a retried
        certification) returns the existing record and writes nothing.

        Parameters
        ----------
        kind
            ``bias``, ``dark``, ``flat`` or ``defects``.
        detector
            Detector name (``R22_S11``).
        image
            The master calibration (see :func:`encode_product`).
        band
            Filter band letter; required for flats, not allowed for other kinds.
        valid_from, valid_to
            Validity in unix seconds: ``valid_from`` inclusive, ``valid_to``
            exclusive, None for open-ended.
        quality
            Quality metrics (:mod:`ppray.calib.quality`), stored in the record.
        calib_id
            Identifier of the certification, shared by all detectors certified
            together (default: ``{kind}[-{band}]-{valid_from UTC}-{random}``).
        metadata
            Extra FITS header values for the product.

        Raises
        ------
        CalibError
            For an unknown kind, a band given for (or missing from) a kind, an
            empty or non-finite validity range, a bad image or a ``calib_id``
            already certified differently for this detector.
        """
        kind = _check_kind(kind)
        _check_name("detector", detector)
        if kind == "flat":
            if not band:
                raise CalibError("a flat must be certified for a filter band")
            _check_name("band", band)
        elif band is not None:
            raise CalibError(f"a {kind} is not per band; got band={band!r}")
        valid_from = float(valid_from)
        if not np.isfinite(valid_from):
            raise CalibError(f"valid_from must be finite, not {valid_from}")
        if valid_to is not None:
            valid_to = float(valid_to)
            if not valid_to > valid_from:  # also rejects NaN
                raise CalibError(f"valid_to ({valid_to}) must be after valid_from ({valid_from})")
        quality_dict = {str(k): float(v) for k, v in (quality or {}).items()}
        calib_id = _check_name(
            "calib_id", calib_id or _new_calib_id(kind, band, valid_from), _ID_RE
        )
        data = encode_product(kind, image, metadata)  # validates the image
        key = calib_product_key(self.instrument, detector, kind, calib_id)
        rkey = calib_record_key(self.instrument, detector, calib_id)
        if self.storage.exists(rkey):
            existing = self._read_record(rkey)
            same = (existing.kind, existing.band, existing.valid_from, existing.valid_to)
            if same == (kind, band, valid_from, valid_to) and existing.key == key:
                return existing
            raise CalibError(f"{calib_id!r} is already certified for {detector} as {existing}")
        record = CalibRecord(
            kind=kind,
            instrument=self.instrument,
            detector=detector,
            band=band,
            valid_from=valid_from,
            valid_to=valid_to,
            calib_id=calib_id,
            key=key,
            certified_at=time.time(),
            quality=quality_dict,
        )
        self.storage.write_bytes(key, data)
        self.storage.write_json(rkey, record.model_dump(mode="json"))
        self._cache[rkey] = record
        return record

    def _read_record(self, key: str) -> CalibRecord:
        record = self._cache.get(key)
        if record is None:
            try:
                record = CalibRecord.model_validate(self.storage.read_json(key))
            except ValueError as exc:  # pydantic's ValidationError and JSON errors
                raise CalibError(f"calibration record {key} is invalid: {exc}") from exc
            self._cache[key] = record
        return record

    def records(
        self, kind: CalibKindName | None = None, detector: str | None = None
    ) -> list[CalibRecord]:
        """Certified records, optionally of one kind and/or detector, oldest certification first."""
        if kind is not None:
            _check_kind(kind)
        found = [self._read_record(k) for k in self.storage.list(self._prefix(detector), ".json")]
        if kind is not None:
            found = [r for r in found if r.kind == kind]
        return sorted(found, key=lambda r: (r.certified_at, r.calib_id, r.detector))

    def lookup(
        self, detector: str, kind: CalibKindName, band: str | None, when: float
    ) -> CalibRecord | None:
        """The newest-certified record of ``kind`` for ``detector`` valid at ``when``.

        ``band`` selects flats (a flat of another band never matches); it is
        ignored for bias, dark and defects. None when nothing is certified for
        that time (and band).
        """
        return select(self.records(kind, detector), kind, band, when)

    def read(self, record: CalibRecord, expected_shape: tuple[int, int]) -> np.ndarray:
        """The product of ``record`` (``float32``, or ``bool`` for defects).

        Raises
        ------
        RetriableError
            If the product file is missing.
        CalibError
            If it is corrupt, of another kind or of another shape.
        """
        return decode_product(record.kind, self.storage.read_bytes(record.key), expected_shape)

    def version(self, detector: str | None = None) -> str:
        """A token that changes whenever anything (for ``detector``, if given) is certified.

        Derived from one listing of the record files (their names are unique per
        certification): cheap enough to call once per visit.
        """
        keys = self.storage.list(self._prefix(detector), ".json")
        digest = hashlib.sha1("\n".join(keys).encode(), usedforsecurity=False).hexdigest()
        return f"{len(keys)}-{digest[:16]}"


def select(
    records: list[CalibRecord], kind: CalibKindName, band: str | None, when: float
) -> CalibRecord | None:
    """Of ``records``, the newest-certified one of ``kind`` (and ``band`` for flats) valid at
    ``when``; ties in ``certified_at`` go to the larger ``calib_id``."""
    candidates = [
        r
        for r in records
        if r.kind == kind and (kind != "flat" or r.band == band) and r.valid_at(when)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.certified_at, r.calib_id))
