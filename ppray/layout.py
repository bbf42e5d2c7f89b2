"""Every storage key ppray reads or writes, in one place.

Keys are relative to a :class:`~ppray.storage.Storage` root; which root is
said beside each group (``output_root``, ``calib_root``, ``raw_root``, ...).
Modules format keys only through these functions, so that the tree below is
the whole truth about where things are::

    raw_root/    INSTRUMENT/DAY_OBS/OBS_ID/OBS_ID_DETECTOR.fits (+ .json sidecar)
                 truth/GROUP/...                    (simulator only)
                 truth/templates/BAND/PATCH_psf.json (simulator, realistic sky)
    calib_root/  INSTRUMENT/DETECTOR/calib.fits     (legacy masters)
                 INSTRUMENT/DETECTOR/KIND/CALIB_ID.fits, INSTRUMENT/registry/...
                 refcat/..., templates/BAND/PATCH.fits
    output_root/ INSTRUMENT/DAY_OBS/GROUP/summary.json
                 INSTRUMENT/DAY_OBS/GROUP/DETECTOR/{sources,diaSources}.parquet, *.fits
                 alerts/INSTRUMENT/DAY_OBS/GROUP/DETECTOR.avro
                 _published/alerts/INSTRUMENT/DAY_OBS/GROUP/DETECTOR.json
                 apdb/...

Validation of the parts (band names, calibration ids) stays with the module
that owns them; these functions only format.
"""

from __future__ import annotations

from typing import Literal

from ppray.messages import NextVisit
from ppray.rawkeys import raw_key, sidecar_key
from ppray.storage import safe_key

__all__ = [
    "DETECTOR_PRODUCTS",
    "alert_file_key",
    "alert_key",
    "apdb_config_key",
    "apdb_file_key",
    "apdb_manifest_key",
    "bleed_truth_key",
    "calib_key",
    "calib_product_key",
    "calib_record_key",
    "detector_output_key",
    "detector_prefix",
    "psf_truth_key",
    "published_marker_key",
    "raw_key",
    "refcat_key",
    "sidecar_key",
    "streaks_truth_key",
    "summary_key",
    "template_key",
    "template_psf_truth_key",
    "transients_truth_key",
    "truth_key",
    "visit_prefix",
]

DetectorProduct = Literal["sources", "dia_sources", "calexp", "difference", "postisr", "provenance"]

DETECTOR_PRODUCTS: dict[str, str] = {
    "sources": "sources.parquet",
    "dia_sources": "diaSources.parquet",
    "calexp": "calexp.fits",
    "difference": "difference.fits",
    "postisr": "postISRCCD.fits",  # the isr pipeline's only product
    "provenance": "provenance.json",  # what the others were made with
}
"""A detector's per-visit outputs: product name -> file name under :func:`detector_prefix`."""


# --- output_root: per visit and detector ----------------------------------------------


def visit_prefix(visit: NextVisit) -> str:
    """Output prefix of one visit (or calibration sequence): ``INSTRUMENT/DAY_OBS/GROUP``."""
    return f"{visit.instrument}/{visit.day_obs}/{visit.groupId}"


def summary_key(visit: NextVisit) -> str:
    """The visit's (or sequence's) summary, written by the aggregator."""
    return f"{visit_prefix(visit)}/summary.json"


def detector_prefix(visit: NextVisit, detector: str) -> str:
    """Output prefix of one detector of one visit: ``INSTRUMENT/DAY_OBS/GROUP/DETECTOR``."""
    return f"{visit_prefix(visit)}/{detector}"


def detector_output_key(visit: NextVisit, detector: str, product: DetectorProduct) -> str:
    """Key of one of a detector's per-visit products (:data:`DETECTOR_PRODUCTS`)."""
    return f"{detector_prefix(visit, detector)}/{DETECTOR_PRODUCTS[product]}"


def alert_key(visit: NextVisit, detector: str) -> str:
    """The key of one detector's alerts of one visit, as sinks receive it."""
    return detector_prefix(visit, detector)


def alert_file_key(key: str, prefix: str = "alerts") -> str:
    """The Avro container of the alerts of ``key`` (:func:`alert_key`)."""
    return safe_key(f"{prefix}/{key}.avro")


def published_marker_key(key: str) -> str:
    """The marker that the alerts of ``key`` were published (stops re-publication)."""
    return safe_key(f"_published/alerts/{key}.json")


# --- output_root: the APDB ---------------------------------------------------------


def apdb_config_key(prefix: str) -> str:
    """The APDB's partitioning (``nside``) and schema version."""
    return f"{prefix}/_config.json"


def apdb_file_key(prefix: str, table: str, nside: int, pixel: int, stem: str) -> str:
    """One ``(visit, detector)``'s rows of ``table`` in one HEALPix pixel."""
    return f"{prefix}/{table}/nside{nside}/{pixel}/{stem}.parquet"


def apdb_manifest_key(prefix: str, stem: str) -> str:
    """The keys one ``(visit, detector)`` wrote last (what a re-run replaces)."""
    return f"{prefix}/_manifests/{stem}.json"


# --- calib_root ------------------------------------------------------------------


def calib_key(instrument: str, detector: str) -> str:
    """A detector's legacy master calibrations (all planes in one FITS file)."""
    return f"{instrument}/{detector}/calib.fits"


def calib_product_key(instrument: str, detector: str, kind: str, calib_id: str) -> str:
    """A certified product: ``{instrument}/{detector}/{kind}/{calib_id}.fits``."""
    return f"{instrument}/{detector}/{kind}/{calib_id}.fits"


def calib_record_key(instrument: str, detector: str, calib_id: str) -> str:
    """A certification record: ``{instrument}/registry/{detector}/{calib_id}.json``."""
    return f"{instrument}/registry/{detector}/{calib_id}.json"


def refcat_key(dec_cell: int, ra_cell: int) -> str:
    """One cell of the reference catalog."""
    return f"refcat/{dec_cell:04d}/{ra_cell:05d}.parquet"


def template_key(band: str, patch: str) -> str:
    """One patch's template in one band."""
    return f"templates/{band}/{patch}.fits"


# --- raw_root: the simulator's truth -----------------------------------------------


def truth_key(group_id: str, detector: str, snap: int = 0) -> str:
    """The truth table of one detector of one visit's snap (simulator only)."""
    return f"truth/{group_id}/{detector}_{snap}.parquet"


def transients_truth_key(group_id: str, snap: int = 0) -> str:
    """The injected transients of one visit's snap (simulator only)."""
    return f"truth/{group_id}/transients_{snap}.parquet"


def psf_truth_key(group_id: str, detector: str, snap: int = 0) -> str:
    """The true PSF field of one detector of one visit's snap (realistic sky; JSON)."""
    return f"truth/{group_id}/{detector}_{snap}_psf.json"


def streaks_truth_key(group_id: str, detector: str, snap: int = 0) -> str:
    """The satellite and aircraft trails on one detector of one visit's snap (realistic sky)."""
    return f"truth/{group_id}/{detector}_{snap}_streaks.parquet"


def bleed_truth_key(group_id: str, detector: str, snap: int = 0) -> str:
    """Where charge bled on one detector of one visit's snap, as column runs (realistic sky)."""
    return f"truth/{group_id}/{detector}_{snap}_bleed.parquet"


def template_psf_truth_key(band: str, patch: str) -> str:
    """The true PSF field of one template patch, in its pixels (realistic sky; JSON)."""
    return f"truth/templates/{band}/{patch}_psf.json"
