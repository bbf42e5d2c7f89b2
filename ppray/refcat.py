"""A sharded reference catalog: what a detector preloads for its footprint on ``next_visit``.

Shards are cells of ``cell_deg`` in declination and ``cell_deg / cos(dec)`` in
right ascension (so cells have about the same area everywhere), each one
Parquet file ``refcat/DEC_CELL/RA_CELL.parquet`` in a :class:`~ppray.storage.Storage`.
A region query reads only the shards that overlap it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ppray.layout import refcat_key
from ppray.storage import Storage

__all__ = ["RefcatStore", "catalog_mag", "footprint_bounds"]


def catalog_mag(catalog: pa.Table, band: str) -> np.ndarray:
    """The magnitudes of a catalog in ``band``: ``mag_{band}`` if present, else ``mag``.

    Parameters
    ----------
    catalog
        A reference catalog (or any table with a ``mag`` column).
    band
        Filter name (``"r"``); bands without their own column fall back to ``mag``.

    Returns
    -------
    numpy.ndarray
        ``float64`` magnitudes.
    """
    column = f"mag_{band}"
    name = column if column in catalog.column_names else "mag"
    return np.asarray(catalog[name].to_numpy(zero_copy_only=False), dtype=np.float64)


def footprint_bounds(
    corners_deg: Sequence[tuple[float, float]], padding_deg: float
) -> tuple[float, float, float, float]:
    """``(ra_min, ra_max, dec_min, dec_max)`` of a footprint plus padding, in degrees.

    Right ascension is unwrapped about the first corner, so a footprint across
    RA = 0 gives ``ra_min < 0``; :meth:`RefcatStore.load_region` handles that.
    """
    ra = np.array([c[0] for c in corners_deg], dtype=float)
    dec = np.array([c[1] for c in corners_deg], dtype=float)
    ra = ra[0] + (ra - ra[0] + 180.0) % 360.0 - 180.0
    dec_min = max(-90.0, float(dec.min()) - padding_deg)
    dec_max = min(90.0, float(dec.max()) + padding_deg)
    cos_dec = max(math.cos(math.radians(max(abs(dec_min), abs(dec_max)))), 1e-3)
    pad_ra = padding_deg / cos_dec
    return float(ra.min()) - pad_ra, float(ra.max()) + pad_ra, dec_min, dec_max


REFCAT_IDS_KEY = b"ppray.refcat_shards"
"""Schema metadata key of a loaded region: the shard keys it came from (JSON list)."""


class RefcatStore:
    """Reference catalog shards under ``refcat/`` of a storage root.

    Parameters
    ----------
    root
        Storage root (path or ``pyarrow.fs`` URI).
    cell_deg
        Shard size in declination.
    """

    def __init__(self, root: str, cell_deg: float = 1.0) -> None:
        self.storage = Storage(root)
        self.cell_deg = cell_deg

    def _dec_cell(self, dec: np.ndarray) -> np.ndarray:
        return np.floor((np.asarray(dec) + 90.0) / self.cell_deg).astype(np.int64)

    def _ra_cells_in_row(self, dec_cell: int) -> int:
        mid = -90.0 + (dec_cell + 0.5) * self.cell_deg
        return max(1, int(360.0 * math.cos(math.radians(mid)) / self.cell_deg))

    def _ra_cell(self, ra: np.ndarray, dec_cell: int) -> np.ndarray:
        n = self._ra_cells_in_row(dec_cell)
        return np.floor((np.asarray(ra) % 360.0) / 360.0 * n).astype(np.int64) % n

    def _key(self, dec_cell: int, ra_cell: int) -> str:
        return refcat_key(dec_cell, ra_cell)

    def write(self, catalog: pa.Table) -> list[str]:
        """Write a catalog (``id``, ``ra``, ``dec``, magnitudes...) into shards; returns keys.

        Shards are replaced whole, so writing the same catalog twice is idempotent.
        """
        dec_cells = self._dec_cell(catalog["dec"].to_numpy())
        ra = catalog["ra"].to_numpy()
        keys = []
        for dc in np.unique(dec_cells):
            in_row = np.flatnonzero(dec_cells == dc)
            ra_cells = self._ra_cell(ra[in_row], int(dc))
            for rc in np.unique(ra_cells):
                rows = in_row[ra_cells == rc]
                key = self._key(int(dc), int(rc))
                self.storage.write_parquet(key, catalog.take(pa.array(rows)))
                keys.append(key)
        return keys

    @staticmethod
    def ids(table: pa.Table | None) -> list[str]:
        """The shard keys a :meth:`load_region` table was read from ([] if unknown)."""
        meta = (table.schema.metadata or {}) if table is not None else {}
        return list(json.loads(meta[REFCAT_IDS_KEY])) if REFCAT_IDS_KEY in meta else []

    def load_region(
        self, corners_deg: Sequence[tuple[float, float]], padding_deg: float = 0.0
    ) -> pa.Table | None:
        """Reference stars in the padded bounding box of a footprint; None if no shard exists."""
        ra_min, ra_max, dec_min, dec_max = footprint_bounds(corners_deg, padding_deg)
        parts, keys = [], []
        for dc in range(
            int(self._dec_cell(np.array(dec_min))), int(self._dec_cell(np.array(dec_max))) + 1
        ):
            n = self._ra_cells_in_row(dc)
            first = math.floor((ra_min % 360.0) / 360.0 * n)
            span = math.ceil((ra_max - ra_min) / 360.0 * n) + 1
            for rc in sorted({(first + i) % n for i in range(min(span, n))}):
                key = self._key(dc, rc)
                if self.storage.exists(key):
                    parts.append(self.storage.read_parquet(key))
                    keys.append(key)
        if not parts:
            return None
        # The shards read, for the outputs' provenance (survives the filter below).
        table = pa.concat_tables(parts).replace_schema_metadata(
            {REFCAT_IDS_KEY: json.dumps(keys).encode()}
        )
        ra = table["ra"].to_numpy()
        ra_unwrapped = ra_min + (ra - ra_min) % 360.0
        dec = table["dec"]
        keep = pc.and_(
            pc.and_(pc.greater_equal(dec, dec_min), pc.less_equal(dec, dec_max)),
            pa.array(ra_unwrapped <= ra_max),
        )
        return table.filter(keep)
