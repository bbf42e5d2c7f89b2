"""The ``ppray`` command line.

It lives in the Ray layer because every command but ``simulate``, ``alerts``,
``instruments`` and ``diff`` starts or joins Ray; the pure parts (config, simulator, report
formatting) are in ``ppray``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ppray.alerts.packet import validate_alert
from ppray.alerts.sinks import read_alert_file
from ppray.config import DeploymentConfig, load_config
from ppray.errors import PprayError
from ppray.instrument import list_instruments, load_instrument
from ppray.messages import Event, NextVisit
from ppray.messaging import DirectorySource, EventSource, Inbound, InMemoryBus
from ppray.report import format_alert_table, format_event, format_visit_table
from ppray.schema import load_alert_schema
from ppray.sim.observatory import SimulatedObservatory
from ppray.storage import Storage

from .calib_cli import add_calib_parser

__all__ = ["main"]

_DONE_KINDS = {"visit_done", "calib_done", "timed_out"}


def _config(args: argparse.Namespace) -> DeploymentConfig:
    cfg = load_config(args.config)
    cfg.s3.configure()
    if getattr(args, "output", None):
        cfg = cfg.rooted_at(args.output)
    changes: dict[str, Any] = {}
    if getattr(args, "visits", None):
        changes["sim"] = {**cfg.sim.model_dump(), "n_visits": args.visits}
    if getattr(args, "inbox", None):
        changes["source"] = {**cfg.source.model_dump(), "kind": "directory", "path": args.inbox}
    if getattr(args, "kafka", None):
        base = cfg.kafka.model_dump() if cfg.kafka is not None else {}
        changes["kafka"] = {**base, "bootstrap_servers": args.kafka}
        if args.command == "run":
            changes["source"] = {**cfg.source.model_dump(), "kind": "kafka"}
            changes["alerts"] = {**cfg.alerts.model_dump(), "sink": "kafka"}
    return cfg.with_overrides(**changes) if changes else cfg


def _printer(t0: float, verbose: bool, done: dict[str, Event]) -> Any:
    def on_event(event: Event) -> None:
        line = format_event(event, t0, verbose)
        if line:
            print(line, flush=True)
        if event.kind in _DONE_KINDS:
            done[event.group_id] = event

    return on_event


def _start(cfg: DeploymentConfig) -> Any:
    from .factory import init_ray
    from .runtime import deploy

    url = init_ray(cfg)
    if url:
        print(f"Ray dashboard: {url}", flush=True)
    print(
        f"starting {len(cfg.detectors or load_instrument(cfg.instrument).detectors)} "
        f"detector workers for {cfg.instrument} ...",
        flush=True,
    )
    return deploy(cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate visits on the synthetic camera and process them on a local Ray."""
    import ray

    from .runtime import play_simulation, pump

    cfg = _config(args)
    n = cfg.sim.n_visits
    observatory = SimulatedObservatory(cfg)
    print(f"writing master calibrations to {cfg.calib_root} ...", flush=True)
    observatory.write_reference_data()
    deployment = _start(cfg)
    bus = InMemoryBus()
    visits: list[NextVisit] = []
    done: dict[str, Event] = {}
    t0 = time.time()
    print(f"simulating {n} visits (time scale {cfg.sim.time_scale:g}) ...", flush=True)
    play_simulation(observatory, bus, n, on_visit=visits.append)
    deadline = time.monotonic() + n * cfg.sim.visit_interval_s * cfg.sim.time_scale + 300
    try:
        pump(
            deployment,
            bus,
            stop=lambda: len(done) >= n or time.monotonic() > deadline,
            on_event=_printer(t0, args.verbose, done),
        )
        summaries = [s for v in visits if (s := deployment.wait_visit(v, 1.0)) is not None]
    finally:
        deployment.shutdown()
        ray.shutdown()
    print()
    print(format_visit_table(summaries))
    print(f"\noutputs under {Storage(cfg.output_root).uri('x')[:-2]}")
    ok = len(summaries) == n and all(s.n_ok == s.n_expected for s in summaries)
    return 0 if ok else 1


def _no_output(event: Event) -> None:
    """Directory sources publish nothing beyond the progress lines."""


def cmd_run(args: argparse.Namespace) -> int:
    """The long-running service: read next_visit / raw events from the configured source."""
    import ray

    from .runtime import pump

    cfg = _config(args)
    source: EventSource
    on_rejected: Callable[[Inbound], None] | None = None
    on_output: Callable[[Event], None] = _no_output
    closers: list[Callable[[], None]] = []
    if cfg.source.kind == "directory":
        source = DirectorySource(cfg.source.path, cfg.raw_root, cfg.source.poll_interval_s)
        print(
            f"watching {cfg.source.path} for next_visit JSON and {cfg.raw_root} for raws",
            flush=True,
        )
    elif cfg.source.kind == "kafka":
        source, on_rejected, on_output, closers = _kafka_io(cfg)
    else:
        print(
            "source.kind 'memory' has no external producer; use `ppray demo`, or set "
            "source.kind: directory or kafka",
            file=sys.stderr,
        )
        return 2
    deployment = _start(cfg)
    done: dict[str, Event] = {}
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    last_activity = [time.monotonic()]

    on_event = _printer(time.time(), args.verbose, done)

    def track(event: Event) -> None:
        last_activity[0] = time.monotonic()
        on_event(event)
        on_output(event)

    def stop() -> bool:
        if args.max_visits and len(done) >= args.max_visits:
            return True
        if args.idle_exit_s and time.monotonic() - last_activity[0] > args.idle_exit_s:
            return True
        return stopping.is_set()

    try:
        pump(deployment, source, stop=stop, on_event=track, on_rejected=on_rejected)
    except KeyboardInterrupt:
        print("interrupted; shutting down", flush=True)
    finally:
        source.close()
        for close in closers:
            close()
        deployment.shutdown()
        ray.shutdown()
    print(f"{len(done)} visits done")
    return 0


def _kafka_io(
    cfg: DeploymentConfig,
) -> tuple[
    EventSource, Callable[[Inbound], None], Callable[[Event], None], list[Callable[[], None]]
]:
    """The Kafka source, and the dead-letter and events publishers of ``ppray run``."""
    from ppray.kafka.client import ensure_topics
    from ppray.kafka.sinks import JsonPublisher, dead_letter_record, event_record
    from ppray.kafka.source import KafkaSource

    kcfg = cfg.kafka
    assert kcfg is not None  # DeploymentConfig requires it for source.kind kafka
    if kcfg.create_topics:
        ensure_topics(kcfg)
    instrument = load_instrument(cfg.instrument)
    source = KafkaSource(
        kcfg,
        cfg.raw_root,
        instrument=instrument,
        detectors=tuple(cfg.detectors or instrument.detector_names),
    )
    dead = JsonPublisher(kcfg, kcfg.topics.dead_letter)
    events = JsonPublisher(kcfg, kcfg.topics.events)

    def on_rejected(item: Inbound) -> None:
        # Flushed before the offset is committed: a dead letter is never lost.
        dead.send([dead_letter_record(item)])

    def on_output(event: Event) -> None:
        if kcfg.publish_events:
            events.send([event_record(event)], flush=False)

    print(
        f"consuming {kcfg.topics.next_visit} and {kcfg.topics.raw_arrival} from "
        f"{kcfg.describe()} as group {kcfg.group_id}; alerts -> {kcfg.topics.alerts}",
        flush=True,
    )
    return source, on_rejected, on_output, [dead.close, events.close]


def cmd_simulate(args: argparse.Namespace) -> int:
    """Play the observatory into directories: next_visit JSON in the inbox, raws in raw_root."""
    cfg = _config(args)
    observatory = SimulatedObservatory(cfg)
    if args.kafka:
        return _simulate_kafka(cfg, observatory)
    inbox = Storage(cfg.source.path)
    observatory.write_reference_data()
    print(
        f"calibrations in {cfg.calib_root}; next_visit -> {cfg.source.path}; "
        f"raws -> {cfg.raw_root}",
        flush=True,
    )
    for msg in observatory.play(cfg.sim.n_visits):
        if msg.kind == "next_visit":
            inbox.write_bytes(f"{msg.visit.groupId}.json", msg.visit.model_dump_json().encode())
            print(f"next_visit {msg.visit.groupId}", flush=True)
        else:
            raws = observatory.expose(msg.visit, msg.snap)
            print(f"  {len(raws)} raws for {msg.visit.groupId} snap {msg.snap}", flush=True)
    return 0


def _simulate_kafka(cfg: DeploymentConfig, observatory: SimulatedObservatory) -> int:
    """Play the observatory on Kafka: next_visit records and S3 raw notifications."""
    from ppray.kafka.client import ensure_topics
    from ppray.kafka.publish import ObservatoryPublisher, play_to_kafka

    kcfg = cfg.kafka
    assert kcfg is not None  # set from --kafka
    if kcfg.create_topics:
        ensure_topics(kcfg)
    observatory.write_reference_data()
    print(
        f"calibrations in {cfg.calib_root}; raws -> {cfg.raw_root}; next_visit -> "
        f"{kcfg.topics.next_visit}, notifications -> {kcfg.topics.raw_arrival} on "
        f"{kcfg.describe()}",
        flush=True,
    )

    def show(kind: str, visit: NextVisit, n: int) -> None:
        if kind == "next_visit":
            print(f"next_visit {visit.groupId}", flush=True)
        else:
            print(f"  {n} raws for {visit.groupId} announced", flush=True)

    publisher = ObservatoryPublisher(kcfg, cfg.raw_root)
    try:
        play_to_kafka(observatory, publisher, cfg.sim.n_visits, on_message=show)
    finally:
        publisher.close()
    return 0


def cmd_instruments(args: argparse.Namespace) -> int:
    for name in list_instruments():
        inst = load_instrument(name)
        print(
            f"{name:<12} {inst.name:<12} {len(inst.detectors):>4} detectors "
            f"{inst.layout.nx}x{inst.layout.ny} px, {inst.layout.amps_x * inst.layout.amps_y} "
            f'amps, {inst.pixel_scale_arcsec}"/px'
        )
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    """Print (and optionally validate) the alerts in Avro files or directories of them."""
    files: list[Path] = []
    for name in args.paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(path.rglob("*.avro")))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
    if not files:
        raise ValueError(f"no .avro alert files under {', '.join(args.paths)}")
    schema = load_alert_schema()
    alerts, invalid = [], 0
    for path in files:
        for alert in read_alert_file(path.read_bytes()):
            alerts.append(alert)
            if args.validate:
                try:
                    validate_alert(alert, schema)
                except Exception as exc:  # fastavro names the field
                    invalid += 1
                    print(f"{path}: alert {alert.get('diaSourceId')}: {exc}", file=sys.stderr)
    print(format_alert_table(alerts[: args.limit] if args.limit else alerts))
    print(f"{len(alerts)} alerts in {len(files)} files (schema {schema.version_string})")
    if args.validate:
        print(f"{len(alerts) - invalid} valid, {invalid} invalid")
    return 1 if invalid else 0


def _hdu(text: str) -> int | str:
    """An HDU by index (digits) or EXTNAME."""
    return int(text) if text.isdigit() else text


def cmd_diff(args: argparse.Namespace) -> int:
    """Difference imaging of two calibrated FITS images, without Ray."""
    from ppray.fitsdiff import (
        DiffOptions,
        ImageOptions,
        difference_fits,
        format_summary,
        write_products,
    )

    def image_options(prefix: str, gain: str, sat: str, rn: str, seeing: str) -> ImageOptions:
        value = vars(args)
        return ImageOptions(
            hdu=value[f"{prefix}_hdu"],
            variance_hdu=value[f"{prefix}_variance_hdu"],
            weight_hdu=value[f"{prefix}_weight_hdu"],
            mask_hdu=value[f"{prefix}_mask_hdu"],
            gain=value[gain],
            saturation=value[sat],
            read_noise_e=value[rn],
            seeing_arcsec=value[seeing],
            sky=value[f"{prefix}_sky"],
        )

    options = DiffOptions(
        science=image_options("science", "gain", "saturation", "read_noise", "seeing_arcsec"),
        template=image_options(
            "template",
            "template_gain",
            "template_saturation",
            "template_read_noise",
            "template_seeing_arcsec",
        ),
        threshold_sigma=args.threshold,
        refcat=args.refcat,
        refcat_ra=args.refcat_ra,
        refcat_dec=args.refcat_dec,
        refcat_mag=args.refcat_mag,
        template_cosmic_rays=not args.no_template_cosmic_rays,
    )
    products = difference_fits(args.science, args.template, options)
    png = None if args.no_png else (args.png or Path(args.out) / "diff.png")
    try:
        outputs = write_products(products, args.out, png=png, n_cutouts=args.cutouts)
    except OSError as exc:  # an output path that cannot be written is bad input too
        raise PprayError(f"cannot write the outputs to {args.out}: {exc}") from exc
    print(format_summary(products, outputs))
    return 0


def _add_diff_parser(sub: Any) -> None:
    diff = sub.add_parser(
        "diff",
        help="difference imaging of two calibrated FITS images (any camera, no Ray)",
        description="Subtract TEMPLATE from SCIENCE (calibrated images with a celestial WCS) "
        "and detect what changed. Header keywords give the gain, saturation, read noise and "
        "seeing (docs/science.md, 'ppray diff'); the options below override them.",
    )
    diff.add_argument("science", help="the science image (FITS)")
    diff.add_argument("template", help="the template image (FITS), warped onto the science")
    for role in ("science", "template"):
        group = diff.add_argument_group(f"{role} image: HDUs (an index or an EXTNAME), sky")
        group.add_argument(
            f"--{role}-hdu",
            type=_hdu,
            metavar="H",
            help="the image (default: the first HDU with 2-D data)",
        )
        group.add_argument(
            f"--{role}-variance-hdu", type=_hdu, metavar="H", help="variance, image units squared"
        )
        group.add_argument(
            f"--{role}-weight-hdu",
            type=_hdu,
            metavar="H",
            help="inverse variance (not relative weights)",
        )
        group.add_argument(f"--{role}-mask-hdu", type=_hdu, metavar="H", help="non-zero is bad")
        group.add_argument(
            f"--{role}-sky",
            type=float,
            metavar="LEVEL",
            help="sky level already subtracted (image units), for the variance",
        )
    values = diff.add_argument_group(
        "values instead of the headers' (the science's also serve a template without them)"
    )
    values.add_argument(
        "--gain",
        type=float,
        metavar="E_PER_ADU",
        help="electrons per image unit (the exposure time for e-/s images)",
    )
    values.add_argument("--saturation", type=float, metavar="S", help="image units")
    values.add_argument("--read-noise", type=float, metavar="R", help="electrons")
    values.add_argument("--seeing-arcsec", type=float, metavar="F", help="FWHM first guess")
    values.add_argument("--template-gain", type=float, metavar="E_PER_ADU")
    values.add_argument("--template-saturation", type=float, metavar="S")
    values.add_argument("--template-read-noise", type=float, metavar="R")
    values.add_argument("--template-seeing-arcsec", type=float, metavar="F")
    diff.add_argument(
        "--refcat",
        metavar="FILE",
        help="reference catalogue (Parquet, CSV, FITS) for astrometry and the "
        "zero point; without one: the image's WCS and no zero point",
    )
    diff.add_argument("--refcat-ra", default="ra", metavar="NAME", help="column (deg)")
    diff.add_argument("--refcat-dec", default="dec", metavar="NAME", help="column (deg)")
    diff.add_argument("--refcat-mag", default="mag", metavar="NAME", help="column (AB mag)")
    diff.add_argument(
        "--threshold",
        type=float,
        default=5.0,
        metavar="SIGMA",
        help="DIA detection threshold (default 5)",
    )
    diff.add_argument(
        "--no-template-cosmic-rays",
        action="store_true",
        help="skip the template's cosmic rays (a coadd has none)",
    )
    diff.add_argument(
        "--out", default="ppray-diff", metavar="DIR", help="output directory (default ./ppray-diff)"
    )
    png = diff.add_mutually_exclusive_group()
    png.add_argument("--png", metavar="FILE", help="the diagnostic picture (default OUT/diff.png)")
    png.add_argument("--no-png", action="store_true", help="draw no picture")
    diff.add_argument(
        "--cutouts", type=int, default=8, metavar="N", help="cutout rows in the picture (default 8)"
    )
    diff.set_defaults(func=cmd_diff)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppray", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="Python logging level")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="deployment YAML (default: the embedded local one)")
        p.add_argument("--output", help="root for out/, raw/ and calib/ (overrides config)")
        p.add_argument("-v", "--verbose", action="store_true", help="show every event")

    demo = sub.add_parser("demo", help="simulate and process a few visits on a local Ray")
    common(demo)
    demo.add_argument("--visits", type=int, help="number of visits (default from config: 3)")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the service on the configured event source")
    common(run)
    run.add_argument("--inbox", help="watch this directory for next_visit JSON (directory source)")
    run.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        help="consume from and publish to this Kafka (sets source.kind and alerts.sink: kafka)",
    )
    run.add_argument("--max-visits", type=int, default=0, help="exit after N visits (0: never)")
    run.add_argument(
        "--idle-exit-s",
        type=float,
        default=0.0,
        help="exit after this long without events (0: never)",
    )
    run.set_defaults(func=cmd_run)

    sim = sub.add_parser("simulate", help="play the simulated observatory into directories")
    common(sim)
    sim.add_argument("--inbox", help="directory to write next_visit JSON into")
    sim.add_argument("--visits", type=int, help="number of visits")
    sim.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        help="publish next_visit and raw notifications to this Kafka instead of the inbox",
    )
    sim.set_defaults(func=cmd_simulate)

    alerts = sub.add_parser("alerts", help="print the alerts in Avro files or directories")
    alerts.add_argument("paths", nargs="+", help="alert files or directories (searched for .avro)")
    alerts.add_argument("--validate", action="store_true", help="check each against the schema")
    alerts.add_argument("--limit", type=int, default=0, help="print at most N rows (0: all)")
    alerts.set_defaults(func=cmd_alerts)

    add_calib_parser(sub, common)
    _add_diff_parser(sub)

    inst = sub.add_parser("instruments", help="list the known instruments")
    inst.set_defaults(func=cmd_instruments)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args)
    except (ValueError, PprayError) as exc:  # bad config, arguments, broker: say what
        # One line for the user; the traceback and its cause chain at --log-level debug.
        logging.getLogger(__name__).debug("command failed", exc_info=exc)
        print(f"ppray: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
