"""Human-readable progress lines and visit tables for the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .messages import Event, VisitSummary

__all__ = ["format_alert_table", "format_event", "format_visit_table"]

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
