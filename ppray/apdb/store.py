"""Alert Production Database: DiaObject, DiaSource and DiaForcedSource as Parquet.

Tables have exactly the fields of the alert schema's ``diaObject``,
``diaSource`` and ``diaForcedSource`` records (:mod:`ppray.schema`):
nJy fluxes, degrees, MJD (TAI). They live under a :class:`~ppray.storage.Storage`
root (local disk or any ``pyarrow.fs`` URI)::

    apdb/_config.json                                      {"nside": 32}
    apdb/<Table>/nside32/<pixel>/v<visit>_d<detector>[_<writer>].parquet
    apdb/_manifests/v<visit>_d<detector>[_<writer>].json   the keys last written

partitioned by the NESTED HEALPix pixel of each row's position. The unit of
writing is one ``(visit, detector)``: :meth:`Apdb.write` makes its rows
exactly the given ones. Every file is written atomically, then the manifest,
then the files of an earlier write that the new one no longer has are deleted,
so a re-run replaces rows and never duplicates them (a crash midway is
repaired by the retry, and readers drop duplicate ids meanwhile).

DiaObjects are versioned like Rubin's APDB: each ``(visit, detector)`` that
creates or updates objects writes their new rows; a read keeps the latest
version of each (largest ``validityStartMjdTai``, then ``nDiaSources``).

Ids are deterministic (:func:`ppray.apdb.ids.pack_id`), so a retried visit produces the same
ids: ``diaSourceId`` from (exposure, detector, source index), ``diaForcedSourceId``
from (exposure, detector, rank of the object's id), ``diaObjectId`` = the
``diaSourceId`` of the source that created the object.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ppray.errors import NonRetriableError
from ppray.layout import apdb_config_key, apdb_file_key, apdb_manifest_key
from ppray.schema import AlertSchema, conform_table, load_alert_schema
from ppray.skyregion import Footprint, healpix_pixels
from ppray.storage import Storage

__all__ = [
    "TABLES",
    "Apdb",
    "ApdbTables",
    "conformed_rows",
]

TABLES = {"DiaObject": "diaObject", "DiaSource": "diaSource", "DiaForcedSource": "diaForcedSource"}
"""APDB table name -> alert-schema record name."""

_KEYS = {
    "DiaObject": "diaObjectId",
    "DiaSource": "diaSourceId",
    "DiaForcedSource": "diaForcedSourceId",
}


@dataclass(frozen=True)
class ApdbTables:
    """DiaObjects and their DiaSource and DiaForcedSource history (schema columns)."""

    dia_objects: pa.Table
    dia_sources: pa.Table
    dia_forced_sources: pa.Table

    @classmethod
    def empty(cls, schema: AlertSchema | None = None) -> ApdbTables:
        schema = schema or load_alert_schema()
        return cls(
            schema.arrow_schema("diaObject").empty_table(),
            schema.arrow_schema("diaSource").empty_table(),
            schema.arrow_schema("diaForcedSource").empty_table(),
        )


def conformed_rows(
    visit: int, detector: int, tables: dict[str, pa.Table | None], schema: AlertSchema
) -> dict[str, pa.Table]:
    """One ``(visit, detector)``'s non-empty tables (APDB table name -> rows) in the
    schema's columns, every DiaSource and DiaForcedSource row checked to carry both.

    Raises
    ------
    ValueError
        A table lacks a required column, or holds rows of another visit or detector.
    """
    out = {}
    for name, table in tables.items():
        if table is None or table.num_rows == 0:
            continue
        table = conform_table(table, TABLES[name], schema)
        if name != "DiaObject":
            for col, want in (("visit", visit), ("detector", detector)):
                values = table[col].to_numpy()
                if (values != want).any():
                    raise ValueError(
                        f"{name}: column {col!r} holds {sorted(set(values.tolist()))[:5]}, "
                        f"not only {want}: a write holds one (visit, detector)"
                    )
        out[name] = table
    return out


def _latest_objects(objects: pa.Table) -> pa.Table:
    """One row per ``diaObjectId``: the latest version (validityStart, then nDiaSources)."""
    if objects.num_rows == 0:
        return objects
    ids = objects["diaObjectId"].to_numpy()
    start = objects["validityStartMjdTai"].to_numpy()
    n = objects["nDiaSources"].to_numpy()
    order = np.lexsort((-n, -start, ids))
    first = np.r_[True, ids[order][1:] != ids[order][:-1]]
    return objects.take(pa.array(order[first]))


def _unique_rows(table: pa.Table, key: str) -> pa.Table:
    """Rows with distinct ``key``, sorted by it (duplicates come only from a crashed re-write)."""
    if table.num_rows == 0:
        return table
    ids = table[key].to_numpy()
    _, first = np.unique(ids, return_index=True)
    return table.take(pa.array(first))


class Apdb:
    """The APDB under a storage root.

    Parameters
    ----------
    root
        A :class:`~ppray.storage.Storage` or its root (local path or ``pyarrow.fs`` URI).
    nside
        HEALPix partition resolution (NESTED); 32 gives 3.4 deg² pixels, a few per
        LSSTCam visit. Fixed at the first write (``_config.json``); opening with a
        different one is an error.
    prefix
        Key prefix inside the root.
    object_pad_arcsec
        Reads of DiaObjects cover the footprint padded by this much, so a version
        written from a slightly different mean position (another pixel) is still seen.
    """

    def __init__(
        self,
        root: str | Storage,
        *,
        nside: int = 32,
        prefix: str = "apdb",
        object_pad_arcsec: float = 10.0,
        schema: AlertSchema | None = None,
    ) -> None:
        if nside < 1 or nside & (nside - 1):
            raise ValueError(f"nside must be a power of two, not {nside}")
        self.storage = root if isinstance(root, Storage) else Storage(root)
        self.nside = nside
        self.prefix = prefix
        self.object_pad_arcsec = object_pad_arcsec
        self.schema = schema or load_alert_schema()
        self._checked = False

    def _check_config(self, creating: bool) -> None:
        if self._checked:
            return
        key = apdb_config_key(self.prefix)
        if self.storage.exists(key):
            stored = self.storage.read_json(key)
            if stored.get("nside") != self.nside:
                raise NonRetriableError(
                    f"APDB at {self.storage.root}/{self.prefix} is partitioned at nside "
                    f"{stored.get('nside')}, not {self.nside}"
                )
        elif creating:
            self.storage.write_json(
                key, {"nside": self.nside, "schema": self.schema.version_string}
            )
        else:
            return  # nothing written yet: check again on the next call
        self._checked = True

    def _file_key(self, table: str, pixel: int, stem: str) -> str:
        return apdb_file_key(self.prefix, table, self.nside, pixel, stem)

    def write(
        self,
        visit: int,
        detector: int,
        *,
        dia_sources: pa.Table | None = None,
        dia_forced_sources: pa.Table | None = None,
        dia_objects: pa.Table | None = None,
        writer: str = "",
    ) -> list[str]:
        """Make the APDB rows of ``(visit, detector)`` exactly these (None: no rows).

        Parameters
        ----------
        visit, detector
            The unit of replacement; every DiaSource and DiaForcedSource row must carry them.
        dia_sources, dia_forced_sources, dia_objects
            Tables with the schema's columns (cast; missing nullable columns become null).
            ``dia_objects`` holds the objects this detector created or updated.
        writer
            Distinguishes writers that each own part of one ``(visit, detector)``
            (e.g. sky shards); each replaces only its own earlier rows.

        Returns
        -------
        list of str
            The keys written.

        Raises
        ------
        ValueError
            A table lacks a required column, has nulls in one, or holds rows of
            another visit or detector.
        """
        if writer and not writer.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"writer {writer!r} must be alphanumeric (with - or _)")
        tables = conformed_rows(
            visit,
            detector,
            {"DiaSource": dia_sources, "DiaForcedSource": dia_forced_sources,
             "DiaObject": dia_objects},
            self.schema,
        )  # fmt: skip
        stem = f"v{int(visit)}_d{int(detector)}" + (f"_{writer}" if writer else "")
        files: dict[str, pa.Table] = {}
        for name, table in tables.items():
            key = _KEYS[name]
            if pc.count_distinct(table[key]).as_py() != table.num_rows:
                raise ValueError(f"{name}: duplicate {key} values")
            pix = healpix_pixels(table["ra"].to_numpy(), table["dec"].to_numpy(), self.nside)
            for p in np.unique(pix):
                part = table.filter(pa.array(pix == p))
                files[self._file_key(name, int(p), stem)] = part.sort_by(key)
        self._check_config(creating=True)
        manifest_key = apdb_manifest_key(self.prefix, stem)
        old = (
            set(self.storage.read_json(manifest_key)["keys"])
            if self.storage.exists(manifest_key)
            else set()
        )
        for key, part in sorted(files.items()):
            self.storage.write_parquet(key, part)
        manifest = {"visit": int(visit), "detector": int(detector), "writer": writer}
        self.storage.write_json(manifest_key, {**manifest, "keys": sorted(files)})
        for key in sorted(old - set(files)):
            if self.storage.exists(key):
                self.storage.delete(key)
        return sorted(files)

    def _pixel_keys(self, table: str, pixels: np.ndarray) -> list[str]:
        base = f"{self.prefix}/{table}/nside{self.nside}"
        if pixels.size > 64:  # one listing of the table beats thousands of small ones
            wanted = {str(int(p)) for p in pixels}
            keys = self.storage.list(base, ".parquet")
            return [k for k in keys if posixpath.basename(posixpath.dirname(k)) in wanted]
        out: list[str] = []
        for p in pixels:
            out.extend(self.storage.list(f"{base}/{int(p)}", ".parquet"))
        return out

    def _read(self, table: str, pixels: np.ndarray) -> pa.Table:
        parts = [self.storage.read_parquet(k) for k in self._pixel_keys(table, pixels)]
        target = self.schema.arrow_schema(TABLES[table])
        if not parts:
            return target.empty_table()
        return pa.concat_tables([conform_table(p, TABLES[table], self.schema) for p in parts])

    def read(
        self,
        footprint: Footprint,
        *,
        mjd_tai: float | None = None,
        history_days: float = 365.0,
    ) -> ApdbTables:
        """DiaObjects in ``footprint`` and their recent DiaSources and DiaForcedSources.

        Parameters
        ----------
        footprint
            Where the objects' (latest) positions must lie.
        mjd_tai
            "Now": sources with ``midpointMjdTai < mjd_tai - history_days`` are left
            out. None keeps all.
        history_days
            Length of the source history (Rubin preloads 12 months).

        Returns
        -------
        ApdbTables
            Objects (latest version, sorted by id) and the sources and forced
            sources of those objects (sorted by id).
        """
        self._check_config(creating=False)
        if not (history_days >= 0 and math.isfinite(history_days)):
            raise ValueError(f"history_days must be finite and >= 0, not {history_days}")
        pad = self.object_pad_arcsec
        objects = _latest_objects(self._read("DiaObject", footprint.healpix(self.nside, pad)))
        inside = footprint.contains(objects["ra"].to_numpy(), objects["dec"].to_numpy())
        objects = objects.filter(pa.array(inside)).sort_by("diaObjectId")
        ids = objects["diaObjectId"]
        # A source lies within the association radius of its object's position;
        # the same padding as the objects' covers it.
        source_pixels = footprint.healpix(self.nside, pad)
        out = {}
        for name in ("DiaSource", "DiaForcedSource"):
            rows = _unique_rows(self._read(name, source_pixels), _KEYS[name])
            keep = pc.is_in(rows["diaObjectId"], value_set=ids)
            if mjd_tai is not None:
                recent = pc.greater_equal(rows["midpointMjdTai"], mjd_tai - history_days)
                keep = pc.and_(keep, recent)
            out[name] = rows.filter(pc.fill_null(keep, False))
        return ApdbTables(objects, out["DiaSource"], out["DiaForcedSource"])
