"""Simulated science/template pairs for the warping and subtraction tests.

The science exposure is a single background-subtracted visit rendered straight
into a calibrated :class:`Exposure` (``make_template_patch`` with ``depth=1``:
Gaussian noise of the Poisson variance), so these tests exercise only the
template side, not ISR. Renders are cached; copy arrays before changing them.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS

from ppray.image import Exposure
from ppray.instrument import detector_wcs, load_instrument
from ppray.science.warp import warp_to
from ppray.sim.sky import make_star_catalog
from ppray.sim.templates import make_template_patch

__all__ = [
    "BORESIGHT",
    "EXPTIME_S",
    "INJECTED_MAG",
    "Pair",
    "injected_catalog",
    "make_pair",
    "offset_wcs",
    "science_wcs",
    "star_catalog",
]

BORESIGHT = (150.0, 2.2)
EXPTIME_S = 30.0
INJECTED_MAG = 20.0
SHAPE = (512, 512)
# Pixel positions of the sources present only in the science image.
INJECTED_XY = ((100.3, 120.7), (400.6, 90.2), (260.1, 300.4), (80.8, 420.5), (430.2, 440.9))


def science_wcs() -> WCS:
    inst = load_instrument("synthetic")
    return detector_wcs(inst, inst.detector("R22_S11"), *BORESIGHT, 0.0)


def offset_wcs(wcs: WCS, rotation_deg: float, dx: float, dy: float, pad: int) -> WCS:
    """``wcs`` rotated about its reference pixel, shifted by ``(dx, dy)`` and ``pad`` px wider."""
    out = wcs.deepcopy()
    th = np.radians(rotation_deg)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    out.wcs.cd = out.wcs.cd @ rot
    out.wcs.crpix = [out.wcs.crpix[0] + dx + pad, out.wcs.crpix[1] + dy + pad]
    out.wcs.set()
    return out


@cache
def star_catalog() -> pa.Table:
    """Stars around the synthetic camera, none brighter than 17th (nothing saturates)."""
    ra, dec = BORESIGHT
    return make_star_catalog(ra, dec, 0.1, density_per_deg2=200_000.0, mag_range=(17.0, 24.0))


def injected_catalog(wcs: WCS) -> pa.Table:
    """The science-only sources at :data:`INJECTED_XY`."""
    x, y = np.array(INJECTED_XY).T
    ra, dec = wcs.all_pix2world(x, y, 0)
    n = x.size
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64) + 10_000_000),
            "ra": pa.array(ra, pa.float64()),
            "dec": pa.array(dec, pa.float64()),
            "mag": pa.array(np.full(n, INJECTED_MAG), pa.float64()),
            "size_arcsec": pa.array(np.zeros(n), pa.float64()),
        }
    )


def _science_catalog() -> pa.Table:
    cat = star_catalog()
    extra = injected_catalog(science_wcs())
    return pa.concat_tables([cat.select(extra.column_names), extra])


class Pair:
    """A science exposure and a template warped to its grid."""

    def __init__(self, science: Exposure, template: Exposure) -> None:
        self.science = science
        self.template = template


@cache
def make_pair(
    science_seeing: float = 1.0, template_seeing: float = 0.7, template_depth: float = 20.0
) -> Pair:
    """Science (one visit, with injected sources) and a deep template warped onto it.

    The template is rendered on its own grid, rotated 0.4 deg and shifted by a
    fraction of a pixel from the science, then warped, as in production.
    """
    wcs = science_wcs()
    science = make_template_patch(
        _science_catalog(),
        wcs,
        SHAPE,
        seeing_fwhm_arcsec=science_seeing,
        depth=1.0,
        exptime_s=EXPTIME_S,
        seed=1,
    )
    pad = 16
    t_wcs = offset_wcs(wcs, 0.4, 3.37, -2.61, pad)
    template = make_template_patch(
        star_catalog(),
        t_wcs,
        (SHAPE[0] + 2 * pad, SHAPE[1] + 2 * pad),
        seeing_fwhm_arcsec=template_seeing,
        depth=template_depth,
        exptime_s=EXPTIME_S,
        seed=2,
    )
    return Pair(science, warp_to(template, wcs, SHAPE))
