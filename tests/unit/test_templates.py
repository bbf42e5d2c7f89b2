"""The sky tiling, the template store, coadds of visits and the simulator's templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ppray.errors import NonRetriableError
from ppray.image import Exposure, MaskBit
from ppray.science.warp import warp_templates
from ppray.sim.templates import make_template_patch, write_templates_for_field
from ppray.templates import (
    PatchId,
    TemplateStore,
    Tiling,
    build_template,
    patches_for_footprint,
)

from .simdata_diff import BORESIGHT, offset_wcs, science_wcs, star_catalog

SMALL = Tiling(patch_size_deg=0.02, overlap_deg=0.002)
SHAPE = (512, 512)


def _corners() -> np.ndarray:
    return science_wcs().all_pix2world([[0, 0], [511, 0], [511, 511], [0, 511]], 0)


def test_every_sky_position_is_inside_its_patch_grid() -> None:
    rng = np.random.default_rng(0)
    ra = rng.uniform(0.0, 360.0, 400)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, 400)))
    tiling = Tiling(patch_size_deg=1.0, overlap_deg=0.05, pixel_scale_arcsec=10.0)
    margin_px = 0.05 * 3600 / 10.0
    for r, d in zip(
        np.append(ra, [0.0, 359.999, 17.0]), np.append(dec, [89.99, -89.99, 0.0]), strict=True
    ):
        patch = tiling.patch_of(r, d)
        assert tiling.patch_of(*tiling.center(patch)) == patch
        wcs, (ny, nx) = tiling.patch_wcs(patch)
        x, y = wcs.wcs_world2pix([[r, d]], 0)[0]
        # Inside the grid, and at least most of the overlap margin from its edge.
        assert min(x, y, nx - 1 - x, ny - 1 - y) > 0.9 * margin_px, (r, d, patch)


def test_patch_names_round_trip_and_reject_junk() -> None:
    assert PatchId.parse(PatchId(12, 345).name) == PatchId(12, 345)
    with pytest.raises(ValueError):
        PatchId.parse("../x")
    with pytest.raises(ValueError):
        Tiling(patch_size_deg=0.1, overlap_deg=0.2)


def test_patches_for_footprint_covers_corners_and_wraps_in_ra() -> None:
    corners = _corners()
    found = patches_for_footprint(corners, 0.0, SMALL)
    assert {SMALL.patch_of(*c) for c in corners} <= set(found)
    for patch in found:
        wcs, (ny, nx) = SMALL.patch_wcs(patch)
        x, y = wcs.wcs_world2pix(corners, 0).T
        assert x.max() >= 0 and x.min() <= nx - 1 and y.max() >= 0 and y.min() <= ny - 1
    # Padding adds the neighbours; a footprint across ra = 0 gets cells on both sides.
    assert len(patches_for_footprint(corners, 0.02, SMALL)) > len(found)
    across = patches_for_footprint([[359.99, 1.0], [0.01, 1.0], [0.01, 1.02], [359.99, 1.02]])
    ras = {p.ra_index for p in across}
    assert 0 in ras and max(ras) > 1000


def test_store_round_trip_and_load_region(tmp_path: Path) -> None:
    store = TemplateStore(str(tmp_path), tiling=SMALL)
    patch = SMALL.patch_of(*_corners()[0])
    wcs, shape = SMALL.patch_wcs(patch)
    exposure = make_template_patch(star_catalog(), wcs, shape, depth=20.0)
    store.write(patch, "r", exposure)
    assert store.storage.exists(f"templates/r/{patch.name}.fits")
    assert store.patches("r") == [patch]
    (loaded,) = store.load_region("r", _corners(), 0.0)
    np.testing.assert_array_equal(loaded.image, exposure.image)
    np.testing.assert_array_equal(loaded.variance, exposure.variance)
    np.testing.assert_array_equal(loaded.mask, exposure.mask)
    assert loaded.wcs is not None
    np.testing.assert_allclose(loaded.wcs.wcs.crval, wcs.wcs.crval, atol=1e-12)
    assert loaded.metadata["PATCH"] == patch.name and loaded.metadata["EXPTIME"] == 30.0
    assert store.load_region("g", _corners()) == []
    assert store.load_region("r", [[10.0, -40.0], [10.1, -40.0], [10.1, -39.9]]) == []
    # The tiling is recorded: a reader with no tiling gets it, a different one is refused.
    assert TemplateStore(str(tmp_path)).tiling == SMALL
    with pytest.raises(NonRetriableError):
        _ = TemplateStore(str(tmp_path), tiling=Tiling()).tiling
    with pytest.raises(ValueError, match="patch"):
        store.write(patch, "r", make_template_patch(star_catalog(), wcs, (10, 10)))


def test_build_template_is_the_inverse_variance_mean_of_warped_visits() -> None:
    patch = SMALL.patch_of(*BORESIGHT)
    wcs, shape = SMALL.patch_wcs(patch)
    truth = make_template_patch(star_catalog(), wcs, shape, noise=False)
    visits = []
    for k in range(4):
        v_wcs = offset_wcs(wcs, 0.3 * k, 1.7 * k, -2.3 * k, 40)
        visit = make_template_patch(
            star_catalog(), v_wcs, (shape[0] + 80, shape[1] + 80), depth=1.0, seed=10 + k
        )
        visits.append(visit)
    # A cosmic ray in one visit must not reach the coadd.
    hit_sky = wcs.all_pix2world([[200.0, 150.0]], 0)
    hx, hy = np.rint(visits[0].wcs.all_world2pix(hit_sky, 0)[0]).astype(int)
    visits[0].image[hy, hx] += 5000.0
    visits[0].mask[hy, hx] |= MaskBit.CR
    coadd = build_template(visits, wcs, shape)
    assert coadd.metadata["NVISITS"] == 4
    assert coadd.mask.max() == 0 and np.isfinite(coadd.image).all()
    chi = (coadd.image - truth.image) / np.sqrt(coadd.variance)
    assert abs(float(np.sqrt(np.mean(chi**2))) - 1.0) < 0.1
    assert abs(chi[150, 200]) < 5.0
    # The coadd's variance is a quarter of one visit's (four visits; ``truth`` is depth 20),
    # less the averaging of the interpolation (0.57-1 per pixel).
    ratio = np.median(coadd.variance) / (20.0 * np.median(truth.variance))
    assert 0.14 < ratio < 0.25
    # Where no visit covers, the coadd says so.
    empty = build_template(
        visits[:1], *SMALL.patch_wcs(PatchId(patch.dec_index, patch.ra_index + 3))
    )
    assert (empty.mask & MaskBit.NO_DATA).all() and np.isnan(empty.image).all()


def test_simulated_field_templates_cover_a_detector(tmp_path: Path) -> None:
    store = TemplateStore(str(tmp_path), tiling=SMALL)
    written = write_templates_for_field(
        store, star_catalog(), *BORESIGHT, 0.03, "r", seeing_fwhm_arcsec=0.7, depth=50.0
    )
    assert written == store.patches("r") and len(written) >= 4
    patches = store.load_region("r", _corners(), 0.001)
    assert 1 <= len(patches) <= len(written)
    warped = warp_templates(patches, science_wcs(), SHAPE)
    truth = make_template_patch(
        star_catalog(), science_wcs(), SHAPE, seeing_fwhm_arcsec=0.7, noise=False
    )
    assert warped.mask.max() == 0
    chi = (warped.image - truth.image) / np.sqrt(warped.variance)
    assert abs(float(np.sqrt(np.mean(chi**2))) - 1.0) < 0.1
    # Patches are independent noise draws.
    a, b = (store.read(p, "r") for p in written[:2])
    assert isinstance(a, Exposure) and not np.array_equal(a.image[:50, :50], b.image[:50, :50])
