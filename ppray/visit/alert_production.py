"""After DIA detection: association, forced photometry, APDB rows and alert packets.

:func:`produce_alerts` is the last part of a detector's pipeline. Its order
follows Rubin's Alert Production: the DIA sources become ``DiaSource`` rows
(nJy, sky units) and are associated on the APDB's sky shards; the DiaObjects
known before the visit get forced photometry on the difference and science
images; then one alert per DiaSource is built (history, object, three
cutouts), serialised in the newest ``lsst-alert-packet`` schema and handed to
the sink; the rows this detector made or changed go to the APDB's Parquet
files. A failure there degrades the result (flag, logged), the DIA sources
on disk are kept, and a retry of the detector replaces its rows and alerts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ppray.alerts.diasource import VisitInfo, dia_source_table
from ppray.alerts.forced import forced_photometry, psf_fluxes
from ppray.alerts.packet import AlertBatch
from ppray.alerts.sinks import AlertSink
from ppray.apdb.backend import ApdbStore
from ppray.apdb.service import AssociationService
from ppray.image import Exposure
from ppray.science.psf import PsfLike
from ppray.visit.steps import StepTimer

__all__ = ["AlertOptions", "AlertProduction", "produce_alerts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlertOptions:
    """How alerts are packaged."""

    cutout_size: int = 30
    confluent_wire_format: bool = True
    schema_id: int | None = None
    min_reliability: float = 0.0


@dataclass(frozen=True)
class AlertProduction:
    """What :func:`produce_alerts` made."""

    n_alerts: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def _reliable(dia_sources: pa.Table, threshold: float) -> pa.Table:
    """The DIA sources with a reliability of at least ``threshold`` (all of them when
    none was scored: ``reliability`` absent or null)."""
    if threshold <= 0 or "reliability" not in dia_sources.column_names:
        return dia_sources
    score = dia_sources["reliability"]
    keep = pc.or_kleene(pc.is_null(score), pc.greater_equal(score, threshold))
    return dia_sources.filter(keep)


def _latest(objects: list[pa.Table]) -> pa.Table:
    """The union of DiaObject row sets, a later set's row winning for the same id."""
    objects = [t for t in objects if t.num_rows]
    if not objects:
        return pa.table({})
    kept = [objects[-1]]
    seen = objects[-1]["diaObjectId"]
    for table in reversed(objects[:-1]):
        table = table.filter(pc.invert(pc.is_in(table["diaObjectId"], value_set=seen)))
        kept.append(table)
        seen = pa.concat_arrays([seen.combine_chunks(), table["diaObjectId"].combine_chunks()])
    return pa.concat_tables(kept, promote_options="permissive").sort_by("diaObjectId")


def produce_alerts(
    dia: pa.Table,
    info: VisitInfo,
    *,
    difference: Exposure,
    science: Exposure,
    template: Exposure | None,
    psf: PsfLike,
    known_objects: pa.Table | None,
    association: AssociationService,
    sink: AlertSink | None,
    apdb: ApdbStore | None,
    alert_key: str,
    options: AlertOptions = AlertOptions(),
    timer: StepTimer | None = None,
) -> AlertProduction:
    """Associate a detector's DIA sources, force-photometer known objects, emit alerts.

    Parameters
    ----------
    dia
        The detector's DIA sources (:func:`ppray.science.dia.detect_dia_sources`,
        with ``detector`` and ``exposure_id`` columns).
    info
        Visit, detector, band, times and zero point.
    difference, science, template
        The difference, the calibrated science exposure and the template warped
        to it: measurement and cutouts.
    psf
        The difference image's PSF (a :class:`~ppray.science.psf.PsfModel`, or a
        Gaussian sigma in px): science fluxes and forced photometry.
    known_objects
        DiaObjects preloaded for the footprint as they were before the visit
        (:meth:`ppray.apdb.shard.ApdbShard.preload`), for forced photometry.
    association
        The APDB shards.
    sink
        Where the serialised alerts go (None: built, not delivered).
    apdb
        Where the rows go (None: kept in the shards only).
    alert_key
        The sink's key for this detector and visit.
    options
        Cutout size and wire format.
    timer
        Records ``associate``, ``forced``, ``alerts`` and ``apdb_write``.
    """
    timer = timer or StepTimer({})
    flags: list[str] = []
    outputs: dict[str, str] = {}
    x = dia["x"].to_numpy(zero_copy_only=False)
    y = dia["y"].to_numpy(zero_copy_only=False)
    with timer("associate"):
        science_flux = psf_fluxes(science, x, y, psf)
        rows = dia_source_table(dia, info, wcs=difference.wcs, science_flux=science_flux)
        result = association.associate(rows)
    metrics = {
        "n_dia_objects_matched": float(result.n_matched),
        "n_dia_objects_new": float(result.n_new),
    }
    forced = None
    updated: list[pa.Table] = [result.dia_objects]
    if known_objects is not None and known_objects.num_rows:
        with timer("forced"):
            forced = forced_photometry(
                known_objects, info, difference=difference, science=science, psf=psf
            )
            try:
                updated.append(association.record_forced(forced))
            except ValueError as exc:
                flags.append(f"forced_photometry_not_recorded: {exc}")
        metrics["n_dia_forced_sources"] = float(forced.num_rows)
    objects = _latest(updated)
    alerted = _reliable(result.dia_sources, options.min_reliability)
    metrics["n_dia_unreliable"] = float(result.dia_sources.num_rows - alerted.num_rows)
    with timer("alerts"):
        blobs = AlertBatch(
            alerted,
            objects if objects.num_rows else result.dia_objects,
            result.prv_dia_sources,
            result.prv_dia_forced_sources,
            difference=difference,
            science=science,
            template=template,
            cutout_size=options.cutout_size,
            njy_per_electron=info.njy_per_electron,
        ).serialized(confluent=options.confluent_wire_format, schema_id=options.schema_id)
        if sink is not None:
            outputs["alerts"] = sink.write(alert_key, blobs)
    if apdb is not None:
        with timer("apdb_write"):
            apdb.write(
                info.visit,
                info.detector,
                dia_sources=result.dia_sources,
                dia_forced_sources=forced,
                dia_objects=objects if objects.num_rows else None,
            )
    metrics["n_alerts"] = float(len(blobs))
    return AlertProduction(len(blobs), outputs, flags, metrics)
