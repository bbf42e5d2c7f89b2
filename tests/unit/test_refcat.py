from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from ppray.refcat import RefcatStore, footprint_bounds
from ppray.sim.sky import make_star_catalog


def _inside(cat: pa.Table, ra0: float, ra1: float, dec0: float, dec1: float) -> set[int]:
    ra, dec = cat["ra"].to_numpy(), cat["dec"].to_numpy()
    ra = ra0 + (ra - ra0) % 360.0
    sel = (ra <= ra1) & (dec >= dec0) & (dec <= dec1)
    return set(cat["id"].to_numpy()[sel].tolist())


def test_region_query_returns_exactly_the_stars_in_the_box(tmp_path: Path) -> None:
    cat = make_star_catalog(150.0, 2.0, 1.5, density_per_deg2=2000, seed=0)
    store = RefcatStore(str(tmp_path))
    keys = store.write(cat)
    assert len(keys) > 4  # the cap spans several shards
    corners = [(149.6, 1.7), (150.3, 1.7), (150.3, 2.4), (149.6, 2.4)]
    got = store.load_region(corners, padding_deg=0.1)
    assert got is not None
    # Shard selection must not lose anything: every star of the box is there, nothing else.
    assert set(got["id"].to_numpy().tolist()) == _inside(cat, *footprint_bounds(corners, 0.1))
    ra_min, ra_max, dec_min, dec_max = footprint_bounds(corners, 0.1)
    assert (dec_min, dec_max) == pytest.approx((1.6, 2.5))
    assert ra_min < 149.5 and ra_max > 150.4
    assert store.write(cat) == keys  # idempotent: same shards, replaced


def test_region_across_ra_zero(tmp_path: Path) -> None:
    cat = make_star_catalog(0.0, -30.0, 0.5, density_per_deg2=5000, seed=1)
    store = RefcatStore(str(tmp_path))
    store.write(cat)
    got = store.load_region([(359.8, -30.2), (0.2, -30.2), (0.2, -29.8), (359.8, -29.8)])
    assert got is not None
    ra = got["ra"].to_numpy()
    assert ((ra > 359.7) | (ra < 0.3)).all()
    assert (ra > 359.7).any() and (ra < 0.3).any()
    expected = _inside(cat, -0.2 + 360.0, 0.2 + 360.0, -30.2, -29.8)
    assert set(got["id"].to_numpy().tolist()) == expected


def test_no_overlap_is_none(tmp_path: Path) -> None:
    store = RefcatStore(str(tmp_path))
    store.write(make_star_catalog(150.0, 2.0, 0.2, density_per_deg2=1000, seed=0))
    assert store.load_region([(10.0, -40.0), (10.1, -40.0), (10.1, -39.9)]) is None
