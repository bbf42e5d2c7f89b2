"""Calibration sequences: one ``next_visit`` per bias, dark or flat sequence, combined per detector.

An observatory announces a calibration sequence as it announces a visit: a
``next_visit`` whose ``survey`` names the kind (``calibration.surveys`` in the
deployment: ``CALIB-BIAS``, ``CALIB-DARK``, ``CALIB-FLAT`` by default) and
whose ``nimages`` is the number of exposures; the raws arrive as usual, snap
``0 .. nimages - 1``. Each detector runs a :class:`DetectorSequence`:

1. Its inputs are corrected with the masters the kind needs
   (:func:`needed_masters`: none for a bias, the bias for a dark, bias and dark
   for a flat), the ones valid at the sequence's ``startTime``
   (:func:`input_masters`: certified, else the legacy ``calib.fits``).
2. Each raw is prepared and added to a
   :class:`~ppray.calib.combine.StreamingCombiner` as it arrives, in snap order
   (a raw that comes early waits as a reference, never as pixels): memory stays
   at a few images whatever the number of exposures, and the result does not
   depend on the order of arrival.
3. At the end (:func:`finish_sequence`) the inputs are combined and measured
   (:mod:`ppray.calib.quality`); after a flat, defects are found from it and
   the dark (:func:`ppray.calib.defects.find_defects`) and its
   :class:`~ppray.calib.flatnorm.FlatStatistics` go to the focal-plane
   reduction, whose factor the flat takes before it is certified.
4. :func:`certify_product` certifies the products (:mod:`ppray.calib.registry`)
   with deterministic ids (:func:`sequence_calib_id`), so a retried
   certification returns the record already written.

The state here is pure; the Ray worker (``ppray.actors.calib_worker``) reads
raws, feeds them and certifies.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ppray.calib.combine import MasterResult, StreamingCombiner
from ppray.calib.defects import Defects, find_defects
from ppray.calib.flatnorm import FlatStatistics, apply_flat_scale, flat_statistics
from ppray.calib.prepare import CalibKind, InputPreparer, input_preparer
from ppray.calib.quality import combined_quality, defect_quality
from ppray.calib.registry import CalibKindName, CalibRecord, CalibRegistry, SequenceKindName
from ppray.config import CalibrationConfig, CalibSurveys, CombineOptions
from ppray.errors import NonRetriableError, PprayError
from ppray.image import Calibrations
from ppray.instrument import Detector, Instrument
from ppray.messages import NextVisit, RawArrival
from ppray.rawio import read_raw
from ppray.storage import read_uri

__all__ = [
    "DetectorSequence",
    "InputMasters",
    "SequenceKindName",
    "SequenceProduct",
    "certify_product",
    "finish_sequence",
    "finite_quality",
    "input_masters",
    "needed_masters",
    "sequence_calib_id",
    "sequence_kind",
    "sequence_validity",
]

_NEEDS: dict[CalibKind, tuple[CalibKindName, ...]] = {
    CalibKind.BIAS: (),
    CalibKind.DARK: ("bias",),
    CalibKind.FLAT: ("bias", "dark"),
}
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DAY_S = 86400.0


def sequence_kind(visit: NextVisit, surveys: CalibSurveys) -> CalibKind | None:
    """The kind of calibration sequence ``visit`` announces, or None for a science visit."""
    kind = surveys.kind_of(visit.survey)
    return None if kind is None else CalibKind(kind)


def needed_masters(kind: CalibKind | str) -> tuple[CalibKindName, ...]:
    """Masters that a kind's inputs are corrected with: ``()``, ``("bias",)`` or both."""
    return _NEEDS[CalibKind(kind)]


@dataclass(frozen=True)
class InputMasters:
    """The masters a sequence's inputs are corrected with, and where each came from.

    Attributes
    ----------
    planes
        ``bias`` (e-) and/or ``dark`` (e-/s), as :func:`needed_masters` says.
    calib_ids
        Per plane, the certified ``calib_id`` or ``"legacy"`` (the ``calib.fits``).
    """

    planes: Mapping[CalibKindName, np.ndarray] = field(default_factory=dict)
    calib_ids: Mapping[CalibKindName, str] = field(default_factory=dict)


def input_masters(
    kinds: Iterable[CalibKindName],
    registry: CalibRegistry,
    detector: str,
    when: float,
    shape: tuple[int, int],
    legacy: Calibrations | None,
) -> InputMasters:
    """Each of ``kinds`` as valid at ``when``: the newest certified, else the legacy plane.

    Raises
    ------
    NonRetriableError
        When a kind has neither (e.g. a dark sequence before any bias).
    RetriableError
        When a certified product's file is missing.
    """
    planes: dict[CalibKindName, np.ndarray] = {}
    ids: dict[CalibKindName, str] = {}
    for kind in kinds:
        record = registry.lookup(detector, kind, None, when)
        if record is not None:
            planes[kind] = registry.read(record, shape)
            ids[kind] = record.calib_id
        elif legacy is not None:
            planes[kind] = getattr(legacy, kind)
            ids[kind] = "legacy"
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
            raise NonRetriableError(
                f"detector {detector}: no master {kind} certified valid at {stamp} and no "
                f"legacy calib.fits: run a {kind} sequence first"
            )
    return InputMasters(planes, ids)


def sequence_calib_id(kind: CalibKindName, visit: NextVisit) -> str:
    """The ``calib_id`` of a sequence's product: the same for every detector and retry."""
    band = visit.filter_band if kind == "flat" else ""
    group = _ID_UNSAFE.sub("-", visit.groupId).strip("-._")
    return "-".join(p for p in (kind, band, group) if p)[:128]


def sequence_validity(visit: NextVisit, config: CalibrationConfig) -> tuple[float, float | None]:
    """``(valid_from, valid_to)``: from the sequence's ``startTime``, for
    ``validity_days`` (None: open-ended)."""
    start = float(visit.startTime)
    days = config.validity_days
    return start, None if days is None else start + days * _DAY_S


class DetectorSequence:
    """One detector's calibration sequence: the inputs so far, combined one at a time.

    Parameters
    ----------
    kind
        Bias, dark or flat.
    instrument, detector
        The camera and the detector.
    expected
        Exposures in the sequence (``nimages``).
    masters
        The masters :func:`needed_masters` lists for ``kind``.
    options
        The combiner's options.

    Raws are offered as they arrive (:meth:`offer`) and taken for combination
    in snap order (:meth:`due`); an input that cannot be used (corrupt, of
    another kind) is rejected with its reason and the others still combine.
    """

    def __init__(
        self,
        kind: CalibKind | str,
        instrument: Instrument,
        detector: Detector,
        *,
        expected: int,
        masters: InputMasters | None = None,
        options: CombineOptions | None = None,
    ) -> None:
        self.kind = CalibKind(kind)
        self.instrument = instrument
        self.detector = detector
        self.expected = max(int(expected), 1)
        masters = masters or InputMasters()
        missing = [k for k in needed_masters(self.kind) if k not in masters.planes]
        if missing:
            raise ValueError(f"{self.kind} inputs need the master {', '.join(missing)}")
        self.masters = masters
        self.preparer: InputPreparer = input_preparer(
            self.kind,
            instrument,
            detector,
            bias=masters.planes.get("bias"),
            dark=masters.planes.get("dark"),
        )
        opts = options or CombineOptions()
        self.combiner = StreamingCombiner(
            self.preparer.calibs.shape,
            method=opts.method,
            nsigma=opts.nsigma,
            n_reference=opts.n_reference,
            grow=opts.grow,
        )
        self._waiting: dict[int, RawArrival] = {}
        self._seen: set[int] = set()
        self._next = 0
        self.added: list[int] = []
        self.rejected: dict[int, str] = {}
        self.scales: list[float] = []
        self.peak_nbytes = 0
        self.last_raw_at: float | None = None
        self.timings_s: dict[str, float] = {}

    # --- arrivals --------------------------------------------------------------------

    def offer(self, raw: RawArrival) -> bool:
        """Take note of a raw; False for a snap seen before (it is ignored)."""
        if raw.snap in self._seen:
            return False
        self._seen.add(raw.snap)
        self._waiting[raw.snap] = raw
        self.last_raw_at = max(self.last_raw_at or 0.0, raw.arrived_at)
        return True

    def due(self) -> list[RawArrival]:
        """Raws whose turn has come, in snap order: those with no earlier snap missing."""
        out = []
        while self._next in self._waiting:
            out.append(self._waiting.pop(self._next))
            self._next += 1
        return out

    def rest(self) -> list[RawArrival]:
        """Every raw still waiting, in snap order (at the end, when a gap will not fill)."""
        out = [self._waiting.pop(s) for s in sorted(self._waiting)]
        if out:
            self._next = out[-1].snap + 1
        return out

    @property
    def n_seen(self) -> int:
        return len(self._seen)

    @property
    def n_done(self) -> int:
        """Inputs added or rejected."""
        return len(self.added) + len(self.rejected)

    @property
    def complete(self) -> bool:
        """Every expected exposure was added or rejected."""
        return self.n_done >= self.expected

    # --- inputs ----------------------------------------------------------------------

    def add_raw(self, raw: RawArrival, read: Callable[[str], bytes] = read_uri) -> bool:
        """Read, prepare and combine one raw; False if it was rejected (see :attr:`rejected`).

        Raises
        ------
        RetriableError
            When the raw cannot be read now (storage): the sequence cannot go on.
        """
        start = time.perf_counter()
        try:
            parsed = read_raw(read(raw.uri), self.instrument, self.detector)
            imgtype = str(parsed.header.get("IMGTYPE", self.kind.value)).lower()
            if imgtype != self.kind.value:
                raise NonRetriableError(f"IMGTYPE {imgtype!r} in a {self.kind} sequence")
            t_read = time.perf_counter()
            prepared = self.preparer.prepare(parsed)
            del parsed
            t_prep = time.perf_counter()
            self.combiner.add_exposure(prepared.exposure)
        except PprayError as exc:
            if exc.retriable:
                raise
            self.rejected[raw.snap] = str(exc)
            return False
        except ValueError as exc:  # the combiner's: an input it cannot take
            self.rejected[raw.snap] = f"{type(exc).__name__}: {exc}"
            return False
        end = time.perf_counter()
        for step, seconds in (
            ("read", t_read - start),
            ("prepare", t_prep - t_read),
            ("accumulate", end - t_prep),
        ):
            self.timings_s[step] = self.timings_s.get(step, 0.0) + seconds
        self.added.append(raw.snap)
        self.scales.append(prepared.scale)
        self.peak_nbytes = max(self.peak_nbytes, self.combiner.nbytes)
        return True

    def combine(self) -> MasterResult:
        """The combination of the inputs added.

        Raises
        ------
        NonRetriableError
            When no input could be used.
        """
        if not self.added:
            reasons = "; ".join(f"snap {s}: {r}" for s, r in sorted(self.rejected.items()))
            raise NonRetriableError(f"no usable {self.kind} inputs ({reasons or 'none arrived'})")
        start = time.perf_counter()
        combined = self.combiner.result()
        self.timings_s["combine"] = time.perf_counter() - start
        return MasterResult(
            kind=self.kind, combined=combined, mean_scale=float(np.mean(self.scales))
        )

    def snapshot(self) -> dict[str, Any]:
        """Progress, JSON-safe (the pixels are not part of it)."""
        return {
            "kind": self.kind.value,
            "detector": self.detector.name,
            "expected": self.expected,
            "added": list(self.added),
            "rejected": {str(k): v for k, v in self.rejected.items()},
            "waiting": sorted(self._waiting),
            "combiner_nbytes": self.combiner.nbytes,
            "peak_nbytes": self.peak_nbytes,
        }


@dataclass(frozen=True)
class SequenceProduct:
    """What a detector's sequence produced, before certification.

    Attributes
    ----------
    kind
        The sequence's kind.
    image
        The combined master: bias (e-), dark (e-/s) or flat (median ~1, before
        the focal-plane factor); NaN where no input was kept.
    quality
        Per product (``bias``, ``dark``, ``flat``, ``defects``), its metrics.
    n_inputs
        Inputs combined.
    defects
        Defects found from the flat and the dark (flats only, when enabled).
    flat_statistics
        For the focal-plane reduction (flats only).
    """

    kind: CalibKind
    image: np.ndarray
    quality: Mapping[str, Mapping[str, float]]
    n_inputs: int
    defects: Defects | None = None
    flat_statistics: FlatStatistics | None = None


def finite_quality(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics without the NaN and infinite ones (unknown), as plain floats."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def finish_sequence(
    sequence: DetectorSequence,
    config: CalibrationConfig,
    *,
    dark: np.ndarray | None = None,
) -> SequenceProduct:
    """Combine, measure and (flats) find defects and measure for the focal plane.

    Parameters
    ----------
    sequence
        A sequence whose inputs were added.
    config
        ``calibration`` options: defects on or off and their thresholds, quantiles.
    dark
        The master dark (e-/s) valid at the flat sequence, for its defects (the
        one its inputs were corrected with, by default).

    Raises
    ------
    NonRetriableError
        When no input could be used.
    """
    master = sequence.combine()
    combined = master.combined
    kind = sequence.kind
    if kind is not CalibKind.FLAT:
        own = {kind.value: finite_quality(combined_quality(combined))}
        return SequenceProduct(kind, combined.image, own, combined.n_inputs)
    start = time.perf_counter()
    defects = None
    if config.find_defects:
        dark = dark if dark is not None else sequence.masters.planes.get("dark")
        opts = config.defects
        defects = find_defects(
            dark,
            combined.image,
            hot_nsigma=opts.hot_nsigma,
            hot_min_e_per_s=opts.hot_min_e_per_s,
            cold_threshold=opts.cold_threshold,
            dead_threshold=opts.dead_threshold,
            column_nsigma=opts.column_nsigma,
        )
    good = None if defects is None else ~defects.mask
    quality: dict[str, dict[str, float]] = {
        "flat": finite_quality(combined_quality(combined, good=good))
        | {"level_e": master.mean_scale}
    }
    if defects is not None:
        quality["defects"] = finite_quality(defect_quality(defects.table, combined.image.shape))
    stats = flat_statistics(
        combined.image,
        sequence.detector.name,
        good=good,
        scale=master.mean_scale,
        n_quantiles=config.flat_quantiles,
    )
    sequence.timings_s["defects"] = time.perf_counter() - start
    return SequenceProduct(kind, combined.image, quality, combined.n_inputs, defects, stats)


_FILL = {"bias": 0.0, "dark": 0.0, "flat": 1.0}


def certify_product(
    registry: CalibRegistry,
    product: SequenceProduct,
    visit: NextVisit,
    detector: str,
    config: CalibrationConfig,
    *,
    flat_factor: float | None = None,
) -> list[CalibRecord]:
    """Certify a sequence's products for ``detector``: the master, and defects after a flat.

    Pixels without a value get a neutral one (bias and dark 0, flat 1); they
    are no-data defects where defects were found. A flat is multiplied by its
    focal-plane ``flat_factor`` first (required for flats) and certified for the
    sequence's band. Validity: :func:`sequence_validity`; ids: :func:`sequence_calib_id`.

    Raises
    ------
    ValueError
        For a flat without ``flat_factor``.
    CalibError
        If the registry refuses the product.
    """
    kind: CalibKindName = product.kind.value
    valid_from, valid_to = sequence_validity(visit, config)
    image = product.image
    band = None
    quality = dict(product.quality.get(kind, {}))
    if kind == "flat":
        if flat_factor is None or not flat_factor > 0:
            raise ValueError(f"a flat needs a positive focal-plane factor, not {flat_factor!r}")
        image = apply_flat_scale(image, flat_factor)
        band = visit.filter_band
        quality["focal_plane_factor"] = float(flat_factor)
    image = np.where(np.isfinite(image), image, np.float32(_FILL[kind])).astype(np.float32)
    meta = {"GROUPID": visit.groupId, "NINPUTS": product.n_inputs, "SURVEY": visit.survey}
    records = [
        registry.certify(
            kind,
            detector,
            image,
            band=band,
            quality=quality,
            calib_id=sequence_calib_id(kind, visit),
            metadata=meta,
            valid_from=valid_from,
            valid_to=valid_to,
        )
    ]
    if product.defects is not None:
        records.append(
            registry.certify(
                "defects",
                detector,
                product.defects.mask,
                quality=dict(product.quality.get("defects", {})),
                calib_id=sequence_calib_id("defects", visit),
                metadata=meta,
                valid_from=valid_from,
                valid_to=valid_to,
            )
        )
    return records
