"""Human-readable progress lines and visit tables for the CLI."""

from __future__ import annotations

from collections.abc import Sequence

from .messages import Event, VisitSummary

__all__ = ["format_event", "format_visit_table"]

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
        f"{'t/o':>4} {'sources':>8} {'dia':>5} {'latency_s':>9}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        latency = f"{s.latency_s:9.2f}" if s.latency_s is not None else f"{'-':>9}"
        lines.append(
            f"{s.group_id:<28} {s.exposure_id or '-':>14} {f'{s.n_ok}/{s.n_expected}':>10} "
            f"{s.n_failed:>6} {s.n_timed_out:>4} {s.n_sources:>8} {s.n_dia_sources:>5} {latency}"
        )
    return "\n".join(lines)
