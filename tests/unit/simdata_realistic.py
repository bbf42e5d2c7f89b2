"""Full-size LSSTCam CCDs of the realistic sky, processed by the pipeline's own steps.

The realistic simulator (``sim.sky: realistic``): a PSF that varies and is
elongated, different in the template; blends, galaxies, saturated stars with
bleed trails; trails when asked for. Each visit is processed by
:meth:`DetectorProcessor.run_steps` (what the worker runs before alerts), so
the tests see the PSF model, the difference and the DIA sources with their
reliability, next to the truth the simulator wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ppray.config import DeploymentConfig, load_config
from ppray.layout import psf_truth_key, streaks_truth_key, transients_truth_key, truth_key
from ppray.messages import NextVisit
from ppray.sim.observatory import SimulatedObservatory
from ppray.sim.psf import PsfField
from ppray.sim.scoring import DiaTruth, score_against_truth
from ppray.visit.processor import DetectorProcessor, StepProducts

DETECTOR = "R22_S11"


@dataclass
class RealisticVisit:
    """One processed visit and what the simulator knows of it."""

    visit: NextVisit
    steps: StepProducts
    objects: pa.Table  # truth_key: every object drawn, with kind and blends
    transients: pa.Table  # transients_truth_key: injected sources, mid-exposure
    streaks: pa.Table  # streaks_truth_key
    psf: PsfField  # the true science PSF
    dia_truth: DiaTruth


def realistic_config(root: Path, **sim: Any) -> DeploymentConfig:
    """``local.yaml`` rooted at ``root`` on one LSSTCam CCD of the realistic sky."""
    base = load_config(env={})
    realistic = {**base.sim.realistic.model_dump(), **sim.pop("realistic", {})}
    return base.rooted_at(str(root)).with_overrides(
        instrument="lsstcam",
        detectors=(DETECTOR,),
        write_images=False,
        sim={
            **base.sim.model_dump(),
            "sky": "realistic",
            "catalog_radius_deg": 0.2,
            "n_new_transients": 0,
            "n_variables": 0,
            "n_movers": 0,
            **sim,
            "realistic": realistic,
        },
    )


def run_realistic(config: DeploymentConfig, visits: range) -> list[RealisticVisit]:
    """Simulate and process ``visits`` of ``config``'s one detector."""
    obs = SimulatedObservatory(config)
    obs.write_reference_data()
    proc = DetectorProcessor.load(config, DETECTOR)
    out = []
    for index in visits:
        visit = obs.visit(index)
        raws = obs.expose(visit)
        steps = proc.run_steps(proc.prepare(visit), raws, exposure_id=raws[0].exposure_id)
        group, store = visit.groupId, obs.raw_store
        transients = store.read_parquet(transients_truth_key(group, 0))
        diff = steps.diff
        assert steps.dia is not None and diff.difference is not None and diff.psf is not None
        dia_truth = score_against_truth(
            steps.dia, transients, obs.true_wcs(visit, DETECTOR), diff.difference, diff.psf.fwhm_px
        )
        out.append(
            RealisticVisit(
                visit=visit,
                steps=steps,
                objects=store.read_parquet(truth_key(group, DETECTOR, 0)),
                transients=transients,
                streaks=store.read_parquet(streaks_truth_key(group, DETECTOR, 0)),
                psf=PsfField.from_dict(store.read_json(psf_truth_key(group, DETECTOR, 0))),
                dia_truth=dia_truth,
            )
        )
    return out
