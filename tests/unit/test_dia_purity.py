"""False DIA sources on full-size LSSTCam CCDs of an uncrowded field with nothing new in it.

With no transient injected every DIA source is false. What is left at 5 sigma
must be the noise floor of the matched filter (~2-4 peaks per 4k x 4k for
0.75-1" seeing: ``tests/unit/test_dia.py``), not residuals of stars, edges or
correlated noise, which before the fixes gave ~190 per 4k x 4k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ppray.config import load_config
from ppray.sim.observatory import SimulatedObservatory
from ppray.visit.processor import DetectorProcessor

DETECTOR = "R22_S11"
N_VISITS = 4  # 65 Mpx in all: enough to tell a rate of 5 from one of 10


@pytest.mark.slow
def test_fewer_than_5_false_dia_sources_per_ccd(tmp_path: Path) -> None:
    base = load_config(env={})
    cfg = base.rooted_at(str(tmp_path)).with_overrides(
        instrument="lsstcam",
        detectors=(DETECTOR,),
        write_images=False,
        sim={
            **base.sim.model_dump(),
            "catalog_radius_deg": 0.2,
            "n_new_transients": 0,
            "n_variables": 0,
            "n_movers": 0,
        },
    )
    assert cfg.sim.star_density_per_deg2 <= 60_000  # uncrowded: ~1,500 stars on the CCD
    obs = SimulatedObservatory(cfg)
    obs.write_reference_data()
    proc = DetectorProcessor.load(cfg, DETECTOR)
    counts, snrs, scales = [], [], []
    for index in range(N_VISITS):
        visit = obs.visit(index)
        result = proc.process(proc.prepare(visit), obs.expose(visit))
        assert result.status == "ok", result.reason
        assert not any(f.startswith("subtraction_degraded") for f in result.flags), result.flags
        dia = result.dia_sources
        assert dia is not None
        counts.append(dia.num_rows)
        snrs.extend(np.abs(dia["snr"].to_numpy()).tolist())
        scales.append(result.metrics["dia_snr_scale"])
    assert np.mean(counts) < 5.0, counts
    # Noise peaks only: a residual of a star or an edge is far above threshold.
    assert max(snrs, default=0.0) < 6.5, snrs
    # The difference's noise is close to white once its background is removed.
    assert all(1.0 <= s < 1.1 for s in scales), scales
