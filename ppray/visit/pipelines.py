"""Which pipeline a visit gets: ordered rules per instrument, first match wins.

Rules (``pipelines.rules`` in the deployment config) match ``next_visit``'s
``survey`` with an fnmatch pattern and, optionally, its pointing against a sky
cone; the first that matches names the pipeline (``ap``, ``single_frame``,
``isr``, ``skip``); none matching, ``pipelines.default``. The choice needs only
``next_visit``, so a worker knows it when it prepares. A raw whose rotation
differs from what its ``next_visit`` announced by more than
``pipelines.max_rotation_offset_deg`` is flagged, as Rubin discards such visits.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ppray.config import Pipeline, PipelinesConfig
from ppray.messages import NextVisit
from ppray.skyregion import angular_separation_deg

__all__ = ["AP_DEFAULT", "PipelineChoice", "choose_pipeline", "rotation_offset_deg"]


@dataclass(frozen=True)
class PipelineChoice:
    """The pipeline chosen and the rule that chose it (for the outputs' provenance)."""

    pipeline: Pipeline
    rule: str


AP_DEFAULT = PipelineChoice("ap", "default")
"""Everything up to alerts, no rule involved."""


def choose_pipeline(config: PipelinesConfig, visit: NextVisit) -> PipelineChoice:
    """The first rule of ``visit.instrument`` that matches ``visit``, else the default."""
    for k, rule in enumerate(config.rules.get(visit.instrument, ())):
        if not fnmatch.fnmatchcase(visit.survey, rule.survey):
            continue
        if rule.region is not None:
            ra, dec, radius = rule.region
            if float(angular_separation_deg(visit.ra_deg, visit.dec_deg, ra, dec)) > radius:
                continue
        where = "" if rule.region is None else f", region={list(rule.region)}"
        return PipelineChoice(
            rule.pipeline, f"{visit.instrument}[{k}]: survey={rule.survey!r}{where}"
        )
    return PipelineChoice(config.default, "default")


def rotation_offset_deg(announced_deg: float, actual_deg: float) -> float:
    """``|actual - announced|`` in degrees, the short way round (0-180)."""
    return abs((actual_deg - announced_deg + 180.0) % 360.0 - 180.0)
