"""The per-detector pipeline, as plain objects: what a ``DetectorWorker`` actor runs.

A :class:`DetectorProcessor` holds one detector's calibrations for its whole
life; :meth:`~DetectorProcessor.prepare` does everything that can be done from
``next_visit`` alone (ahead of the pixels); :meth:`~DetectorProcessor.process`
runs the science on the visit's raws and writes the outputs. Failures come back
as a ``failed`` :class:`~ppray.messages.DetectorResult` that says why and
whether a retry could help; they never escape as exceptions.
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

from .config import DeploymentConfig
from .errors import PprayError
from .image import Calibrations, Exposure, MaskBit, RawExposure
from .imageio import calibrations_from_fits, exposure_to_fits
from .instrument import Detector, Instrument, detector_wcs, load_instrument
from .messages import DetectorResult, NextVisit, RawArrival
from .rawio import read_raw
from .refcat import RefcatStore
from .science.isr import run_isr
from .steps import (
    StepTimer,
    calibrate,
    characterize,
    difference_imaging,
    with_calibration,
    with_ids,
)
from .storage import Storage, read_uri
from .templates import TemplateStore, Tiling

__all__ = [
    "DetectorProcessor",
    "PreparedVisit",
    "calib_key",
    "combine_snaps",
    "visit_prefix",
]

log = logging.getLogger(__name__)


def calib_key(instrument: str, detector: str) -> str:
    """Key of a detector's calibration file in the calibration store."""
    return f"{instrument}/{detector}/calib.fits"


def visit_prefix(visit: NextVisit) -> str:
    """Output prefix of one visit: ``INSTRUMENT/DAY_OBS/GROUP``."""
    return f"{visit.instrument}/{visit.day_obs}/{visit.groupId}"


@dataclass(frozen=True)
class PreparedVisit:
    """What ``prepare`` computed from ``next_visit`` before the pixels arrived."""

    visit: NextVisit
    wcs: WCS
    corners_deg: tuple[tuple[float, float], ...]
    prepare_s: float
    refcat: pa.Table | None = None
    templates: tuple[Exposure, ...] = ()


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
        Its master calibrations (kept in memory for the processor's life).
    """

    def __init__(
        self,
        config: DeploymentConfig,
        instrument: Instrument,
        detector: Detector,
        calibs: Calibrations,
    ) -> None:
        self.config = config
        self.instrument = instrument
        self.detector = detector
        self.calibs = calibs
        self.output = Storage(config.output_root)
        self.refcats = RefcatStore(config.refcat_root)
        self.templates = TemplateStore(
            config.template_root, Tiling(patch_size_deg=config.template_patch_deg)
        )

    @classmethod
    def load(cls, config: DeploymentConfig, detector_name: str) -> DetectorProcessor:
        """Load the instrument and this detector's calibrations from the calibration store.

        Raises
        ------
        RetriableError
            If the calibration file does not exist (yet).
        NonRetriableError
            If it is corrupt or of the wrong shape.
        """
        instrument = load_instrument(config.instrument)
        detector = instrument.detector(detector_name)
        data = Storage(config.calib_root).read_bytes(calib_key(instrument.name, detector.name))
        calibs = calibrations_from_fits(data, (instrument.layout.ny, instrument.layout.nx))
        return cls(config, instrument, detector, calibs)

    def prepare(self, visit: NextVisit) -> PreparedVisit:
        """Everything that only needs ``next_visit``: WCS, footprint, reference stars."""
        start = time.perf_counter()
        wcs = detector_wcs(
            self.instrument, self.detector, visit.ra_deg, visit.dec_deg, visit.cameraAngle
        )
        ny, nx = self.instrument.layout.ny, self.instrument.layout.nx
        xs = np.array([0, nx - 1, nx - 1, 0], dtype=float)
        ys = np.array([0, 0, ny - 1, ny - 1], dtype=float)
        ra, dec = wcs.all_pix2world(xs, ys, 0)
        corners = tuple((float(a), float(d)) for a, d in zip(ra, dec, strict=True))
        # Missing references degrade the visit (flags at processing), they do not fail it.
        try:
            refcat = self.refcats.load_region(corners, self.config.refcat_padding_deg)
        except PprayError as exc:
            log.warning("%s %s: no reference catalog: %s", visit.key, self.detector.name, exc)
            refcat = None
        try:
            templates = tuple(
                self.templates.load_region(
                    visit.filter_band, corners, self.config.template_padding_deg
                )
            )
        except PprayError as exc:
            log.warning("%s %s: no template: %s", visit.key, self.detector.name, exc)
            templates = ()
        return PreparedVisit(visit, wcs, corners, time.perf_counter() - start, refcat, templates)

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
        try:
            return self._process(prepared, raws, read, timings, last_raw_at, exposure_id)
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
        timer = StepTimer(timings)
        snaps: list[Exposure] = []
        for raw in sorted(raws, key=lambda r: r.snap):
            with timer("read"):
                parsed: RawExposure = read_raw(read(raw.uri), self.instrument, self.detector)
            with timer("isr"):
                snaps.append(
                    run_isr(parsed, self.calibs, self.instrument, self.detector, wcs=prepared.wcs)
                )
        det_cfg = self.config.detection
        with timer("isr"):
            exposure = combine_snaps(snaps)
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
        flags = [*char.flags, *cal.flags]
        diff = difference_imaging(
            calexp,
            prepared.templates,
            det_cfg.dia_threshold_sigma,
            background_box_px=det_cfg.background_box_px,
            timer=timer,
        )
        flags.extend(diff.flags)
        dia_sources = diff.dia_sources
        if dia_sources is not None:
            dia_sources = with_ids(dia_sources, self.detector.id, exposure_id or 0)
        prefix = f"{visit_prefix(visit)}/{self.detector.name}"
        with timer("write"):
            outputs = {"sources": self.output.write_parquet(f"{prefix}/sources.parquet", sources)}
            if dia_sources is not None:
                outputs["dia_sources"] = self.output.write_parquet(
                    f"{prefix}/diaSources.parquet", dia_sources
                )
            if self.config.write_images:
                outputs["calexp"] = self.output.write_bytes(
                    f"{prefix}/calexp.fits", exposure_to_fits(calexp)
                )
                if diff.difference is not None:
                    outputs["difference"] = self.output.write_bytes(
                        f"{prefix}/difference.fits", exposure_to_fits(diff.difference)
                    )
        good = (calexp.mask & (MaskBit.NO_DATA | MaskBit.BAD)) == 0
        flags.extend(_pixel_flags(calexp))
        metrics = {
            **char.metrics,
            **cal.metrics,
            **diff.metrics,
            "n_saturated_px": float(np.count_nonzero(calexp.mask & MaskBit.SAT)),
            "good_fraction": float(good.mean()),
            "psf_fwhm_arcsec": char.psf.fwhm_px * self.instrument.pixel_scale_arcsec,
        }
        for flag in flags:
            log.warning("%s %s: %s", visit.key, self.detector.name, flag)
        return self._result(
            visit,
            "ok",
            exposure_id=exposure_id,
            n_sources=sources.num_rows,
            timings_s=timings,
            outputs=outputs,
            metrics=metrics,
            flags=tuple(flags),
            last_raw_at=last_raw_at,
            sources=sources,
            dia_sources=dia_sources,
        )


def _pixel_flags(calexp: Exposure) -> list[str]:
    """Flags for pixels that carried no data or saturated: the visit is degraded there."""
    flags = []
    n = calexp.mask.size
    no_data = int(np.count_nonzero(calexp.mask & MaskBit.NO_DATA))
    if no_data:
        flags.append(f"no_data: {no_data} px ({100 * no_data / n:.1f}%) without valid data")
    saturated = int(np.count_nonzero(calexp.mask & MaskBit.SAT))
    if saturated:
        flags.append(f"saturated: {saturated} px saturated, their sources flagged")
    return flags
