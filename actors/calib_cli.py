"""``ppray calib``: calibration sequences through the actors, and the certified calibrations.

- ``ppray calib run --kind bias|dark|flat|all --exposures N [--band r]``: start a
  local Ray, deploy the workers, and play simulated calibration sequences
  (:class:`~ppray.sim.calib_sequence.CalibrationSimulator`: ``next_visit`` per
  sequence, raws into ``raw_root``) through the coordinator, as the observatory
  would; print progress and the quality table. ``all`` is an afternoon: bias,
  then dark, then flat, each corrected with the masters certified just before.
- ``ppray calib list``: the certified calibrations in ``calib_root``.
- ``ppray calib certify --kind K --detector D --file F.fits``: certify a master
  made elsewhere (a FITS image) with a validity range.

:func:`run_sequence` is the driver the CLI, the tests and the benchmark share.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ppray.calib.registry import CALIB_KINDS, CalibRegistry
from ppray.calib.results import CalibSummary
from ppray.calib.sequence import needed_masters
from ppray.config import DeploymentConfig, load_config
from ppray.instrument import load_instrument
from ppray.layout import calib_key
from ppray.messages import Event
from ppray.report import format_calib_records, format_calib_table, format_event
from ppray.sim.calib_exposures import NO_DEFECTS
from ppray.sim.calib_sequence import CalibrationSimulator, SequenceKind
from ppray.storage import Storage

if TYPE_CHECKING:
    from .runtime import Deployment

__all__ = ["add_calib_parser", "run_sequence"]

_ORDER: tuple[SequenceKind, ...] = ("bias", "dark", "flat")
_OVER = {"calib_done", "timed_out", "failed"}


class _EventTail:
    """The coordinator's events since the last look, to a callback."""

    def __init__(self, deployment: Deployment, on_event: Callable[[Event], None] | None) -> None:
        self.deployment = deployment
        self.on_event = on_event
        self.seq = deployment.events_since(0)[0]
        self.finished: set[str] = set()  # groups whose sequence is over

    def drain(self) -> None:
        self.seq, events = self.deployment.events_since(self.seq)
        for event in events:
            if event.kind in _OVER and not event.detector:
                self.finished.add(event.group_id)
            if self.on_event is not None:
                self.on_event(event)


def run_sequence(
    deployment: Deployment,
    simulator: CalibrationSimulator,
    kind: SequenceKind,
    n_exposures: int,
    *,
    band: str = "r",
    on_event: Callable[[Event], None] | None = None,
    on_exposure: Callable[[int], None] | None = None,
    timeout_s: float | None = None,
) -> CalibSummary:
    """Announce one calibration sequence, expose it, and return its summary.

    Parameters
    ----------
    deployment
        Running actors (:func:`ppray.actors.runtime.deploy`).
    simulator
        Makes the ``next_visit`` and the raws (written to ``raw_root``).
    kind, n_exposures, band
        The sequence: ``n_exposures`` of ``kind`` (flats in ``band``).
    on_event
        Called with each coordinator event as it appears.
    on_exposure
        Called after each exposure's raws were announced, with its snap.
    timeout_s
        How long to wait for the summary after the last raw (default: the
        sequence's own timeout plus a minute).

    Raises
    ------
    RuntimeError
        When the coordinator does not accept the sequence, or no summary comes.
    """
    tail = _EventTail(deployment, on_event)
    visit = simulator.sequence(kind, n_exposures, band=band)
    kinds = deployment.call("next_visit", visit)
    if "visit_accepted" not in kinds:
        raise RuntimeError(f"{kind} sequence {visit.groupId} not accepted: {kinds}")
    for snap in range(n_exposures):
        if visit.groupId in tail.finished:  # over already (every detector failed)
            break
        for raw in simulator.expose(visit, snap):
            deployment.call("raw_arrived", raw)
        if on_exposure is not None:
            on_exposure(snap)
        tail.drain()
    wait = (
        timeout_s
        if timeout_s is not None
        else visit.timeout_s(deployment.config.image_timeout_s) + 60.0
    )
    deadline = time.monotonic() + wait
    summary = None
    while summary is None and time.monotonic() < deadline:
        summary = deployment.wait_calib(visit, min(1.0, max(deadline - time.monotonic(), 0.01)))
        tail.drain()
    if not isinstance(summary, CalibSummary):
        raise RuntimeError(f"{kind} sequence {visit.groupId}: no summary within {wait:.0f} s")
    return summary


# --- commands ------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> DeploymentConfig:
    cfg = load_config(args.config)
    cfg.s3.configure()
    if getattr(args, "output", None):
        cfg = cfg.rooted_at(args.output)
    return cfg


def _time(text: str | None, what: str) -> float | None:
    """Unix seconds from ``text``: a number, or an ISO 8601 time (UTC unless it says)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{what}: {text!r} is neither unix seconds nor an ISO 8601 time") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _check_masters(
    cfg: DeploymentConfig, kinds: tuple[SequenceKind, ...], start: float, detectors: tuple[str, ...]
) -> None:
    """Refuse, before starting Ray, a run whose first sequence lacks a master it needs."""
    store = Storage(cfg.calib_root)
    registry = CalibRegistry(store, load_instrument(cfg.instrument).name)
    made: set[str] = set()
    for kind in kinds:
        for master in needed_masters(kind):
            if master in made:  # an earlier sequence of this run makes it
                continue
            for det in detectors:
                if registry.lookup(det, master, None, start) is not None:
                    continue
                if store.exists(calib_key(registry.instrument, det)):
                    continue
                raise ValueError(
                    f"{kind} sequences need a master {master}: none certified for {det} valid "
                    f"at {datetime.fromtimestamp(start, tz=UTC):%Y-%m-%dT%H:%M:%S} and no legacy "
                    f"calib.fits in {cfg.calib_root} (run `ppray calib run --kind {master}` "
                    "first, or --kind all)"
                )
        made.add(kind)


def cmd_calib_run(args: argparse.Namespace) -> int:
    """Simulated calibration sequences through the actors on a local Ray."""
    import ray

    from .factory import init_ray
    from .runtime import deploy

    if args.exposures < 1:
        raise ValueError(f"--exposures must be at least 1, not {args.exposures}")
    cfg = _config(args)
    calibration = cfg.calibration.model_dump()
    if args.valid_days is not None:
        if not args.valid_days > 0:
            raise ValueError(f"--valid-days must be > 0, not {args.valid_days}")
        calibration["validity_days"] = args.valid_days
    # Calibration sequences need no APDB shards.
    cfg = cfg.with_overrides(
        calibration=calibration, apdb={**cfg.apdb.model_dump(), "enabled": False}
    )
    instrument = load_instrument(cfg.instrument)
    if args.band not in instrument.filters:
        raise ValueError(f"--band {args.band!r}: {instrument.name} has {list(instrument.filters)}")
    kinds: tuple[SequenceKind, ...] = _ORDER if args.kind == "all" else (args.kind,)
    # Exactly the camera `ppray demo` simulates (no extra injected defects: the few
    # the finder would miss would show up as DIA sources in the demo's science visits).
    simulator = CalibrationSimulator(
        cfg, darktime_s=args.darktime, flat_flux_e=args.flux, injection=NO_DEFECTS
    )
    start = _time(args.start, "--start")
    if start is None:
        # The afternoon is over by now: the products are valid for the science visits
        # that follow (a flat valid from 20 minutes ahead would not be used yet).
        start = time.time() - sum(simulator.duration_s(k, args.exposures) for k in kinds)
    simulator.start_time = start
    detectors = tuple(cfg.detectors or instrument.detector_names)
    _check_masters(cfg, kinds, start, detectors)
    url = init_ray(cfg)
    if url:
        print(f"Ray dashboard: {url}", flush=True)
    print(f"starting {len(detectors)} detector workers for {cfg.instrument} ...", flush=True)
    deployment = deploy(cfg)
    t0 = time.time()

    def show(event: Event) -> None:
        line = format_event(event, t0, args.verbose)
        if line:
            print(line, flush=True)

    def progress(snap: int) -> None:
        if args.verbose:
            print(f"  exposure {snap + 1}/{args.exposures} announced", flush=True)

    summaries: list[CalibSummary] = []
    try:
        for kind in kinds:
            print(f"{kind}: {args.exposures} exposures on {len(detectors)} detectors", flush=True)
            summary = run_sequence(
                deployment,
                simulator,
                kind,
                args.exposures,
                band=args.band,
                on_event=show,
                on_exposure=progress,
            )
            summaries.append(summary)
            for det, reason in sorted(summary.reasons.items()):
                print(f"  {det}: {summary.detectors[det]}: {reason}", flush=True)
            if summary.n_ok == 0:
                print(f"no {kind} certified; stopping", flush=True)
                break
    finally:
        deployment.shutdown()
        ray.shutdown()
    print()
    print(format_calib_table(summaries))
    if any(s.n_ok for s in summaries):
        print(f"\ncertified into {cfg.calib_root}; `ppray calib list` shows them")
    ok = len(summaries) == len(kinds) and all(s.n_ok == s.n_expected for s in summaries)
    return 0 if ok else 1


def cmd_calib_list(args: argparse.Namespace) -> int:
    """The certified calibrations, optionally of one kind, detector or time."""
    cfg = _config(args)
    instrument = load_instrument(cfg.instrument)
    registry = CalibRegistry(Storage(cfg.calib_root), instrument.name)
    if args.detector is not None and not instrument.has_detector(args.detector):
        raise ValueError(f"{instrument.name} has no detector {args.detector!r}")
    records = registry.records(args.kind, args.detector)
    at = _time(args.valid_at, "--valid-at")
    if at is not None:
        records = [r for r in records if r.valid_at(at)]
    if not records:
        print(f"no certified calibrations in {cfg.calib_root} for {instrument.name}")
        return 0
    print(format_calib_records(records))
    print(f"{len(records)} certified calibrations")
    return 0


def _read_image(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from astropy.io import fits

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                if hdu.data is not None and np.ndim(hdu.data) == 2:
                    return np.array(hdu.data), dict(hdu.header)
    except OSError as exc:
        raise ValueError(f"{path}: not a FITS file ({exc})") from exc
    raise ValueError(f"{path}: no 2-D image in any HDU")


def cmd_calib_certify(args: argparse.Namespace) -> int:
    """Certify a master made elsewhere (a FITS image) for one detector."""
    cfg = _config(args)
    instrument = load_instrument(cfg.instrument)
    if not instrument.has_detector(args.detector):
        raise ValueError(f"{instrument.name} has no detector {args.detector!r}")
    image, _ = _read_image(Path(args.file))
    shape = (instrument.layout.ny, instrument.layout.nx)
    if image.shape != shape:
        raise ValueError(f"{args.file}: image shape {image.shape}, {args.detector} is {shape}")
    valid_from = _time(args.valid_from, "--valid-from")
    registry = CalibRegistry(Storage(cfg.calib_root), instrument.name)
    record = registry.certify(
        args.kind,
        args.detector,
        image,
        band=args.band,
        valid_from=valid_from if valid_from is not None else time.time(),
        valid_to=_time(args.valid_to, "--valid-to"),
        calib_id=args.calib_id,
        metadata={"SOURCE": Path(args.file).name[:60]},
    )
    print(format_calib_records([record]))
    return 0


def add_calib_parser(
    sub: Any, common: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """Add ``calib run|list|certify`` to the ``ppray`` command's subparsers."""
    calib = sub.add_parser("calib", help="calibration sequences and certified calibrations")
    verbs = calib.add_subparsers(dest="calib_command", required=True)

    run = verbs.add_parser("run", help="simulated calibration sequences through the actors")
    common(run)
    run.add_argument(
        "--kind",
        required=True,
        choices=[*_ORDER, "all"],
        help="one sequence, or all: bias, then dark, then flat",
    )
    run.add_argument("--exposures", type=int, default=10, help="exposures per sequence")
    run.add_argument("--band", default="r", help="filter band of the flats (default r)")
    run.add_argument(
        "--start",
        help="start of the first sequence and of the validity: "
        "unix seconds or ISO 8601 (default: so that the last sequence ends now)",
    )
    run.add_argument(
        "--valid-days",
        type=float,
        help="validity of the products (default calibration.validity_days: open)",
    )
    run.add_argument("--darktime", type=float, default=60.0, help="dark time of a dark, s")
    run.add_argument("--flux", type=float, default=20_000.0, help="flat level, e- per pixel")
    run.set_defaults(func=cmd_calib_run)

    lst = verbs.add_parser("list", help="list the certified calibrations")
    lst.add_argument("--config", help="deployment YAML (default: the embedded local one)")
    lst.add_argument("--output", help="root for out/, raw/ and calib/ (overrides config)")
    lst.add_argument("--kind", choices=CALIB_KINDS)
    lst.add_argument("--detector")
    lst.add_argument("--valid-at", help="only those valid at this time (unix s or ISO 8601)")
    lst.set_defaults(func=cmd_calib_list)

    cert = verbs.add_parser("certify", help="certify a master made elsewhere (FITS image)")
    cert.add_argument("--config", help="deployment YAML (default: the embedded local one)")
    cert.add_argument("--output", help="root for out/, raw/ and calib/ (overrides config)")
    cert.add_argument("--kind", required=True, choices=CALIB_KINDS)
    cert.add_argument("--detector", required=True)
    cert.add_argument("--file", required=True, help="FITS file; its first 2-D image")
    cert.add_argument("--band", help="filter band (flats only, required for them)")
    cert.add_argument("--valid-from", help="unix seconds or ISO 8601 (default: now)")
    cert.add_argument("--valid-to", help="unix seconds or ISO 8601 (default: open-ended)")
    cert.add_argument("--calib-id", help="identifier (default: made from kind, band, time)")
    cert.set_defaults(func=cmd_calib_certify)
    return calib
