"""The simulated observatory: announces visits, exposes, writes raws and says they landed.

It plays both the scheduler (``next_visit`` ahead of the shutter) and the
camera (raws with ``.json`` sidecars under the LSST key layout in the raw
store), so that the rest of ppray sees exactly what it would see at a real
observatory. Truth tables go beside the raws under ``truth/``.

With ``sim.sky: realistic`` the sky is :func:`ppray.sim.realsky.make_realistic_catalog`
and each detector is drawn by :func:`ppray.sim.realistic.render_realistic`: a PSF
field per visit and detector (:meth:`SimulatedObservatory.science_psf`), trails per
snap (:meth:`SimulatedObservatory.sky_streaks`), bleeding bright stars; templates
get a sharper, rounder PSF of their own (:meth:`SimulatedObservatory.template_psf`).
Beside each detector's truth table go its PSF field, trails and bleed mask
(:func:`ppray.layout.psf_truth_key`, ``streaks_truth_key``, ``bleed_truth_key``),
and beside the templates each patch's PSF field (``template_psf_truth_key``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from astropy.wcs import WCS

from ppray.config import DeploymentConfig
from ppray.image import Calibrations
from ppray.imageio import calibrations_to_fits
from ppray.instrument import Instrument, detector_wcs, load_instrument
from ppray.layout import (
    bleed_truth_key,
    calib_key,
    psf_truth_key,
    streaks_truth_key,
    template_psf_truth_key,
    transients_truth_key,
    truth_key,
)
from ppray.messages import CoordSys, Dome, NextVisit, RawArrival, RotSys
from ppray.rawio import write_raw
from ppray.rawkeys import obs_id, raw_arrival, raw_key, sidecar_key
from ppray.refcat import RefcatStore
from ppray.sim.artifacts import bleed_runs, sky_streaks, streak_on_detector
from ppray.sim.psf import PsfField
from ppray.sim.realistic import render_realistic
from ppray.sim.realsky import label_transients, make_realistic_catalog
from ppray.sim.render import SimTruth, SimulatedObservation, make_calibrations, render_detector
from ppray.sim.sky import make_star_catalog
from ppray.sim.templates import write_templates_for_field
from ppray.sim.transients import make_transients, science_catalog, template_catalog
from ppray.storage import Storage
from ppray.templates import PatchId, TemplateStore, Tiling
from ppray.times import unix_to_mjd_utc

__all__ = ["ScheduledMessage", "SimulatedObservatory"]


@dataclass(frozen=True)
class ScheduledMessage:
    """A message of the simulated timeline, ``at_s`` simulated seconds after the start."""

    at_s: float
    kind: str  # "next_visit" or "expose"
    visit: NextVisit
    snap: int = 0


class SimulatedObservatory:
    """A scheduler and camera over a synthetic sky.

    Parameters
    ----------
    config
        The deployment; ``config.sim`` sets the sky and cadence, ``raw_root`` and
        ``calib_root`` say where raws and calibrations go.
    start_time
        Epoch seconds of the first visit's ``startTime`` (default: now).
    """

    def __init__(self, config: DeploymentConfig, start_time: float | None = None) -> None:
        self.config = config
        self.sim = config.sim
        self.instrument: Instrument = load_instrument(config.instrument)
        self.detectors = config.detectors or self.instrument.detector_names
        self.raw_store = Storage(config.raw_root)
        self.start_time = time.time() if start_time is None else start_time
        self._catalog: pa.Table | None = None
        self._transients: pa.Table | None = None
        self._calibs: dict[str, Calibrations] = {}

    @property
    def realistic(self) -> bool:
        """Whether this is the realistic sky (``sim.sky``)."""
        return self.sim.sky == "realistic"

    @property
    def catalog(self) -> pa.Table:
        """The synthetic sky (its stars are also the reference catalog), made once."""
        if self._catalog is None:
            radius = self.sim.catalog_radius_deg or self.instrument.field_radius_deg()
            radius += 2 * self.sim.dither_arcsec / 3600.0
            if self.realistic:
                self._catalog = make_realistic_catalog(
                    self.sim.field_ra_deg,
                    self.sim.field_dec_deg,
                    radius,
                    self.sim.realistic,
                    density_per_deg2=self.sim.star_density_per_deg2,
                    nominal_fwhm_arcsec=sum(self.sim.seeing_fwhm_arcsec) / 2.0,
                    seed=self.sim.seed,
                )
            else:
                self._catalog = make_star_catalog(
                    self.sim.field_ra_deg,
                    self.sim.field_dec_deg,
                    radius,
                    density_per_deg2=self.sim.star_density_per_deg2,
                    seed=self.sim.seed,
                )
        return self._catalog

    @property
    def transients(self) -> pa.Table:
        """New, variable and moving objects over the field (time axis: s since start)."""
        if self._transients is None:
            radius = self.sim.catalog_radius_deg or self.instrument.field_radius_deg()
            self._transients = make_transients(
                self.sim.field_ra_deg,
                self.sim.field_dec_deg,
                radius,
                n_new=self.sim.n_new_transients,
                n_variable=self.sim.n_variables,
                n_moving=self.sim.n_movers,
                mag_range=self.sim.transient_mag_range,
                base_catalog=self.catalog,
                seed=self.sim.seed,
            )
        return self._transients

    def write_reference_data(self) -> list[str]:
        """Write what a site has before the night: calibrations and the reference catalog."""
        uris = self.write_calibrations()
        refcat = self.catalog
        if self.realistic:
            # A reference catalog (Gaia) holds stars, not galaxies.
            refcat = refcat.filter(pc.equal(refcat["kind"], "star"))
        keys = RefcatStore(self.config.refcat_root).write(refcat)
        return uris + keys + self.write_templates()

    def write_templates(self) -> list[str]:
        """Deep coadds of the field (without new or moving objects) in the visits' band."""
        band = self.visit(0).filter_band
        store = TemplateStore(self.config.template_root, self._template_tiling())
        ra, dec, radius = self._template_cap()
        catalog = template_catalog(self.catalog, self.transients, band)
        if self.realistic:
            catalog = label_transients(catalog, self.transients)
        patches = write_templates_for_field(
            store,
            catalog,
            ra,
            dec,
            radius + 2 * self.sim.dither_arcsec / 3600.0,
            band,
            seed=self.sim.seed,
            psf_for_patch=self.template_psf if self.realistic else None,
            # Templates are coadds of the best-seeing visits: sharper than any science
            # visit, so PSF matching always convolves the (nearly noiseless) template.
            seeing_fwhm_arcsec=0.85 * self.sim.seeing_fwhm_arcsec[0],
            exptime_s=self.sim.exposure_time_s,
            sky_e_per_px_per_s=self.sim.sky_e_per_px_per_s,
        )
        if self.realistic:
            for p in patches:
                self.raw_store.write_json(
                    template_psf_truth_key(band, p.name), self.template_psf(p).to_dict()
                )
        return [store.key(band, p) for p in patches]

    def _template_cap(self) -> tuple[float, float, float]:
        """Centre and radius (deg) of the sky the templates must cover.

        The field, or, when only some detectors are in play (a test, a training
        run on one CCD), the cap around those detectors at the field's pointing
        plus the pointing error: a whole field's templates for one CCD would be
        gigabytes. Patches are the same either way (each has its own seed).
        """
        field = self.sim.catalog_radius_deg or self.instrument.field_radius_deg()
        if set(self.detectors) >= set(self.instrument.detector_names):
            return self.sim.field_ra_deg, self.sim.field_dec_deg, field
        visit = self.visit(0)
        corners = []
        for name in self.detectors:
            det = self.instrument.detector(name)
            wcs = detector_wcs(self.instrument, det, visit.ra_deg, visit.dec_deg, visit.cameraAngle)
            ny, nx = self.instrument.layout.ny, self.instrument.layout.nx
            corners.append(
                wcs.all_pix2world([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1]], 0)
            )
        sky = np.concatenate(corners)
        ra0, dec0 = float(np.mean(sky[:, 0])), float(np.mean(sky[:, 1]))
        cos_d = math.cos(math.radians(dec0))
        reach = float(np.max(np.hypot((sky[:, 0] - ra0) * cos_d, sky[:, 1] - dec0)))
        reach += 5.0 * self.sim.pointing_error_arcsec / 3600.0
        if reach >= field:
            return self.sim.field_ra_deg, self.sim.field_dec_deg, field
        return ra0, dec0, reach

    def _template_tiling(self) -> Tiling:
        return Tiling(patch_size_deg=self.config.template_patch_deg)

    def template_psf(self, patch: PatchId) -> PsfField:
        """The true PSF of the templates on one patch's grid (realistic sky).

        One smooth field over the sky of the whole field (a gnomonic grid about
        its centre at the patches' pixel scale), so that neighbouring patches
        agree; each patch sees it shifted to its own pixels (their grids differ
        only by an offset there, up to a rotation of 1e-3 rad over 1 degree).
        FWHM in ``realistic.template_fwhm_arcsec``, ellipticity up to
        ``realistic.template_ellipticity_max``, the FWHM varying by half the
        science PSF's ``psf_fwhm_variation`` over the field.
        """
        tiling = self._template_tiling()
        real = self.sim.realistic
        rng = np.random.default_rng([self.sim.seed, 0x7E3B])
        scale = tiling.pixel_scale_arcsec
        # Over every patch that meets the field: its radius, the dithers and a patch.
        field = self.sim.catalog_radius_deg or self.instrument.field_radius_deg()
        field += 2 * self.sim.dither_arcsec / 3600.0 + tiling.patch_size_deg + tiling.overlap_deg
        half = math.ceil(field * 3600.0 / scale)
        psf = PsfField.random(
            rng,
            (2 * half + 1, 2 * half + 1),
            rng.uniform(*real.template_fwhm_arcsec) / scale,
            fwhm_variation=0.5 * real.psf_fwhm_variation,
            ellipticity_max=real.template_ellipticity_max,
        ).shifted(half, half)
        sky = WCS(naxis=2)
        sky.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        sky.wcs.crval = [self.sim.field_ra_deg, self.sim.field_dec_deg]
        sky.wcs.crpix = [1.0, 1.0]
        sky.wcs.cd = np.array([[-scale / 3600.0, 0.0], [0.0, scale / 3600.0]])
        sky.wcs.set()
        wcs, _ = tiling.patch_wcs(patch)
        cx, cy = (float(v) - 1.0 for v in wcs.wcs.crpix)
        ((fx, fy),) = sky.wcs_world2pix([list(wcs.wcs.crval)], 0)
        return psf.shifted(float(fx) - cx, float(fy) - cy)

    def science_psf(self, visit: NextVisit, detector: str) -> PsfField:
        """The true PSF field of a detector in a visit (realistic sky; every snap).

        FWHM ``seeing_arcsec(visit)`` at the detector's centre, varying by up to
        ``realistic.psf_fwhm_variation``, ellipticity up to
        ``realistic.psf_ellipticity_max`` at the extremes.
        """
        det = self.instrument.detector(detector)
        rng = np.random.default_rng([self.sim.seed, visit.private_seqNum, det.id, 0x95F])
        return PsfField.random(
            rng,
            (self.instrument.layout.ny, self.instrument.layout.nx),
            self.seeing_arcsec(visit) / self.instrument.pixel_scale_arcsec,
            fwhm_variation=self.sim.realistic.psf_fwhm_variation,
            ellipticity_max=self.sim.realistic.psf_ellipticity_max,
        )

    def sky_streaks(self, visit: NextVisit, snap: int = 0) -> pa.Table:
        """The satellite and aircraft trails of one snap (realistic sky).

        ``realistic.n_streaks`` of them, or a Poisson number of mean
        ``realistic.streaks_per_exposure``; each passes through a random point
        of a random simulated detector: straight across the camera, or
        (``streak_segment_fraction``) a segment up to two detector diagonals long.

        Returns
        -------
        pyarrow.Table
            :data:`ppray.sim.artifacts.SKY_STREAK_SCHEMA`.
        """
        real = self.sim.realistic
        rng = np.random.default_rng([self.sim.seed, visit.private_seqNum, snap, 0x57EA])
        n = (
            real.n_streaks
            if real.n_streaks is not None
            else int(rng.poisson(real.streaks_per_exposure))
        )
        layout = self.instrument.layout
        anchors = []
        for _ in range(n):
            name = self.detectors[int(rng.integers(len(self.detectors)))]
            x, y = rng.uniform(0, layout.nx - 1), rng.uniform(0, layout.ny - 1)
            ((ra, dec),) = self.true_wcs(visit, name).all_pix2world([[x, y]], 0)
            anchors.append((float(ra), float(dec)))
        diagonal_deg = math.hypot(layout.nx, layout.ny) * self.instrument.pixel_scale_arcsec / 3600
        return sky_streaks(
            anchors,
            rng,
            crossing_deg=2.0 * self.instrument.field_radius_deg() + 1.0,
            segment_deg=diagonal_deg,
            segment_fraction=real.streak_segment_fraction,
            flux_e_per_px=real.streak_flux_e_per_px,
            defocus_sigma_px=real.streak_defocus_sigma_px,
            first_id=1000 * snap,
        )

    def write_calibrations(self) -> list[str]:
        """Write every detector's true master calibrations to the calibration store."""
        store = Storage(self.config.calib_root)
        uris = []
        for name in self.detectors:
            det = self.instrument.detector(name)
            calibs = make_calibrations(self.instrument, det, seed=self.sim.seed)
            uris.append(
                store.write_bytes(
                    calib_key(self.instrument.name, name), calibrations_to_fits(calibs)
                )
            )
        return uris

    def visit(self, index: int) -> NextVisit:
        """The ``next_visit`` of the ``index``-th visit (deterministic for a seed and start)."""
        rng = np.random.default_rng([self.sim.seed, index])
        start = self.start_time + index * self.sim.visit_interval_s + self.sim.lead_time_s
        dra, ddec = rng.uniform(-1, 1, 2) * self.sim.dither_arcsec / 3600.0
        cos_dec = math.cos(math.radians(self.sim.field_dec_deg))
        group = datetime.fromtimestamp(start, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        return NextVisit(
            salIndex=2,
            scriptSalIndex=100000 + index,
            instrument=self.instrument.name,
            groupId=group,
            coordinateSystem=CoordSys.ICRS,
            position=(self.sim.field_ra_deg + dra / cos_dec, self.sim.field_dec_deg + ddec),
            startTime=start,
            rotationSystem=RotSys.SKY,
            cameraAngle=float(rng.uniform(-2, 2)),
            filters=self.instrument.filters[min(1, len(self.instrument.filters) - 1)],
            dome=Dome.OPEN,
            duration=self.sim.exposure_time_s * self.sim.nimages + 2.0,
            nimages=self.sim.nimages,
            survey="ppray-sim",
            totalCheckpoints=0,
            private_sndStamp=time.time(),
            private_seqNum=index,
        )

    def timeline(self, n_visits: int | None = None) -> Iterator[ScheduledMessage]:
        """next_visit ``lead_time_s`` before each shutter, then one exposure per snap."""
        for i in range(n_visits or self.sim.n_visits):
            visit = self.visit(i)
            t0 = i * self.sim.visit_interval_s
            yield ScheduledMessage(t0, "next_visit", visit)
            for snap in range(max(visit.nimages, 1)):
                t_read = t0 + self.sim.lead_time_s + (snap + 1) * self.sim.exposure_time_s
                yield ScheduledMessage(t_read, "expose", visit, snap)

    def play(
        self, n_visits: int | None = None, time_scale: float | None = None
    ) -> Iterator[ScheduledMessage]:
        """:meth:`timeline` in real time: each message when it is due, ``time_scale``
        (default ``sim.time_scale``) wall seconds per simulated second."""
        scale = self.sim.time_scale if time_scale is None else time_scale
        start = time.monotonic()
        for msg in self.timeline(n_visits):
            delay = start + msg.at_s * scale - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield msg

    def true_wcs(self, visit: NextVisit, detector: str) -> WCS:
        """Where the detector really looked: the nominal WCS off by the pointing error.

        The telescope misses ``next_visit``'s position by a per-visit offset
        (``sim.pointing_error_arcsec`` rms per axis) and the rotator by 1/100 of
        that in degrees, so astrometric calibration has something to find.
        """
        rng = np.random.default_rng([self.sim.seed, visit.private_seqNum, 11])
        err_ra, err_dec = rng.normal(0.0, self.sim.pointing_error_arcsec / 3600.0, 2)
        err_rot = rng.normal(0.0, self.sim.pointing_error_arcsec / 100.0)
        cos_dec = math.cos(math.radians(visit.dec_deg))
        return detector_wcs(
            self.instrument,
            self.instrument.detector(detector),
            visit.ra_deg + err_ra / cos_dec,
            visit.dec_deg + err_dec,
            visit.cameraAngle + err_rot,
        )

    def seeing_arcsec(self, visit: NextVisit) -> float:
        lo, hi = self.sim.seeing_fwhm_arcsec
        rng = np.random.default_rng([self.sim.seed, visit.private_seqNum, 7])
        return float(rng.uniform(lo, hi))

    def raw_keys(self, visit: NextVisit, snap: int) -> list[str]:
        """The storage keys of the raws :meth:`expose` writes for a snap (all detectors)."""
        inst = self.instrument
        seq = self.seq_num(visit, snap)
        return [
            raw_key(inst.name, inst.obs_id_prefix, int(visit.day_obs), seq, d)
            for d in self.detectors
        ]

    def seq_num(self, visit: NextVisit, snap: int) -> int:
        """Exposure sequence number: the second of the day its shutter opens (< 100000).

        Visits are at least one exposure apart, so this is unique per visit and snap.
        """
        return int(visit.startTime + snap * self.sim.exposure_time_s) % 86400

    def expose(
        self, visit: NextVisit, snap: int = 0, detectors: tuple[str, ...] | None = None
    ) -> list[RawArrival]:
        """Render, write and announce one snap of ``visit`` on the given detectors.

        Returns the raw-arrival notifications, stamped when each raw was written.
        """
        obs = SimulatedObservation(
            exptime_s=self.sim.exposure_time_s,
            seeing_fwhm_arcsec=self.seeing_arcsec(visit),
            sky_e_per_px_per_s=self.sim.sky_e_per_px_per_s,
            band=visit.filter_band,
        )
        day_obs = int(visit.day_obs)
        seq = self.seq_num(visit, snap)
        shutter_s = visit.startTime - self.start_time + snap * self.sim.exposure_time_s
        catalog, transients_truth = science_catalog(
            self.catalog,
            self.transients,
            shutter_s,
            obs.exptime_s,
            obs.band,
            zero_point_mag=obs.zero_point_mag,
            pixel_scale_arcsec=self.instrument.pixel_scale_arcsec,
        )
        self.raw_store.write_parquet(transients_truth_key(visit.groupId, snap), transients_truth)
        trails = self.sky_streaks(visit, snap).to_pylist() if self.realistic else []
        if self.realistic:
            catalog = label_transients(catalog, self.transients)
        arrivals = []
        for name in detectors or self.detectors:
            det = self.instrument.detector(name)
            calibs = self._calibs.get(name)
            if calibs is None:
                calibs = self._calibs[name] = make_calibrations(
                    self.instrument, det, seed=self.sim.seed
                )
            wcs = self.true_wcs(visit, name)
            seed = int(visit.private_seqNum) * 10_000 + det.id * 10 + snap + self.sim.seed
            truth: SimTruth
            if self.realistic:
                psf = self.science_psf(visit, name)
                segments, truth = render_realistic(
                    catalog,
                    self.instrument,
                    det,
                    wcs,
                    obs,
                    calibs,
                    psf,
                    seed=seed,
                    cosmic_rays=self.sim.cosmic_rays_per_detector,
                    streaks=[streak_on_detector(row, wcs) for row in trails],
                    bleed=self.sim.realistic.bleed,
                )
                group = visit.groupId
                self.raw_store.write_json(psf_truth_key(group, name, snap), psf.to_dict())
                self.raw_store.write_parquet(streaks_truth_key(group, name, snap), truth.streaks)
                self.raw_store.write_parquet(
                    bleed_truth_key(group, name, snap), bleed_runs(truth.bleed_mask)
                )
            else:
                segments, truth = render_detector(
                    catalog,
                    self.instrument,
                    det,
                    wcs,
                    obs,
                    calibs,
                    seed=seed,
                    cosmic_rays=self.sim.cosmic_rays_per_detector,
                )
            oid = obs_id(self.instrument.obs_id_prefix, day_obs, seq)
            header = {
                "INSTRUME": self.instrument.name,
                "DETNAME": name,
                "DETECTOR": det.id,
                "OBSID": oid,
                "GROUPID": visit.groupId,
                "EXPID": day_obs * 100_000 + seq,
                "EXPTIME": obs.exptime_s,
                "DARKTIME": obs.exptime_s,
                "DATE-OBS": datetime.fromtimestamp(visit.startTime, tz=UTC).isoformat(),
                "MJD-OBS": unix_to_mjd_utc(visit.startTime),
                "FILTER": visit.filters,
                "RA": visit.ra_deg,
                "DEC": visit.dec_deg,
                "ROTPA": visit.cameraAngle,
                "SNAP": snap,
                "DAYOBS": day_obs,
                "SEQNUM": seq,
                "CURINDEX": snap + 1,
                "MAXINDEX": max(visit.nimages, 1),
            }
            key = raw_key(self.instrument.name, self.instrument.obs_id_prefix, day_obs, seq, name)
            self.raw_store.write_parquet(truth_key(visit.groupId, name, snap), truth.stars)
            # Sidecar first: a raw is announced only once both are there.
            self.raw_store.write_json(sidecar_key(key), header)
            uri = self.raw_store.write_bytes(key, write_raw(segments, header, self.instrument, det))
            arrivals.append(raw_arrival(key, header, uri, arrived_at=time.time()))
        return arrivals
