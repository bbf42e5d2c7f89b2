"""Human-readable progress lines and visit tables for the CLI."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ppray.messages import Event, VisitSummary

if TYPE_CHECKING:
    from ppray.calib.registry import CalibRecord
    from ppray.calib.results import CalibSummary

__all__ = [
    "format_alert_table",
    "format_calib_records",
    "format_calib_table",
    "format_event",
    "format_visit_table",
]

_QUIET = {"raw_arrived", "processed"}


def format_event(event: Event, t0: float, verbose: bool = False) -> str | None:
    """One progress line for an event, or None for per-raw chatter unless ``verbose``."""
    if event.kind in _QUIET and not verbose and event.level == "info":
        return None
    where = "/".join(p for p in (event.group_id, event.detector) if p)
    extra = ""
    if event.kind == "visit_done":
        d = event.data
        extra = (
            f"ok={d['n_ok']} failed={d['n_failed']} timed_out={d['n_timed_out']} "
            f"sources={d['n_sources']} latency={d['latency_s'] or 0:.2f}s"
        )
    elif event.kind == "preloaded":
        extra = f"broadcast={event.data['broadcast_s'] * 1000:.1f}ms"
    elif event.kind == "visit_accepted":
        extra = f"detectors={event.data['detectors']} filter={event.data['filters']}"
        if event.data.get("calibration"):
            extra += f" {event.data['calibration']} x{event.data['nimages']}"
    elif event.kind == "calib_done":
        d = event.data
        ids = ", ".join(i for v in d["calib_ids"].values() for i in v)
        extra = f"{d['calibration']} ok={d['n_ok']} failed={d['n_failed']} certified: {ids or '-'}"
    elif event.kind == "calib_certified":
        d = event.data
        extra = f"{d['calibration']} inputs={d['n_inputs']}"
    message = f" {event.message}" if event.message else ""
    tag = "" if event.level == "info" else f" [{event.level.upper()}]"
    return f"[{event.time - t0:7.2f}s] {event.kind:<15} {where}{tag} {extra}{message}".rstrip()


def format_visit_table(summaries: Sequence[VisitSummary]) -> str:
    """A fixed-width table: one row per visit."""
    header = (
        f"{'group':<28} {'exposure':>14} {'det ok/all':>10} {'failed':>6} "
        f"{'t/o':>4} {'sources':>8} {'dia':>5} {'alerts':>6} {'latency_s':>9}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        latency = f"{s.latency_s:9.2f}" if s.latency_s is not None else f"{'-':>9}"
        lines.append(
            f"{s.group_id:<28} {s.exposure_id or '-':>14} {f'{s.n_ok}/{s.n_expected}':>10} "
            f"{s.n_failed:>6} {s.n_timed_out:>4} {s.n_sources:>8} {s.n_dia_sources:>5} "
            f"{s.n_alerts:>6} {latency}"
        )
    return "\n".join(lines)


def _num(value: float | None, width: int, fmt: str) -> str:
    if value is None or not math.isfinite(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}{fmt}}"


# Columns of the calibration quality table: product metric, header, width, format.
_QUALITY_COLUMNS = (
    ("n_inputs", "inputs", 6, ".0f"),
    ("median", "median", 10, ".4g"),
    ("noise", "noise", 9, ".3g"),
    ("noise_ratio", "noise/model", 11, ".2f"),
    ("pixel_rms", "pixel_rms", 9, ".3g"),
    ("large_scale_residual_rms", "ls_resid", 9, ".3g"),
    ("focal_plane_factor", "fp_factor", 9, ".4f"),
)


def format_calib_table(summaries: Sequence[CalibSummary]) -> str:
    """A fixed-width table: one row per sequence, detector and product, with its quality."""
    header = (
        f"{'sequence':<14} {'detector':<9} {'product':<8} {'status':<9} "
        + " ".join(f"{h:>{w}}" for _, h, w, _ in _QUALITY_COLUMNS)
        + f" {'defects':>7}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        for det, status in sorted(s.detectors.items()):
            products = s.quality.get(det) or {s.kind: {}}
            for product, q in products.items():
                if product == "defects":
                    continue
                cells = " ".join(_num(q.get(m), w, f) for m, _, w, f in _QUALITY_COLUMNS)
                n_def = (s.quality.get(det, {}).get("defects") or {}).get("n_defect_pixels")
                lines.append(
                    f"{s.kind + (f' {s.band}' if s.band else ''):<14} {det:<9} {product:<8} "
                    f"{status:<9} {cells} {_num(n_def, 7, '.0f')}"
                )
    return "\n".join(lines)


def _when(t: float | None) -> str:
    if t is None:
        return "open"
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def format_calib_records(records: Sequence[CalibRecord]) -> str:
    """A fixed-width table of certified calibrations: one row per record."""
    header = (
        f"{'kind':<8} {'detector':<9} {'band':<4} {'valid_from':<19} {'valid_to':<19} "
        f"{'calib_id':<44} {'inputs':>6} {'noise':>9} {'fp_factor':>9} {'defect_px':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in sorted(records, key=lambda r: (r.kind, r.detector, r.valid_from, r.calib_id)):
        q = r.quality
        lines.append(
            f"{r.kind:<8} {r.detector:<9} {r.band or '-':<4} {_when(r.valid_from):<19} "
            f"{_when(r.valid_to):<19} {r.calib_id:<44} {_num(q.get('n_inputs'), 6, '.0f')} "
            f"{_num(q.get('noise'), 9, '.3g')} {_num(q.get('focal_plane_factor'), 9, '.4f')} "
            f"{_num(q.get('n_defect_pixels'), 9, '.0f')}"
        )
    return "\n".join(lines)


def format_alert_table(alerts: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: one row per alert (its DiaSource, DiaObject and history)."""
    header = (
        f"{'diaSourceId':>20} {'diaObjectId':>20} {'ra':>11} {'dec':>10} {'band':>4} "
        f"{'psfFlux_nJy':>12} {'snr':>7} {'nDiaSrc':>7} {'prv':>4} {'kind':<8}"
    )
    lines = [header, "-" * len(header)]
    for alert in alerts:
        src, obj = alert["diaSource"], alert.get("diaObject") or {}
        kinds = [n for n, f in (("neg", "isNegative"), ("dipole", "isDipole")) if src.get(f)]
        if src.get("trailLength") is not None:
            kinds.append("trail")
        kind = ",".join(kinds) or ("known" if alert.get("prvDiaSources") else "new")
        flux, snr = src.get("psfFlux"), src.get("snr")
        flux_s = "-" if flux is None else f"{flux:.1f}"
        snr_s = "-" if snr is None else f"{snr:.1f}"
        lines.append(
            f"{src['diaSourceId']:>20} {src.get('diaObjectId') or '-':>20} {src['ra']:>11.6f} "
            f"{src['dec']:>10.6f} {src.get('band') or '-':>4} "
            f"{flux_s:>12} {snr_s:>7} "
            f"{obj.get('nDiaSources', '-'):>7} {len(alert.get('prvDiaSources') or []):>4} "
            f"{kind:<8}"
        )
    return "\n".join(lines)
