"""The observatory's calibration sequences: ``next_visit`` per sequence, raws per exposure.

Like :class:`ppray.sim.observatory.SimulatedObservatory` for science visits:
each sequence is announced by a ``next_visit`` (``survey`` from the
deployment's ``calibration.surveys``, ``nimages`` exposures, closed dome), and
each exposure is written to ``raw_root`` under the LSST key layout with its
``.json`` sidecar (``GROUPID``, ``CURINDEX``) and announced as a
:class:`~ppray.messages.RawArrival`.

The pixels come from :mod:`ppray.sim.calib_exposures`, one true calibration
per detector (:func:`~ppray.sim.calib_exposures.make_calib_truth`, with
injected defects), so that every master can be checked against the truth.
Flats add what a camera has and a single detector's flat cannot show: each
detector's response relative to the others (:meth:`CalibrationSimulator.relative_gain`)
and a lamp whose level drifts from exposure to exposure (the same for every
detector of an exposure).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Literal

import numpy as np

from ppray.config import DeploymentConfig
from ppray.instrument import Instrument, load_instrument
from ppray.messages import CoordSys, Dome, NextVisit, RawArrival, RotSys
from ppray.rawio import write_raw
from ppray.rawkeys import obs_id, raw_arrival, raw_key, sidecar_key
from ppray.sim.calib_exposures import (
    CalibTruth,
    DefectInjection,
    SimulatedCalibExposure,
    make_calib_truth,
    relative_gain,
    simulate_bias,
    simulate_dark,
    simulate_flat,
)
from ppray.storage import Storage
from ppray.times import unix_to_mjd_utc

__all__ = ["CalibrationSimulator"]

SequenceKind = Literal["bias", "dark", "flat"]


class CalibrationSimulator:
    """A camera taking calibration sequences.

    Parameters
    ----------
    config
        The deployment: instrument, detectors, ``raw_root`` and ``calibration.surveys``.
    start_time
        Epoch seconds of the first sequence's ``startTime`` (default: now).
    seed
        Seed of the truth, the gains and the noise (default ``config.sim.seed``).
    darktime_s
        Dark time of each dark.
    flat_flux_e
        Electrons a pixel of response 1 collects in a flat, on a detector of
        relative gain 1 at the nominal lamp level.
    flat_exptime_s
        Exposure time of each flat.
    readout_s
        Time between exposures (readout), for ``duration`` and the exposure ids.
    gain_spread
        Detectors' relative gains are uniform in ``1 +- gain_spread``.
    lamp_drift
        The lamp level of each flat exposure is uniform in ``1 +- lamp_drift``.
    cosmic_rays
        Tracks per dark and flat; None scales with area and dark time.
    injection
        Defects to inject (default :class:`~ppray.sim.calib_exposures.DefectInjection`)
        on top of the science camera's own (see :meth:`truth`).
    """

    def __init__(
        self,
        config: DeploymentConfig,
        *,
        start_time: float | None = None,
        seed: int | None = None,
        darktime_s: float = 60.0,
        flat_flux_e: float = 20_000.0,
        flat_exptime_s: float = 10.0,
        readout_s: float = 2.0,
        gain_spread: float = 0.05,
        lamp_drift: float = 0.05,
        cosmic_rays: int | None = None,
        injection: DefectInjection | None = None,
    ) -> None:
        for name, value in (
            ("darktime_s", darktime_s),
            ("flat_flux_e", flat_flux_e),
            ("flat_exptime_s", flat_exptime_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        if not 0 <= gain_spread < 1 or not 0 <= lamp_drift < 1:
            raise ValueError("gain_spread and lamp_drift must be in [0, 1)")
        self.config = config
        self.instrument: Instrument = load_instrument(config.instrument)
        self.detectors = tuple(config.detectors or self.instrument.detector_names)
        self.raw_store = Storage(config.raw_root)
        self.start_time = time.time() if start_time is None else float(start_time)
        self.seed = config.sim.seed if seed is None else int(seed)
        self.darktime_s = float(darktime_s)
        self.flat_flux_e = float(flat_flux_e)
        self.flat_exptime_s = float(flat_exptime_s)
        self.readout_s = float(readout_s)
        self.gain_spread = float(gain_spread)
        self.lamp_drift = float(lamp_drift)
        self.cosmic_rays = cosmic_rays
        self.injection = injection
        self._truth: dict[str, CalibTruth] = {}
        self._sequences = 0

    # --- truth -----------------------------------------------------------------------

    def truth(self, detector: str) -> CalibTruth:
        """The detector's true calibration and injected defects (made once)."""
        if detector not in self._truth:
            det = self.instrument.detector(detector)
            # The science camera (SimulatedObservatory renders with make_calibrations and
            # the same seed) with its own defects, plus the injected ones: what these
            # sequences certify is right for the simulated science visits.
            self._truth[detector] = make_calib_truth(
                self.instrument, det, seed=self.seed, injection=self.injection, base_defects=True
            )
        return self._truth[detector]

    def relative_gain(self, detector: str) -> float:
        """The detector's response relative to the camera's (QE times gain error)."""
        return relative_gain(self.seed, self.instrument.detector(detector), self.gain_spread)

    def lamp(self, visit: NextVisit, snap: int) -> float:
        """The flat lamp's level in one exposure of a sequence, relative to nominal."""
        rng = np.random.default_rng([self.seed, int(visit.startTime), snap, 0x1A3])
        return float(1.0 + self.lamp_drift * rng.uniform(-1.0, 1.0))

    # --- sequences -------------------------------------------------------------------

    def exposure_time_s(self, kind: SequenceKind) -> float:
        return {"bias": 0.0, "dark": self.darktime_s, "flat": self.flat_exptime_s}[kind]

    def duration_s(self, kind: SequenceKind, n_exposures: int) -> float:
        """How long a sequence of ``n_exposures`` takes, up to the next one's start."""
        return n_exposures * (self.exposure_time_s(kind) + self.readout_s) + self.readout_s

    def sequence(
        self,
        kind: SequenceKind,
        n_exposures: int,
        *,
        band: str = "r",
        start_time: float | None = None,
    ) -> NextVisit:
        """The ``next_visit`` of a sequence of ``n_exposures`` of ``kind``.

        ``start_time`` defaults to the end of the previous sequence (the
        simulator's ``start_time`` for the first), so sequences follow in order.
        """
        if kind not in ("bias", "dark", "flat"):
            raise ValueError(f"kind must be bias, dark or flat, not {kind!r}")
        if n_exposures < 1:
            raise ValueError(f"a sequence needs at least one exposure, not {n_exposures}")
        if band not in self.instrument.filters:
            raise ValueError(f"{self.instrument.name} has no filter {band!r}")
        start = self.start_time if start_time is None else float(start_time)
        duration = n_exposures * (self.exposure_time_s(kind) + self.readout_s)
        self.start_time = start + self.duration_s(kind, n_exposures)
        self._sequences += 1
        group = datetime.fromtimestamp(start, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        return NextVisit(
            salIndex=2,
            scriptSalIndex=200000 + self._sequences,
            instrument=self.instrument.name,
            groupId=group,
            coordinateSystem=CoordSys.NONE,
            position=(0.0, 0.0),
            startTime=start,
            rotationSystem=RotSys.NONE,
            cameraAngle=0.0,
            filters=band,
            dome=Dome.CLOSED,
            duration=duration,
            nimages=n_exposures,
            survey=getattr(self.config.calibration.surveys, kind),
            totalCheckpoints=0,
            private_sndStamp=time.time(),
            private_seqNum=self._sequences,
        )

    def kind_of(self, visit: NextVisit) -> SequenceKind:
        kind = self.config.calibration.surveys.kind_of(visit.survey)
        if kind is None:
            raise ValueError(f"{visit.survey!r} is not a calibration survey")
        return kind

    def seq_num(self, visit: NextVisit, snap: int) -> int:
        """Exposure sequence number: the second of the day the exposure starts."""
        step = self.exposure_time_s(self.kind_of(visit)) + self.readout_s
        return int(visit.startTime + snap * step) % 86400

    def simulate(self, visit: NextVisit, snap: int, detector: str) -> SimulatedCalibExposure:
        """One detector's exposure ``snap`` of the sequence (pixels only, nothing written)."""
        kind = self.kind_of(visit)
        det = self.instrument.detector(detector)
        truth = self.truth(detector)
        seed = self.seed * 1_000_003 + self.seq_num(visit, snap) * 10 + snap % 10
        if kind == "bias":
            return simulate_bias(self.instrument, det, truth, seed=seed)
        if kind == "dark":
            return simulate_dark(
                self.instrument,
                det,
                truth,
                self.darktime_s,
                seed=seed,
                cosmic_rays=self.cosmic_rays,
            )
        flux = self.flat_flux_e * self.relative_gain(detector) * self.lamp(visit, snap)
        return simulate_flat(
            self.instrument,
            det,
            truth,
            flux,
            visit.filter_band,
            seed=seed,
            exptime_s=self.flat_exptime_s,
            cosmic_rays=self.cosmic_rays,
        )

    def expose(
        self, visit: NextVisit, snap: int, detectors: tuple[str, ...] | None = None
    ) -> list[RawArrival]:
        """Simulate, write and announce exposure ``snap`` of the sequence on ``detectors``."""
        if not 0 <= snap < max(visit.nimages, 1):
            raise ValueError(f"snap {snap} outside the sequence's {visit.nimages} exposures")
        step = self.exposure_time_s(self.kind_of(visit)) + self.readout_s
        shutter = visit.startTime + snap * step
        day_obs = int(visit.day_obs)
        seq = self.seq_num(visit, snap)
        prefix = self.instrument.obs_id_prefix
        arrivals = []
        for name in detectors or self.detectors:
            det = self.instrument.detector(name)
            exposure = self.simulate(visit, snap, name)
            oid = obs_id(prefix, day_obs, seq)
            header = {
                **exposure.raw.header,
                "OBSID": oid,
                "GROUPID": visit.groupId,
                "EXPID": day_obs * 100_000 + seq,
                "DATE-OBS": datetime.fromtimestamp(shutter, tz=UTC).isoformat(),
                "MJD-OBS": unix_to_mjd_utc(shutter),
                "FILTER": visit.filters,
                "SNAP": snap,
                "DAYOBS": day_obs,
                "SEQNUM": seq,
                "CURINDEX": snap + 1,
                "MAXINDEX": max(visit.nimages, 1),
            }
            key = raw_key(self.instrument.name, prefix, day_obs, seq, name)
            # Sidecar first: a raw is announced only once both are there.
            self.raw_store.write_json(sidecar_key(key), header)
            data = write_raw(exposure.raw.segments, header, self.instrument, det)
            uri = self.raw_store.write_bytes(key, data)
            arrivals.append(raw_arrival(key, header, uri, arrived_at=time.time()))
        return arrivals
