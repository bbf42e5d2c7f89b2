"""What each detector-visit's outputs were made with: ``provenance.json`` beside them.

The ppray version, a digest of the deployment config (secrets are masked before
hashing, so it is safe to show and stable across restarts), the pipeline and the
rule that chose it, and the ids of the calibrations, templates, reference-catalog
shards and reliability model used. Two runs with the same provenance made their
outputs from the same inputs and code.
"""

from __future__ import annotations

import hashlib
from typing import Any

import ppray
from ppray.config import DeploymentConfig
from ppray.image import Exposure
from ppray.visit.pipelines import PipelineChoice

__all__ = ["config_digest", "detector_provenance"]

PROVENANCE_SCHEMA = "ppray.provenance/1"


def config_digest(config: DeploymentConfig) -> str:
    """SHA-256 of the deployment config as JSON (passwords appear as ``**********``)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()


def detector_provenance(
    *,
    digest: str,
    pipeline: PipelineChoice,
    calib_ids: dict[str, str],
    templates: tuple[Exposure, ...] = (),
    refcat_ids: list[str] | None = None,
    reliability_version: str | None = None,
    alert_schema: str | None = None,
) -> dict[str, Any]:
    """The provenance record of one detector-visit (JSON-ready)."""
    return {
        "schema": PROVENANCE_SCHEMA,
        "ppray_version": ppray.__version__,
        "config_sha256": digest,
        "pipeline": pipeline.pipeline,
        "pipeline_rule": pipeline.rule,
        "calibrations": dict(sorted(calib_ids.items())),
        "templates": sorted(str(t.metadata.get("TMPLID", "?")) for t in templates),
        "refcat": sorted(refcat_ids or []),
        "reliability_model": reliability_version,
        "alert_schema": alert_schema,
    }
