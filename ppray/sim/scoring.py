"""Scoring DIA sources against the simulator's truth: which are real, which found.

Shared by the science tests and ``scripts/train_reliability.py``, so that a
"false" DIA source and the "completeness" mean the same in both. A DIA source
is *real* when it lies within ``max(1.5 px, 0.5 FWHM)`` of an injected
source's position at mid-exposure (or within half its trail, for a mover), an
*artefact* when it lies farther than 5 px (plus half a trail) from any, and is
left out in between. An injected source is *bright* when the S/N the difference
should give it is at least ``snr_cut``: its flux change over the noise of a
PSF fit, ``sqrt(4 pi sigma² V)`` with ``V`` the difference's median variance
(trails spread it over ``1 + L / 2 FWHM`` such footprints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from ppray.image import Exposure
from ppray.science.stats import FWHM_PER_SIGMA

__all__ = ["DiaTruth", "score_against_truth"]

REAL, ARTEFACT, LEFT_OUT = 1, 0, -1
_ARTEFACT_PX = 5.0
_EDGE_PX = 5.0


@dataclass(frozen=True)
class DiaTruth:
    """DIA sources against the injected ones.

    Attributes
    ----------
    labels
        Per DIA source: 1 real, 0 artefact, -1 left out.
    expected_snr
        Per DIA source: the S/N its injected source should have (NaN if not real).
    bright_found
        Per bright injected source on the detector: the index of the DIA source
        that found it (the one of largest ``|snr|``), or -1.
    """

    labels: np.ndarray
    expected_snr: np.ndarray
    bright_found: np.ndarray

    @property
    def n_artefacts(self) -> int:
        """DIA sources that are not an injected source."""
        return int(np.sum(self.labels == 0))

    def completeness(self, keep: np.ndarray | None = None) -> float:
        """Share of the bright injected sources found (by a DIA source in ``keep``)."""
        if self.bright_found.size == 0:
            return math.nan
        found = self.bright_found >= 0
        if keep is not None:
            found &= np.asarray(keep)[np.maximum(self.bright_found, 0)]
        return float(np.mean(found))


def score_against_truth(
    dia: pa.Table,
    transients: pa.Table,
    wcs: WCS,
    difference: Exposure,
    psf_fwhm_px: float,
    *,
    snr_cut: float = 10.0,
) -> DiaTruth:
    """Label ``dia``'s rows and find the bright injected sources among them.

    Parameters
    ----------
    dia
        DIA sources (``x``, ``y``, ``snr``).
    transients
        The visit's injected sources (``ppray.layout.transients_truth_key``:
        ``ra``, ``dec``, ``delta_flux_e``, ``trail_length_px``).
    wcs
        The detector's true WCS (:meth:`SimulatedObservatory.true_wcs`).
    difference
        The difference exposure (its shape and median variance).
    psf_fwhm_px
        The difference's PSF FWHM.
    snr_cut
        Expected S/N from which an injected source counts as bright.
    """
    n = dia.num_rows
    tx, ty = wcs.all_world2pix(
        transients["ra"].to_numpy(zero_copy_only=False),
        transients["dec"].to_numpy(zero_copy_only=False),
        0,
    )
    delta = np.abs(transients["delta_flux_e"].to_numpy(zero_copy_only=False))
    trail = transients["trail_length_px"].to_numpy(zero_copy_only=False)
    ny, nx = difference.shape
    on = (tx > _EDGE_PX) & (tx < nx - 1 - _EDGE_PX) & (ty > _EDGE_PX) & (ty < ny - 1 - _EDGE_PX)
    on &= delta > 0
    sigma = psf_fwhm_px / FWHM_PER_SIGMA
    variance = float(np.nanmedian(difference.variance))
    noise = math.sqrt(variance * 4.0 * math.pi * sigma**2)
    expected = delta / noise / np.sqrt(1.0 + trail / (2.0 * psf_fwhm_px))
    bright = np.flatnonzero(on & (expected >= snr_cut))
    labels = np.zeros(n, dtype=np.int64)
    snr_of = np.full(n, np.nan)
    found = np.full(bright.size, -1)
    if n == 0 or not on.any():
        return DiaTruth(labels, snr_of, found)
    x = dia["x"].to_numpy(zero_copy_only=False)
    y = dia["y"].to_numpy(zero_copy_only=False)
    snr = np.abs(np.nan_to_num(dia["snr"].to_numpy(zero_copy_only=False)))
    candidates = np.flatnonzero(on)
    dist, k = cKDTree(np.c_[tx[candidates], ty[candidates]]).query(np.c_[x, y])
    nearest = candidates[k]
    reach = np.maximum(max(1.5, 0.5 * psf_fwhm_px), 0.5 * trail[nearest])
    real = dist <= reach
    labels[real] = 1
    labels[~real & (dist <= _ARTEFACT_PX + 0.5 * trail[nearest])] = -1
    snr_of[real] = expected[nearest[real]]
    for i, j in enumerate(bright.tolist()):
        hits = np.flatnonzero(real & (nearest == j))
        if hits.size:
            found[i] = hits[np.argmax(snr[hits])]
    return DiaTruth(labels, snr_of, found)
