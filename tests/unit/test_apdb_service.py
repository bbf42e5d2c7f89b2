"""Routing to APDB sky shards and merging their answers."""

from __future__ import annotations

import numpy as np
import pytest

from ppray.alerts.diasource import dia_source_table
from ppray.apdb.service import LocalAssociation, ShardRouter, load_shard
from ppray.skyregion import Footprint, healpix_pixels

from .simdata_apdb import dia_like, visit_info


def _sky(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 360, n), np.degrees(np.arcsin(rng.uniform(-1, 1, n)))


def test_shards_partition_the_sky() -> None:
    router = ShardRouter(3, nside=8)
    ra, dec = _sky(2000)
    shard = router.shard_of(ra, dec)
    assert set(shard.tolist()) == {0, 1, 2}
    for k in range(3):
        region = router.region(k)
        assert region is not None
        np.testing.assert_array_equal(region.contains(ra, dec), shard == k)
    assert ShardRouter(1).region(0) is None
    with pytest.raises(ValueError, match="n_shards"):
        ShardRouter(0)
    with pytest.raises(ValueError, match="power of two"):
        ShardRouter(2, nside=6)


def test_shards_for_a_footprint_cover_it() -> None:
    router = ShardRouter(4, nside=8)
    cone = Footprint.cone(150.0, 2.2, 3.0)
    ra, dec = _sky(200_000, seed=1)
    inside = cone.contains(ra, dec)
    assert set(router.shard_of(ra[inside], dec[inside]).tolist()) <= set(router.shards_for(cone))


def test_a_box_over_most_of_the_sky_is_covered() -> None:
    """The farthest point of a box over > 180 deg of RA is not on its outline."""
    ra, dec = _sky(5000, seed=2)
    for box in (Footprint.box(0.0, 360.0, -90.0, 90.0), Footprint.box(10.0, 300.0, -60.0, 60.0)):
        inside = box.contains(ra, dec)
        pixels = set(box.healpix(32).tolist())
        assert set(healpix_pixels(ra[inside], dec[inside], 32).tolist()) <= pixels


def test_two_shards_associate_as_one() -> None:
    """Away from shard boundaries, sharding changes nothing."""
    router = ShardRouter(2, nside=1)  # 12 pixels of ~59 deg
    rng = np.random.default_rng(5)
    ra0 = rng.uniform(30.0, 60.0, 300)  # pixels 4 and 5: both shards
    dec0 = rng.uniform(-20.0, 20.0, 300)
    assert len(set(router.shard_of(ra0, dec0).tolist())) == 2
    one = LocalAssociation([load_shard(ShardRouter(1), 0, None)])
    two = LocalAssociation([load_shard(router, k, None) for k in range(2)], router)
    for k in range(3):
        east, north = rng.normal(0.0, 0.1 / 3600, (2, ra0.size))  # 0.1" scatter
        ra, dec = ra0 + east / np.cos(np.radians(dec0)), dec0 + north
        table = dia_source_table(dia_like(ra, dec), visit_info(k))
        a, b = one.associate(table), two.associate(table)
        assert (
            (a.n_matched, a.n_new) == (b.n_matched, b.n_new) == ((0, 300) if k == 0 else (300, 0))
        )
        assert a.dia_sources["diaObjectId"].equals(b.dia_sources["diaObjectId"])
    assert sum(s.n_objects for s in two.shards) == one.shards[0].n_objects == 300
