"""The simple sky stays bit for bit what it was before the realistic sky was added.

The digests were taken with the simulator of commit 2d5ff1e (before
``sim.sky``): raws, truth, a template and the transients' catalogs of fixed
seeds. The demo and the science tests' expectations depend on these very pixels.
If numpy ever changes its random streams these digests change with it; then
regenerate them from the old commit, as the commit that added this test did.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from ppray.sim.templates import make_template_patch
from ppray.sim.transients import make_transients, science_catalog, template_catalog
from ppray.templates import Tiling

from .simdata import simulate, sky_catalog


def _digest(*parts: np.ndarray | pa.Table) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, pa.Table):
            for name in part.column_names:
                h.update(name.encode())
                column = part[name]
                if pa.types.is_string(column.type):
                    h.update("|".join(column.to_pylist()).encode())
                else:
                    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
                    h.update(np.ascontiguousarray(values).tobytes())
        else:
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()[:16]


def test_raws_and_truth() -> None:
    sim = simulate(seed=0)
    assert _digest(*[sim.segments[a.name] for a in sim.detector.amplifiers]) == "338517542342e660"
    truth = sim.truth
    digest = _digest(truth.image_e, truth.stars, truth.saturated, truth.cosmic_ray_mask)
    assert digest == "d04671d1cd0dd851"
    bright = simulate(seed=1, bright_star_at=(300.4, 140.6, 12.0))
    assert _digest(*[bright.segments[a.name] for a in bright.detector.amplifiers]) == (
        "0f404486f1d30209"
    )


def test_template() -> None:
    tiling = Tiling(patch_size_deg=0.05)
    wcs, shape = tiling.patch_wcs(tiling.patch_of(150.0, 2.2))
    template = make_template_patch(sky_catalog(), wcs, shape, seed=3)
    assert shape == (1263, 1261)
    assert _digest(template.image, template.variance) == "d31ed793b45f8117"


@pytest.mark.parametrize("which", ["science", "template"])
def test_transient_catalogs(which: str) -> None:
    transients = make_transients(
        150.0, 2.2, 0.1, n_new=3, n_variable=4, n_moving=2, base_catalog=sky_catalog(), seed=0
    )
    if which == "science":
        catalog, truth = science_catalog(sky_catalog(), transients, 100.0, 30.0, "r")
        assert _digest(catalog, truth) == "0d36d4cc88ad0231"
    else:
        assert _digest(template_catalog(sky_catalog(), transients, "r")) == "12d204d075fe8122"
