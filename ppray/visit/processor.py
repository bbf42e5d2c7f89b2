"""The per-detector pipeline, as plain objects: what a ``DetectorWorker`` actor runs.

A :class:`DetectorProcessor` holds one detector's calibrations for its whole
life (swapping in newly certified ones between visits, see
:mod:`ppray.calib.resolve`); :meth:`~DetectorProcessor.prepare` does everything
that can be done from ``next_visit`` alone (ahead of the pixels);
:meth:`~DetectorProcessor.process` runs the science on the visit's raws and
writes the outputs. Failures come back as a ``failed``
:class:`~ppray.messages.DetectorResult` that says why and whether a retry
could help; they never escape as exceptions.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS

from ppray.alerts.diasource import VisitInfo
from ppray.alerts.sinks import FROM_CONFIG, AlertSink, SinkFromConfig, local_alert_sink
from ppray.apdb.backend import open_store
from ppray.apdb.service import AssociationService
from ppray.apdb.store import ApdbTables
from ppray.calib.registry import CALIB_KINDS, CalibRegistry
from ppray.calib.resolve import LEGACY_CALIB_ID, CalibResolver, ResolvedCalibs
from ppray.config import DeploymentConfig
from ppray.errors import NonRetriableError, PprayError, RetriableError
from ppray.image import Calibrations, Exposure, MaskBit, RawExposure
from ppray.imageio import calibrations_from_fits, exposure_to_fits
from ppray.instrument import Detector, Instrument, detector_wcs, load_instrument
from ppray.layout import alert_key, calib_key, detector_output_key
from ppray.messages import DetectorResult, NextVisit, RawArrival
from ppray.rawio import read_raw
from ppray.refcat import RefcatStore
from ppray.schema import load_alert_schema
from ppray.science.isr import run_isr
from ppray.science.reliability import load_model
from ppray.skyregion import Footprint, angular_separation_deg
from ppray.storage import Storage, read_uri, s3_retries
from ppray.templates import TemplateStore, Tiling
from ppray.times import exposure_midpoint_mjd_tai
from ppray.visit.alert_production import AlertOptions, AlertProduction, produce_alerts
from ppray.visit.pipelines import (
    AP_DEFAULT,
    PipelineChoice,
    choose_pipeline,
    rotation_offset_deg,
)
from ppray.visit.provenance import config_digest, detector_provenance
from ppray.visit.steps import (
    Calibrated,
    Characterized,
    Differenced,
    StepTimer,
    calibrate,
    characterize,
    difference_imaging,
    with_calibration,
    with_ids,
)

__all__ = ["DetectorProcessor", "PreparedVisit", "StepProducts", "combine_snaps"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedVisit:
    """What ``prepare`` computed from ``next_visit`` before the pixels arrived."""

    visit: NextVisit
    wcs: WCS
    corners_deg: tuple[tuple[float, float], ...]
    prepare_s: float
    refcat: pa.Table | None = None
    templates: tuple[Exposure, ...] = ()
    apdb: ApdbTables | None = None  # DiaObjects in the footprint and their history
    apdb_error: str = ""
    # The calibrations this visit uses, fixed at prepare (a later swap leaves them be).
    calibs: ResolvedCalibs | None = None
    calib_error: PprayError | None = None
    # What this visit gets (pipelines.rules), known from next_visit alone.
    pipeline: PipelineChoice = AP_DEFAULT


@dataclass
class StepProducts:
    """What :meth:`DetectorProcessor.run_steps` made of a visit's raws.

    ``exposure`` is the post-ISR image (snaps combined); ``char.exposure`` the
    calexp (background-free, cosmic rays repaired, with the fitted WCS);
    ``sources`` its calibrated catalog; ``diff`` the difference imaging
    (difference, template on the calexp's grid, its PSF, trails); ``dia`` the DIA
    sources with their ids (None without a template); ``flags`` what degraded.
    """

    exposure: Exposure
    char: Characterized
    cal: Calibrated
    sources: pa.Table
    diff: Differenced
    dia: pa.Table | None
    flags: list[str]
    exptime: float


def combine_snaps(exposures: Sequence[Exposure]) -> Exposure:
    """Sum the snaps of a visit (image and variance add; masks OR).

    Parameters
    ----------
    exposures
        Post-ISR snaps on the same pixel grid, in any order.
    """
    if len(exposures) == 1:
        return exposures[0]
    first = exposures[0]
    image = np.asarray(np.sum([e.image for e in exposures], axis=0, dtype=np.float32))
    variance = np.asarray(np.sum([e.variance for e in exposures], axis=0, dtype=np.float32))
    mask = np.bitwise_or.reduce([e.mask for e in exposures])
    meta = dict(first.metadata)
    meta["EXPTIME"] = float(sum(float(e.metadata.get("EXPTIME", 0.0)) for e in exposures))
    meta["NSNAPS"] = len(exposures)
    return Exposure(image=image, variance=variance, mask=mask, wcs=first.wcs, metadata=meta)


class DetectorProcessor:
    """One detector's resident state and its science steps.

    Parameters
    ----------
    config
        The deployment.
    instrument, detector
        Which detector this is.
    calibs
        Its master calibrations from the legacy ``calib.fits`` (None: there is
        none, every kind must be certified).
    association
        The APDB's sky shards; None: DIA sources are measured but not associated,
        and no alert is made (flag ``no_apdb``). Attach one later by setting
        :attr:`association` (the Ray worker does so with the shard actors).
    resolver
        Picks each visit's certified calibrations (falling back to ``calibs``);
        None: ``calibs`` serve every visit.
    alert_sink
        Where alerts go. By default the one ``config.alerts.sink`` names among
        those the core makes (:func:`~ppray.alerts.sinks.local_alert_sink`); an
        adapter's sink (Kafka) is made by the runtime and passed here, in the
        worker's own process (a producer is never pickled).
    """

    def __init__(
        self,
        config: DeploymentConfig,
        instrument: Instrument,
        detector: Detector,
        calibs: Calibrations | None,
        association: AssociationService | None = None,
        *,
        resolver: CalibResolver | None = None,
        alert_sink: AlertSink | SinkFromConfig | None = FROM_CONFIG,
    ) -> None:
        self.config = config
        self.association = association
        self.apdb = open_store(config.apdb, config.output_root) if config.apdb.enabled else None
        self.alert_sink: AlertSink | None = (
            local_alert_sink(config) if isinstance(alert_sink, SinkFromConfig) else alert_sink
        )
        self.instrument = instrument
        self.detector = detector
        self.calibs = calibs
        self.resolver = resolver
        self.output = Storage(config.output_root)
        self.refcats = RefcatStore(config.refcat_root)
        self.templates = TemplateStore(
            config.template_root, Tiling(patch_size_deg=config.template_patch_deg)
        )
        # Read once, in the worker's process: scoring is numpy only.
        self.reliability = (
            load_model(config.detection.reliability_model) if config.detection.reliability else None
        )
        self.config_sha256 = config_digest(config)

    def provenance(self, prepared: PreparedVisit) -> dict[str, Any]:
        """What this detector-visit's outputs are made with (``provenance.json``)."""
        ap = prepared.pipeline.pipeline == "ap"
        alerts = ap and self.config.apdb.enabled and self.config.alerts.sink != "none"
        return detector_provenance(
            digest=self.config_sha256,
            pipeline=prepared.pipeline,
            calib_ids=dict(prepared.calibs.calib_ids) if prepared.calibs is not None else {},
            templates=prepared.templates,
            refcat_ids=RefcatStore.ids(prepared.refcat),
            reliability_version=self.reliability.version if ap and self.reliability else None,
            alert_schema=load_alert_schema().version_string if alerts else None,
        )

    @classmethod
    def load(
        cls,
        config: DeploymentConfig,
        detector_name: str,
        association: AssociationService | None = None,
        *,
        alert_sink: AlertSink | SinkFromConfig | None = FROM_CONFIG,
    ) -> DetectorProcessor:
        """Load the instrument and this detector's calibrations from the calibration store.

        The legacy ``calib.fits`` is read now; certified products are looked up
        per visit, in :meth:`prepare`. ``alert_sink`` is as for the constructor.

        Raises
        ------
        RetriableError
            If there is neither a calibration file nor any certified calibration (yet).
        NonRetriableError
            If it is corrupt or of the wrong shape.
        """
        instrument = load_instrument(config.instrument)
        detector = instrument.detector(detector_name)
        store = Storage(config.calib_root)
        registry = CalibRegistry(store, instrument.name)
        shape = (instrument.layout.ny, instrument.layout.nx)
        legacy: Calibrations | None
        try:
            legacy = calibrations_from_fits(
                store.read_bytes(calib_key(instrument.name, detector.name)), shape
            )
        except RetriableError:
            if not registry.records(detector=detector.name):
                raise
            legacy = None
        resolver = CalibResolver(registry, detector.name, shape, legacy)
        return cls(
            config,
            instrument,
            detector,
            legacy,
            association,
            resolver=resolver,
            alert_sink=alert_sink,
        )

    @property
    def calib_ids(self) -> dict[str, str]:
        """Ids of the calibrations in use (those of the latest prepared visit)."""
        current = self.resolver.current if self.resolver is not None else None
        if current is not None:
            return dict(current.calib_ids)
        if self.calibs is not None:
            return dict.fromkeys(CALIB_KINDS, LEGACY_CALIB_ID)
        return {}

    def resolve_calibrations(self, visit: NextVisit) -> ResolvedCalibs:
        """The calibrations valid for ``visit`` (its band, at its ``startTime``).

        Newly certified products are swapped in here, between visits: a new
        :class:`~ppray.image.Calibrations` becomes :attr:`calibs`, the one a
        visit already holds is left as it is.

        Raises
        ------
        PprayError
            If a kind has no calibration for the visit, or a product cannot be read.
        """
        if self.resolver is None:
            if self.calibs is None:
                raise NonRetriableError(f"detector {self.detector.name}: no calibrations")
            return ResolvedCalibs(self.calibs, dict.fromkeys(CALIB_KINDS, LEGACY_CALIB_ID))
        resolved = self.resolver.for_visit(visit.filter_band, visit.startTime)
        self.calibs = resolved.calibs
        return resolved

    def _prepare_calibrations(
        self, visit: NextVisit
    ) -> tuple[ResolvedCalibs | None, PprayError | None]:
        try:
            return self.resolve_calibrations(visit), None
        except PprayError as exc:
            error: PprayError = exc
        except Exception as exc:  # storage trouble (listing, reading): a retry may cure it
            error = RetriableError(f"calibrations not resolved: {type(exc).__name__}: {exc}")
        log.error("%s %s: %s", visit.key, self.detector.name, error)
        return None, error

    def prepare(self, visit: NextVisit) -> PreparedVisit:
        """Everything that only needs ``next_visit``: calibrations, WCS, footprint,
        reference stars, templates, APDB history."""
        start = time.perf_counter()
        choice = choose_pipeline(self.config.pipelines, visit)
        calibs, calib_error = self._prepare_calibrations(visit)
        wcs = detector_wcs(
            self.instrument, self.detector, visit.ra_deg, visit.dec_deg, visit.cameraAngle
        )
        ny, nx = self.instrument.layout.ny, self.instrument.layout.nx
        xs = np.array([0, nx - 1, nx - 1, 0], dtype=float)
        ys = np.array([0, 0, ny - 1, ny - 1], dtype=float)
        ra, dec = wcs.all_pix2world(xs, ys, 0)
        corners = tuple((float(a), float(d)) for a, d in zip(ra, dec, strict=True))
        # Missing references degrade the visit (flags at processing), they do not fail it.
        # A pipeline short of AP needs no template or APDB (nor ISR-only a refcat).
        refcat = None
        if choice.pipeline in ("ap", "single_frame"):
            try:
                refcat = self.refcats.load_region(corners, self.config.refcat_padding_deg)
            except PprayError as exc:
                log.warning("%s %s: no reference catalog: %s", visit.key, self.detector.name, exc)
        templates: tuple[Exposure, ...] = ()
        apdb, apdb_error = None, ""
        if choice.pipeline == "ap":
            try:
                templates = tuple(
                    self.templates.load_region(
                        visit.filter_band, corners, self.config.template_padding_deg
                    )
                )
            except PprayError as exc:
                log.warning("%s %s: no template: %s", visit.key, self.detector.name, exc)
            apdb, apdb_error = self._preload_apdb(visit, wcs)
        return PreparedVisit(
            visit,
            wcs,
            corners,
            time.perf_counter() - start,
            refcat,
            templates,
            apdb,
            apdb_error,
            calibs,
            calib_error,
            choice,
        )

    def _preload_apdb(self, visit: NextVisit, wcs: WCS) -> tuple[ApdbTables | None, str]:
        """DiaObjects in the padded footprint with their history, or why there are none."""
        if self.association is None or not self.config.apdb.enabled:
            return None, ""
        ny, nx = self.instrument.layout.ny, self.instrument.layout.nx
        ra, dec = wcs.all_pix2world([(nx - 1) / 2, 0, nx - 1], [(ny - 1) / 2, 0, ny - 1], 0)
        radius = float(angular_separation_deg(ra[1:], dec[1:], ra[0], dec[0]).max())
        footprint = Footprint.cone(
            float(ra[0]), float(dec[0]), radius + self.config.apdb.preload_padding_deg
        )
        try:
            return self.association.preload(
                footprint, exposure_midpoint_mjd_tai(visit.startTime)
            ), ""
        except Exception as exc:  # a shard down must not fail the visit
            log.warning("%s %s: APDB preload failed: %s", visit.key, self.detector.name, exc)
            return None, f"{type(exc).__name__}: {exc}"

    def _result(self, visit: NextVisit, status: Any, **kw: Any) -> DetectorResult:
        return DetectorResult(
            instrument=visit.instrument,
            group_id=visit.groupId,
            detector=self.detector.name,
            detector_id=self.detector.id,
            status=status,
            **kw,
        )

    def timed_out(self, prepared: PreparedVisit, got: int, expected: int) -> DetectorResult:
        """The result of a visit whose raws did not all arrive in time."""
        return self._result(
            prepared.visit,
            "timed_out",
            reason=f"{got} of {expected} raws arrived before the timeout",
            timings_s={"prepare": prepared.prepare_s},
        )

    def process(
        self,
        prepared: PreparedVisit,
        raws: Sequence[RawArrival],
        read: Callable[[str], bytes] = read_uri,
    ) -> DetectorResult:
        """Run ISR, background, detection and measurement; write the outputs.

        Never raises: a failure becomes a ``failed`` result with a reason.
        """
        visit = prepared.visit
        timings: dict[str, float] = {"prepare": prepared.prepare_s}
        last_raw_at = max(r.arrived_at for r in raws) if raws else None
        exposure_id = min(r.exposure_id for r in raws) if raws else None
        calib_ids = dict(prepared.calibs.calib_ids) if prepared.calibs is not None else {}
        retried = sum(s3_retries().values())

        def store_retries() -> dict[str, float]:
            # Transient object-store errors this process retried meanwhile (its prepare
            # of a next visit may add some): an operator's early sign of a sick store.
            return {"s3_retries": float(sum(s3_retries().values()) - retried)}

        try:
            result = self._process(prepared, raws, read, timings, last_raw_at, exposure_id)
            return result.model_copy(update={"metrics": {**result.metrics, **store_retries()}})
        except PprayError as exc:
            log.error("%s %s: %s", visit.key, self.detector.name, exc)
            return self._result(
                visit,
                "failed",
                reason=str(exc),
                retriable=exc.retriable,
                timings_s=timings,
                last_raw_at=last_raw_at,
                exposure_id=exposure_id,
                calib_ids=calib_ids,
                metrics=store_retries(),
            )
        except Exception as exc:  # a science bug must not kill the worker
            log.error("%s %s: %s", visit.key, self.detector.name, traceback.format_exc())
            return self._result(
                visit,
                "failed",
                reason=f"internal error: {type(exc).__name__}: {exc}",
                retriable=False,
                timings_s=timings,
                last_raw_at=last_raw_at,
                exposure_id=exposure_id,
                calib_ids=calib_ids,
                metrics=store_retries(),
            )

    def run_steps(
        self,
        prepared: PreparedVisit,
        raws: Sequence[RawArrival],
        read: Callable[[str], bytes] = read_uri,
        timings: dict[str, float] | None = None,
        exposure_id: int | None = None,
    ) -> StepProducts:
        """The science of a visit without its outputs: ISR, characterize, calibrate,
        difference imaging (what :meth:`process` does before alerts and writing).

        For tests and tools that need what the steps made (the PSF model, the
        difference, the template on the science's grid), not only the result.

        Raises
        ------
        PprayError
            Missing calibrations or an unreadable raw (:meth:`process` turns it
            into a failed result).
        """
        visit = prepared.visit
        timings = {} if timings is None else timings
        timer = StepTimer(timings)
        exposure, flags = self.isr(prepared, raws, read, timer)
        det_cfg = self.config.detection
        exptime = float(exposure.metadata.get("EXPTIME", 0.0))
        seeing_px = det_cfg.seeing_guess_arcsec / self.instrument.pixel_scale_arcsec
        char = characterize(exposure, det_cfg, seeing_guess_px=seeing_px, timer=timer)
        cal = calibrate(
            char,
            prepared.refcat,
            prepared.wcs,
            exptime_s=exptime,
            band=visit.filter_band,
            timer=timer,
        )
        calexp = char.exposure
        calexp.wcs = cal.wcs
        sources = with_calibration(
            char.sources,
            cal,
            aperture_correction=char.aperture_correction,
            exptime_s=exptime,
            detector_id=self.detector.id,
            exposure_id=exposure_id or 0,
        )
        flags.extend([*char.flags, *cal.flags])
        if prepared.pipeline.pipeline == "ap":
            diff = difference_imaging(
                calexp,
                prepared.templates,
                det_cfg.dia_threshold_sigma,
                background_box_px=det_cfg.background_box_px,
                psf=char.psf,
                streaks=det_cfg.streaks,
                reliability=self.reliability,
                timer=timer,
            )
        else:  # single_frame: no template, no DIA, no alerts
            diff = Differenced(difference=None, dia_sources=None)
        flags.extend(diff.flags)
        dia_sources = diff.dia_sources
        if dia_sources is not None:
            dia_sources = with_ids(dia_sources, self.detector.id, exposure_id or 0)
        return StepProducts(exposure, char, cal, sources, diff, dia_sources, flags, exptime)

    def isr(
        self,
        prepared: PreparedVisit,
        raws: Sequence[RawArrival],
        read: Callable[[str], bytes] = read_uri,
        timer: StepTimer | None = None,
    ) -> tuple[Exposure, list[str]]:
        """Read and ISR each snap and combine them; flags a rotation off its next_visit.

        Raises
        ------
        PprayError
            Missing calibrations or an unreadable raw.
        """
        timer = timer or StepTimer({})
        if prepared.calib_error is not None:
            raise prepared.calib_error
        calibs = prepared.calibs.calibs if prepared.calibs is not None else self.calibs
        if calibs is None:
            raise NonRetriableError(f"detector {self.detector.name}: no calibrations")
        visit = prepared.visit
        flags: list[str] = []
        snaps: list[Exposure] = []
        for raw in sorted(raws, key=lambda r: r.snap):
            with timer("read"):
                parsed: RawExposure = read_raw(read(raw.uri), self.instrument, self.detector)
            rotation = parsed.header.get("ROTPA")
            if isinstance(rotation, int | float):
                offset = rotation_offset_deg(visit.cameraAngle, float(rotation))
                if offset > self.config.pipelines.max_rotation_offset_deg:
                    flags.append(
                        f"rotation_mismatch: snap {raw.snap} ROTPA {float(rotation):.2f} deg is "
                        f"{offset:.2f} deg from next_visit's cameraAngle {visit.cameraAngle:.2f}"
                    )
            with timer("isr"):
                snaps.append(
                    run_isr(parsed, calibs, self.instrument, self.detector, wcs=prepared.wcs)
                )
        with timer("isr"):
            exposure = combine_snaps(snaps)
        return exposure, flags

    def _short_pipeline(
        self,
        prepared: PreparedVisit,
        raws: Sequence[RawArrival],
        read: Callable[[str], bytes],
        timings: dict[str, float],
        last_raw_at: float | None,
        exposure_id: int | None,
    ) -> DetectorResult:
        """``skip`` (nothing) or ``isr`` (the post-ISR exposure only)."""
        visit, choice = prepared.visit, prepared.pipeline
        flags = [f"pipeline_{choice.pipeline}: {choice.rule}"]
        outputs: dict[str, str] = {}
        timer = StepTimer(timings)
        if choice.pipeline == "isr":
            exposure, isr_flags = self.isr(prepared, raws, read, timer)
            flags.extend(isr_flags)
            with timer("write"):
                outputs["postisr"] = self.output.write_bytes(
                    detector_output_key(visit, self.detector.name, "postisr"),
                    exposure_to_fits(exposure),
                )
        outputs["provenance"] = self.output.write_json(
            detector_output_key(visit, self.detector.name, "provenance"), self.provenance(prepared)
        )
        calib_ids = dict(prepared.calibs.calib_ids) if prepared.calibs is not None else {}
        return self._result(
            visit,
            "ok",
            calib_ids=calib_ids,
            exposure_id=exposure_id,
            timings_s=timings,
            outputs=outputs,
            flags=tuple(flags),
            last_raw_at=last_raw_at,
        )

    def _process(
        self,
        prepared: PreparedVisit,
        raws: Sequence[RawArrival],
        read: Callable[[str], bytes],
        timings: dict[str, float],
        last_raw_at: float | None,
        exposure_id: int | None,
    ) -> DetectorResult:
        visit = prepared.visit
        if prepared.pipeline.pipeline in ("skip", "isr"):
            return self._short_pipeline(prepared, raws, read, timings, last_raw_at, exposure_id)
        timer = StepTimer(timings)
        steps = self.run_steps(prepared, raws, read, timings, exposure_id)
        char, cal, diff, sources = steps.char, steps.cal, steps.diff, steps.sources
        calexp, exptime, flags, dia_sources = char.exposure, steps.exptime, steps.flags, steps.dia
        produced = None
        if dia_sources is not None and diff.difference is not None and self.apdb is not None:
            if self.association is None:
                flags.append("no_apdb: DIA sources not associated, no alerts")
            else:
                produced = self._alerts(prepared, dia_sources, diff, calexp, cal, exptime,
                                        exposure_id or 0, timer)  # fmt: skip
                flags.extend(produced.flags)
        det = self.detector.name
        with timer("write"):
            outputs = {
                "sources": self.output.write_parquet(
                    detector_output_key(visit, det, "sources"), sources
                )
            }
            if dia_sources is not None:
                outputs["dia_sources"] = self.output.write_parquet(
                    detector_output_key(visit, det, "dia_sources"), dia_sources
                )
            if self.config.write_images:
                outputs["calexp"] = self.output.write_bytes(
                    detector_output_key(visit, det, "calexp"), exposure_to_fits(calexp)
                )
                if diff.difference is not None:
                    outputs["difference"] = self.output.write_bytes(
                        detector_output_key(visit, det, "difference"),
                        exposure_to_fits(diff.difference),
                    )
            if produced is not None:
                outputs.update(produced.outputs)
            outputs["provenance"] = self.output.write_json(
                detector_output_key(visit, det, "provenance"), self.provenance(prepared)
            )
        good = (calexp.mask & (MaskBit.NO_DATA | MaskBit.BAD)) == 0
        n_saturated = int(np.count_nonzero(calexp.mask & MaskBit.SAT))
        flags.extend(_pixel_flags(calexp, n_saturated))
        metrics = {
            **char.metrics,
            **cal.metrics,
            **diff.metrics,
            **(produced.metrics if produced is not None else {}),
            "n_saturated_px": float(n_saturated),
            "good_fraction": float(good.mean()),
            "psf_fwhm_arcsec": char.psf.fwhm_px * self.instrument.pixel_scale_arcsec,
        }
        for flag in flags:
            log.warning("%s %s: %s", visit.key, self.detector.name, flag)
        calib_ids = dict(prepared.calibs.calib_ids) if prepared.calibs is not None else {}
        log.info("%s %s: calibrations %s", visit.key, self.detector.name, calib_ids)
        return self._result(
            visit,
            "ok",
            calib_ids=calib_ids,
            exposure_id=exposure_id,
            n_sources=sources.num_rows,
            timings_s=timings,
            outputs=outputs,
            metrics=metrics,
            flags=tuple(flags),
            last_raw_at=last_raw_at,
            sources=sources,
            dia_sources=dia_sources,
            n_alerts=produced.n_alerts if produced is not None else 0,
        )

    def _alerts(
        self,
        prepared: PreparedVisit,
        dia_sources: pa.Table,
        diff: Differenced,
        calexp: Exposure,
        cal: Calibrated,
        exptime: float,
        exposure_id: int,
        timer: StepTimer,
    ) -> AlertProduction:
        """Association, forced photometry, APDB rows and alerts.

        Alerts the sink did not deliver raise :class:`RetriableError` (the detector
        fails and is redone); any other failure becomes the ``alerts_failed`` flag.
        """
        assert self.association is not None and diff.difference is not None
        assert diff.psf is not None  # DIA ran, with it
        visit = prepared.visit
        photometry = cal.photometry
        zero_point = photometry.zero_point_mag if photometry is not None and photometry.ok else None
        info = VisitInfo(
            visit=exposure_id,
            detector=self.detector.id,
            band=visit.filter_band,
            midpoint_mjd_tai=exposure_midpoint_mjd_tai(
                visit.startTime, exptime, calexp.metadata.get("MJD-OBS")
            ),
            exposure_time_s=exptime if exptime > 0 else max(visit.duration, 1.0),
            zero_point_mag=zero_point,
        )
        flags = [f"apdb_preload_failed: {prepared.apdb_error}"] if prepared.apdb_error else []
        known = prepared.apdb.dia_objects if prepared.apdb is not None else None
        try:
            produced = produce_alerts(
                dia_sources,
                info,
                difference=diff.difference,
                science=calexp,
                template=diff.template,
                psf=diff.psf,
                known_objects=known,
                association=self.association,
                sink=self.alert_sink,
                apdb=self.apdb,
                alert_key=alert_key(visit, self.detector.name),
                options=AlertOptions(
                    cutout_size=self.config.alerts.cutout_size_px,
                    confluent_wire_format=self.config.alerts.confluent_wire_format,
                    min_reliability=self.config.alerts.min_reliability,
                ),
                timer=timer,
            )
        except RetriableError:
            raise  # alerts not delivered (e.g. Kafka down): the detector must be retried
        except Exception as exc:  # the DIA sources are on disk; a retry redoes the alerts
            log.error("%s %s: alert production: %s", visit.key, self.detector.name,
                      traceback.format_exc())  # fmt: skip
            return AlertProduction(flags=[*flags, f"alerts_failed: {type(exc).__name__}: {exc}"])
        return AlertProduction(
            produced.n_alerts, produced.outputs, [*flags, *produced.flags], produced.metrics
        )


def _pixel_flags(calexp: Exposure, saturated: int) -> list[str]:
    """Flags for pixels that carried no data or (``saturated`` of them) saturated."""
    flags = []
    n = calexp.mask.size
    no_data = int(np.count_nonzero(calexp.mask & MaskBit.NO_DATA))
    if no_data:
        flags.append(f"no_data: {no_data} px ({100 * no_data / n:.1f}%) without valid data")
    if saturated:
        flags.append(f"saturated: {saturated} px saturated, their sources flagged")
    return flags
