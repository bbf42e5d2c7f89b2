"""Association of DIA sources with DiaObjects, on a shard that owns a region of sky.

:class:`ApdbShard` is the plain state class a sky-sharded APDB actor wraps. It
keeps its DiaObjects and their recent DiaSources and DiaForcedSources in
memory, answers preload queries (:meth:`ApdbShard.preload`), associates
(:meth:`ApdbShard.associate`), records forced photometry
(:meth:`ApdbShard.record_forced`) and returns its state
(:meth:`ApdbShard.snapshot`); it does no I/O (the caller writes what it
returns with :class:`ppray.apdb.store.Apdb`).

Association, for the DIA sources of one visit:

- Each source is matched to DiaObjects within ``radius_arcsec`` (chord
  distance between unit vectors in a ``scipy.spatial.cKDTree``: exact at the
  poles and across RA 0/360). Candidate pairs are accepted nearest first
  (ties by ``diaSourceId``, then ``diaObjectId``); a source takes at most one
  object and an object at most one source of each detector, so a source
  whose nearest object went to a nearer source takes its next candidate.
- Sources left over create DiaObjects with ``diaObjectId = diaSourceId``.
- Within visit ``v`` objects are matched at their positions *before* ``v``
  and objects created in ``v`` are not matchable, so the detectors of a visit
  never see each other's effects: any order of ``associate`` calls for the
  detectors of one visit (or one call with all of them) gives the same
  result. (Detectors do not overlap on the sky, so "one source per object per
  detector" is one per visit in practice.) Visits are expected in time order;
  a late detector of visit ``v`` after visit ``v+1`` sees ``v+1``'s sources.
- Re-associating a ``(visit, detector)`` (a retry) first removes what its
  earlier attempt added, then associates afresh: same ids, no duplicates.

DiaObject summaries are recomputed from the object's DiaSources and
DiaForcedSources held by the shard (the last ``history_days``, as Rubin's
preload): ``ra``/``dec`` the mean unit vector, ``raErr`` = ``sqrt(sum
raErr_i²) / n``; per band ``<b>_psfFluxMean`` (inverse-variance weighted),
``MeanErr`` (``1/sqrt(sum w)``), ``Sigma`` (sample std), ``Ndata``, ``Min``,
``Max``, ``ErrMean``, ``MaxSlope`` (largest ``dflux/dt`` between consecutive
observations, nJy/d); ``<b>_fpFluxMean``/``<b>_scienceFluxMean`` (and errors)
from forced photometry on the difference / science images;
``nDiaSources``, ``first``/``lastDiaSourceMjdTai``; ``validityStartMjdTai`` =
the ``midpointMjdTai`` of the latest source or forced source (the visit that
made this version, as Rubin's APDB records it; reproducible, unlike processing
time).
Sums run over rows sorted by (object, time, id), so results are bit-identical
whatever order the rows arrived in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.spatial import cKDTree

from ppray.apdb.diaobject import FORCED_FIELDS, summarize
from ppray.apdb.ids import pack_id
from ppray.apdb.rowstore import RowStore, unique_sorted
from ppray.apdb.store import ApdbTables
from ppray.schema import AlertSchema, conform_table, load_alert_schema, table_from_columns
from ppray.skyregion import Footprint, chord, pairs_within, radec_to_xyz, xyz_to_radec

__all__ = ["ApdbShard", "AssociationResult"]

# In a pack_id id, bits above _HEAD_SHIFT name the (exposure, detector) that made it.
_HEAD_SHIFT = 21


def _num(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as numpy, nulls as NaN."""
    return pc.fill_null(table[name], np.nan).to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class AssociationResult:
    """What :meth:`ApdbShard.associate` emits for one visit's DIA sources.

    Attributes
    ----------
    dia_sources
        The input DiaSources sorted by ``diaSourceId``, ``diaObjectId`` filled in.
    dia_objects
        The new and updated DiaObjects (their latest rows), sorted by id.
    prv_dia_sources, prv_dia_forced_sources
        Those objects' history before this visit (within ``history_days``).
    n_matched, n_new
        Sources matched to existing objects / that created new objects.
    """

    dia_sources: pa.Table
    dia_objects: pa.Table
    prv_dia_sources: pa.Table
    prv_dia_forced_sources: pa.Table
    n_matched: int
    n_new: int


class ApdbShard:
    """DiaObjects of one region of sky, in memory: preload, association, summaries.

    Parameters
    ----------
    region
        The sky this shard owns (None: all sky). :meth:`associate` rejects sources
        outside it; :meth:`owns` tells the router which shard takes a source.
    radius_arcsec
        Association radius.
    history_days
        Sources and forced sources older than this before the visit being
        associated are dropped (:meth:`expire`): summaries and history cover
        this window, as Rubin's 12-month preload does.
    schema
        Alert schema (default the newest).
    """

    def __init__(
        self,
        region: Footprint | None = None,
        *,
        radius_arcsec: float = 1.0,
        history_days: float = 365.0,
        schema: AlertSchema | None = None,
    ) -> None:
        if not (0 < radius_arcsec < 3600 and history_days >= 0):
            raise ValueError(
                f"need 0 < radius_arcsec < 3600 and history_days >= 0, "
                f"not {radius_arcsec}, {history_days}"
            )
        self.region = region
        self.radius_arcsec = float(radius_arcsec)
        self.history_days = float(history_days)
        self.schema = schema or load_alert_schema()
        self._r = chord(radius_arcsec / 3600.0)
        self._band_codes = {b: i for i, b in enumerate(self.schema.bands)}
        self._reset()

    def _reset(self) -> None:
        s = self.schema
        f8, i8 = np.float64, np.int64
        src: dict[str, Any] = {k: f8 for k in ("mjd", "flux", "err", "raErr", "decErr", "cov")}
        src.update(obj=i8, visit=i8, det=i8, band=np.int8, id=i8)
        self._src = RowStore(s.arrow_schema("diaSource").empty_table(), {**src, "xyz": (f8, (3,))})
        forced: dict[str, Any] = {k: f8 for k in ("mjd", "flux", "err", "sflux", "serr")}
        forced.update(obj=i8, visit=i8, det=i8, band=np.int8, id=i8)
        self._forced = RowStore(s.arrow_schema("diaForcedSource").empty_table(), forced)
        # Objects: dense index -> state; rows live in _rows (a RowStore of DiaObject versions).
        self._rows = RowStore(s.arrow_schema("diaObject").empty_table(), {})
        self._n = 0
        self._ids = np.empty(0, dtype=i8)
        self._xyz = np.empty((0, 3))
        self._mxyz = np.empty((0, 3))  # position without the sources of _last_visit
        self._last_visit = np.empty(0, dtype=i8)
        self._alive = np.empty(0, dtype=bool)
        self._row = np.empty(0, dtype=i8)
        self._sorted_ids = np.empty(0, dtype=i8)
        self._sorted_idx = np.empty(0, dtype=i8)
        self._tree: cKDTree | None = None
        self._n_tree = 0
        self._drift = 0.0
        self._done: set[tuple[int, int]] = set()
        self._done_forced: set[tuple[int, int]] = set()
        self._latest_mjd = -math.inf

    # ---- objects -------------------------------------------------------------------------

    def _grow(self, m: int) -> np.ndarray:
        need = self._n + m
        if need > self._ids.size:
            cap = max(need, 2 * self._ids.size, 1024)
            for name, fill in (("_ids", 0), ("_xyz", np.nan), ("_mxyz", np.nan)):
                old = getattr(self, name)
                new = np.full((cap, *old.shape[1:]), fill, dtype=old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)
            for name, fill in (("_last_visit", -1), ("_alive", False), ("_row", -1)):
                old = getattr(self, name)
                new = np.full(cap, fill, dtype=old.dtype)
                new[: self._n] = old[: self._n]
                setattr(self, name, new)
        idx = np.arange(self._n, need)
        self._n = need
        return idx

    def _add_objects(self, ids: np.ndarray, xyz: np.ndarray) -> np.ndarray:
        idx = self._grow(ids.size)
        self._ids[idx] = ids
        self._xyz[idx] = xyz
        self._mxyz[idx] = np.nan
        self._last_visit[idx] = -1
        self._alive[idx] = True
        pos = np.searchsorted(self._sorted_ids, ids)
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = np.insert(self._sorted_ids, pos[order], ids[order])
        self._sorted_idx = np.insert(self._sorted_idx, pos[order], idx[order])
        return idx

    def _lookup(self, ids: np.ndarray) -> np.ndarray:
        """Dense index of each object id, -1 where unknown."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._sorted_ids.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, self._sorted_ids.size - 1)
        return np.where(self._sorted_ids[pos] == ids, self._sorted_idx[pos], -1)

    def _set_rows(self, idx: np.ndarray, table: pa.Table) -> None:
        """Make ``table`` the current rows of objects ``idx`` (older versions become garbage)."""
        old = self._row[idx]
        self._rows.kill(old[old >= 0])
        self._row[idx] = self._rows.append(table)
        if self._rows.n > 2 * self._n + 65536:
            remap = self._rows.compact()
            rows = self._row[: self._n]
            self._row[: self._n] = np.where(rows >= 0, remap[np.maximum(rows, 0)], -1)

    def _object_rows(self, idx: np.ndarray) -> pa.Table:
        order = np.argsort(self._ids[idx], kind="stable")
        return self._rows.take(self._row[np.asarray(idx)[order]])

    @property
    def n_objects(self) -> int:
        """Number of live DiaObjects."""
        return int(self._alive[: self._n].sum())

    def owns(self, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
        """Which positions lie in this shard's region."""
        if self.region is None:
            return np.ones(np.shape(ra_deg), dtype=bool)
        return self.region.contains(ra_deg, dec_deg)

    # ---- loading and answering ------------------------------------------------------------

    def load(self, tables: ApdbTables) -> None:
        """Replace the state with these objects and their sources (an APDB read or a snapshot).

        Sources of objects not in ``tables.dia_objects`` are dropped.
        """
        self._reset()
        objects = conform_table(tables.dia_objects, "diaObject", self.schema)
        ids = objects["diaObjectId"].to_numpy()
        if unique_sorted(ids).size != ids.size:
            raise ValueError("dia_objects: duplicate diaObjectId values (load latest versions)")
        xyz = radec_to_xyz(objects["ra"].to_numpy(), objects["dec"].to_numpy())
        idx = self._add_objects(ids, xyz)
        self._set_rows(idx, objects)
        for table in (tables.dia_sources, tables.dia_forced_sources):
            forced = "diaForcedSourceId" in table.column_names
            record = "diaForcedSource" if forced else "diaSource"
            table = conform_table(table, record, self.schema) if table.num_rows else table
            if table.num_rows == 0:
                continue
            obj = self._lookup(pc.fill_null(table["diaObjectId"], -1).to_numpy())
            if (obj < 0).any():
                table, obj = table.filter(pa.array(obj >= 0)), obj[obj >= 0]
            if forced:
                self._append_forced(table, obj)
            else:
                self._append_sources(table, obj)
        touched = unique_sorted(self._src["obj"])
        self._positions(touched)
        self._build_tree()

    def preload(self, footprint: Footprint, mjd_tai: float | None = None) -> ApdbTables:
        """DiaObjects in ``footprint`` with their sources and forced sources of the last
        ``history_days`` before ``mjd_tai`` (default the latest visit seen).

        With ``mjd_tai`` (the start of the visit being prepared) the answer is the
        state before it, even when a retry of that visit has already been
        associated: objects it created are left out, the others stand where they
        stood before it, and its rows are not in the history. So a retried visit
        measures its forced photometry where its first attempt did.
        """
        n = self._n
        ra, dec = xyz_to_radec(self._xyz[:n])
        idx = np.flatnonzero(self._alive[:n] & footprint.contains(ra, dec))
        since = (self._latest_mjd if mjd_tai is None else mjd_tai) - self.history_days
        objects = self._object_rows(idx)
        sources = self._history(self._src, idx, since, exclude_visit=None)
        forced = self._history(self._forced, idx, since, exclude_visit=None)
        if mjd_tai is not None and objects.num_rows:
            first = pc.fill_null(objects["firstDiaSourceMjdTai"], -math.inf).to_numpy()
            last = pc.fill_null(objects["lastDiaSourceMjdTai"], -math.inf).to_numpy()
            before = first < mjd_tai
            moved = before & (last >= mjd_tai) & np.isfinite(self._mxyz[idx]).all(axis=1)
            if moved.any():
                m_ra, m_dec = xyz_to_radec(self._mxyz[idx[moved]])
                for name, values in (("ra", m_ra), ("dec", m_dec)):
                    column = objects[name].to_numpy().copy()
                    column[moved] = values
                    pos = objects.schema.get_field_index(name)
                    objects = objects.set_column(pos, objects.schema.field(name), pa.array(column))
            objects = objects.filter(pa.array(before))
            sources, forced = (
                t.filter(pc.less(t["midpointMjdTai"], mjd_tai)) for t in (sources, forced)
            )
        return ApdbTables(objects, sources, forced)

    def objects_in(self, footprint: Footprint) -> pa.Table:
        """The DiaObjects whose positions lie in ``footprint`` (e.g. for forced photometry)."""
        return self.preload(footprint).dia_objects

    def snapshot(self) -> ApdbTables:
        """The whole state: live objects and all their sources (:meth:`load` restores it)."""
        idx = np.flatnonzero(self._alive[: self._n])
        return ApdbTables(
            self._object_rows(idx),
            self._history(self._src, idx, -math.inf, exclude_visit=None),
            self._history(self._forced, idx, -math.inf, exclude_visit=None),
        )

    def expire(self, mjd_tai: float) -> int:
        """Drop sources and forced sources older than ``history_days`` before ``mjd_tai``."""
        dropped = 0
        for store in (self._src, self._forced):
            old = np.flatnonzero(store["alive"] & (store["mjd"] < mjd_tai - self.history_days))
            store.kill(old)
            dropped += old.size
            if store.n > 2 * int(store["alive"].sum()) + 65536:
                store.compact()  # rows are found by scanning, never kept by index
        return dropped

    def _history(
        self, store: RowStore, idx: np.ndarray, since: float, exclude_visit: int | None
    ) -> pa.Table:
        mark = np.zeros(self._n, dtype=bool)
        mark[idx] = True
        keep = store["alive"] & mark[store["obj"]] & (store["mjd"] >= since)
        if exclude_visit is not None:
            keep &= store["visit"] != exclude_visit
        rows = np.flatnonzero(keep)
        order = np.lexsort((store["id"][rows], store["mjd"][rows], self._ids[store["obj"][rows]]))
        return store.take(rows[order])

    # ---- appending rows -------------------------------------------------------------------

    def _band(self, table: pa.Table) -> np.ndarray:
        """Index of each row's band in the schema's bands (-1: another band or none)."""
        encoded = pc.fill_null(table["band"], "").combine_chunks().dictionary_encode()
        lookup = [self._band_codes.get(b, -1) for b in encoded.dictionary.to_pylist()]
        codes = np.asarray(lookup, dtype=np.int8)
        return codes[encoded.indices.to_numpy(zero_copy_only=False)]

    @staticmethod
    def _keys(visit: np.ndarray, det: np.ndarray) -> set[tuple[int, int]]:
        pairs = unique_sorted(visit.astype(np.int64) * 256 + det)
        return {(int(p) >> 8, int(p) & 255) for p in pairs}

    def _row_fields(self, table: pa.Table, obj: np.ndarray) -> dict[str, np.ndarray]:
        """What sources and forced sources both keep per row (nulls as NaN)."""
        return dict(
            obj=obj, visit=table["visit"].to_numpy(),
            det=table["detector"].to_numpy().astype(np.int64),
            mjd=_num(table, "midpointMjdTai"), band=self._band(table),
            flux=_num(table, "psfFlux"), err=_num(table, "psfFluxErr"),
        )  # fmt: skip

    def _append_sources(self, table: pa.Table, obj: np.ndarray) -> None:
        fields = self._row_fields(table, obj)
        self._src.append(
            table,
            **fields, raErr=_num(table, "raErr"), decErr=_num(table, "decErr"),
            cov=_num(table, "ra_dec_Cov"), id=table["diaSourceId"].to_numpy(),
            xyz=radec_to_xyz(_num(table, "ra"), _num(table, "dec")),
        )  # fmt: skip
        self._done.update(self._keys(fields["visit"], fields["det"]))
        if table.num_rows:
            self._latest_mjd = max(self._latest_mjd, float(np.nanmax(fields["mjd"])))

    def _append_forced(self, table: pa.Table, obj: np.ndarray) -> None:
        fields = self._row_fields(table, obj)
        self._forced.append(
            table,
            **fields, sflux=_num(table, "scienceFlux"), serr=_num(table, "scienceFluxErr"),
            id=table["diaForcedSourceId"].to_numpy(),
        )  # fmt: skip
        self._done_forced.update(self._keys(fields["visit"], fields["det"]))

    # ---- spatial index --------------------------------------------------------------------

    def _build_tree(self) -> None:
        n = self._n
        pos = np.where(np.isfinite(self._xyz[:n]), self._xyz[:n], self._mxyz[:n])
        # Dead or position-less objects sit at the origin: a chord of 1 from every source.
        pos = np.where(np.isfinite(pos) & self._alive[:n, None], pos, 0.0)
        self._tree_xyz = pos
        # An unbalanced tree builds 2-3x faster and queries as fast on sky positions.
        self._tree = cKDTree(pos, balanced_tree=False, compact_nodes=False) if n else None
        self._n_tree = n
        self._drift = 0.0

    def _note_moved(self, idx: np.ndarray) -> None:
        idx = idx[idx < self._n_tree]
        if idx.size == 0:
            return
        base = self._tree_xyz[idx]
        d = np.fmax(
            np.linalg.norm(self._xyz[idx] - base, axis=1),
            np.linalg.norm(self._mxyz[idx] - base, axis=1),
        )
        d = d[np.isfinite(d)]
        if d.size:
            self._drift = max(self._drift, float(d.max()))

    def _match_positions(self, idx: np.ndarray, visit: int) -> np.ndarray:
        """Where objects ``idx`` stand for matching in ``visit`` (NaN: not matchable)."""
        use_prev = self._last_visit[idx] == visit
        pos = np.where(use_prev[:, None], self._mxyz[idx], self._xyz[idx])
        # Objects created in this visit by another detector have no position before it.
        return np.where(self._alive[idx, None], pos, np.nan)

    def _candidates(self, xyz: np.ndarray, visit: int) -> tuple[np.ndarray, np.ndarray]:
        """Pairs (source row, object index) within the radius, at matching positions."""
        pending = self._n - self._n_tree
        if self._tree is None or pending > max(4096, self._n_tree // 20) or self._drift > self._r:
            self._build_tree()
        pairs_i, pairs_j = [], []
        if self._tree is not None:
            i, j = pairs_within(self._tree, xyz, self._r + self._drift)
            pairs_i.append(i)
            pairs_j.append(j)
        if self._n > self._n_tree:
            extra = np.arange(self._n_tree, self._n)
            pos = self._match_positions(extra, visit)
            ok = np.isfinite(pos).all(axis=1)
            if ok.any():
                i, j = pairs_within(cKDTree(pos[ok]), xyz, self._r)
                pairs_i.append(i)
                pairs_j.append(extra[ok][j])
        if not pairs_i:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(pairs_i), np.concatenate(pairs_j)

    # ---- summaries ------------------------------------------------------------------------

    def _rows_of(self, store: RowStore, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Live rows of ``store`` belonging to objects ``idx``, and their group in ``idx``."""
        group = np.full(self._n, -1, dtype=np.int64)
        group[idx] = np.arange(idx.size)
        g = group[store["obj"]]
        rows = np.flatnonzero(store["alive"] & (g >= 0))
        return rows, g[rows]

    def _summary(self, idx: np.ndarray, positions_only: bool = False) -> Any:
        rows, g = self._rows_of(self._src, idx)
        src = {k: self._src[k][rows] for k in ("id", "visit", "mjd", "band", "flux", "err")}
        src.update({k: self._src[k][rows] for k in ("xyz", "raErr", "decErr", "cov")}, g=g)
        frows, fg = self._rows_of(self._forced, idx)
        keys = ("id", "mjd", "band", "flux", "err", "sflux", "serr")
        forced = {k: self._forced[k][frows] for k in keys} | {"g": fg}
        return summarize(idx.size, src, forced, self.schema.bands, positions_only=positions_only)

    def _positions(self, idx: np.ndarray) -> None:
        """Set ``last_visit`` and the pre-visit position of objects ``idx`` (after a load)."""
        if idx.size == 0:
            return
        summary = self._summary(idx, positions_only=True)
        self._last_visit[idx] = summary.last_visit
        self._mxyz[idx] = summary.xyz_before_last

    def _recompute(self, idx: np.ndarray) -> None:
        """New summary rows and positions for objects ``idx`` from the rows held."""
        idx = unique_sorted(idx)
        idx = idx[self._alive[idx]]
        if idx.size == 0:
            return
        summary = self._summary(idx)
        has_src = summary.n_sources > 0
        self._last_visit[idx] = summary.last_visit
        self._mxyz[idx] = summary.xyz_before_last
        self._xyz[idx[has_src]] = summary.xyz[has_src]
        self._note_moved(idx)
        cols = summary.columns
        cols["diaObjectId"] = self._ids[idx]
        if has_src.all():
            self._set_rows(idx, table_from_columns(cols, idx.size, "diaObject", self.schema))
            return
        if has_src.any():
            sub = {k: v[has_src] for k, v in cols.items()}
            rows = table_from_columns(sub, int(has_src.sum()), "diaObject", self.schema)
            self._set_rows(idx[has_src], rows)
        # Without sources in memory (all older than history_days) the source-derived
        # fields stay as last written; forced photometry still updates its means.
        only_forced = ~has_src & (summary.n_forced > 0)
        if only_forced.any():
            keep = idx[only_forced]
            old = self._rows.take(self._row[keep])
            for b in self.schema.bands:
                for f in FORCED_FIELDS:
                    name = f"{b}_{f}"
                    pos = old.schema.get_field_index(name)
                    value = pa.array(cols[name][only_forced], old.schema.field(name).type,
                                     from_pandas=True)  # fmt: skip
                    old = old.set_column(pos, old.schema.field(name), value)
            self._set_rows(keep, old)

    # ---- association ----------------------------------------------------------------------

    def _undo(
        self, store: RowStore, done: set[tuple[int, int]], keys: set[tuple[int, int]]
    ) -> np.ndarray:
        """Drop the rows an earlier attempt of these (visit, detector)s added; their objects."""
        keys = keys & done
        if not keys:
            return np.zeros(0, dtype=np.int64)
        visit, det = store["visit"], store["det"]
        hit = np.zeros(store.n, dtype=bool)
        for v, d in keys:
            hit |= (visit == v) & (det == d)
        rows = np.flatnonzero(hit & store["alive"])
        store.kill(rows)
        done -= keys
        objs = unique_sorted(store["obj"][rows])
        if store is self._src:
            # Objects those attempts created and nothing else holds up go away (ids come back
            # with the same values if the retry creates them again).
            heads = [int(pack_id(v, d, 0)) >> _HEAD_SHIFT for v, d in keys]
            left = np.bincount(self._src["obj"][self._src["alive"]], minlength=self._n)
            created = np.isin(self._ids[objs] >> _HEAD_SHIFT, heads) & (left[objs] == 0)
            self._alive[objs[created]] = False
        return objs

    def associate(self, dia_sources: pa.Table) -> AssociationResult:
        """Associate one visit's DIA sources (one or several detectors) with DiaObjects.

        Parameters
        ----------
        dia_sources
            ``diaSource`` rows of one visit (:func:`ppray.alerts.diasource.dia_source_table`);
            ``diaObjectId`` is ignored and filled in.

        Returns
        -------
        AssociationResult

        Raises
        ------
        ValueError
            Rows of several visits, duplicate ``diaSourceId``, non-finite positions,
            or sources outside this shard's region.
        """
        table = conform_table(
            dia_sources.drop_columns(
                [c for c in ("diaObjectId",) if c in dia_sources.column_names]
            ),
            "diaSource",
            self.schema,
        ).sort_by("diaSourceId")
        n = table.num_rows
        if n == 0:
            empty = ApdbTables.empty(self.schema)
            return AssociationResult(
                table, empty.dia_objects, empty.dia_sources, empty.dia_forced_sources, 0, 0
            )
        visits = unique_sorted(table["visit"].to_numpy())
        if visits.size != 1:
            raise ValueError(f"associate one visit at a time, not visits {visits[:5].tolist()}")
        visit = int(visits[0])
        ids = table["diaSourceId"].to_numpy()
        if unique_sorted(ids).size != n:
            raise ValueError("dia_sources: duplicate diaSourceId values")
        ra, dec = table["ra"].to_numpy(), table["dec"].to_numpy()
        bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90))
        if bad.any():
            raise ValueError(f"dia_sources {ids[bad][:5].tolist()} have invalid ra/dec")
        outside = ~self.owns(ra, dec)
        if outside.any():
            raise ValueError(
                f"{int(outside.sum())} DIA sources lie outside this shard's region "
                f"(e.g. diaSourceId {ids[outside][:3].tolist()}): route them with owns()"
            )
        det = table["detector"].to_numpy().astype(np.int64)
        # History older than history_days before this visit leaves summaries and alerts.
        self.expire(float(table["midpointMjdTai"].to_numpy().max()))
        keys = {(visit, int(d)) for d in unique_sorted(det)}
        undone = self._undo(self._src, self._done, keys)
        self._recompute(undone)

        xyz = radec_to_xyz(ra, dec)
        assigned = np.full(n, -1, dtype=np.int64)
        i, j = self._candidates(xyz, visit)
        if i.size:
            dist = np.linalg.norm(xyz[i] - self._match_positions(j, visit), axis=1)
            ok = dist <= self._r  # NaN (not matchable) compares False
            i, j, dist = i[ok], j[ok], dist[ok]
            order = np.lexsort((self._ids[j], ids[i], dist))
            claimed: set[tuple[int, int]] = set()
            for a, b in zip(i[order].tolist(), j[order].tolist(), strict=True):
                key = (b, int(det[a]))
                if assigned[a] < 0 and key not in claimed:
                    claimed.add(key)
                    assigned[a] = b
        n_matched = int((assigned >= 0).sum())
        new = np.flatnonzero(assigned < 0)
        if new.size:
            # A retry re-creates its objects under the same ids: reuse their slots.
            slot = self._lookup(ids[new])
            fresh = slot < 0
            if fresh.any():
                slot[fresh] = self._add_objects(ids[new][fresh], xyz[new][fresh])
            revived = slot[~fresh & ~self._alive[np.maximum(slot, 0)]]
            self._alive[revived] = True
            self._xyz[slot[~fresh]] = np.where(
                self._alive[slot[~fresh], None] & np.isfinite(self._xyz[slot[~fresh]]),
                self._xyz[slot[~fresh]],
                xyz[new][~fresh],
            )
            assigned[new] = slot
        table = table.set_column(
            table.schema.get_field_index("diaObjectId"),
            table.schema.field("diaObjectId"),
            pa.array(self._ids[assigned], pa.int64()),
        )
        self._append_sources(table, assigned)
        touched = unique_sorted(assigned)
        self._recompute(np.concatenate([touched, undone]))

        since = float(table["midpointMjdTai"].to_numpy().max()) - self.history_days
        return AssociationResult(
            dia_sources=table,
            dia_objects=self._object_rows(touched),
            prv_dia_sources=self._history(self._src, touched, since, exclude_visit=visit),
            prv_dia_forced_sources=self._history(self._forced, touched, since, exclude_visit=visit),
            n_matched=n_matched,
            n_new=n - n_matched,
        )

    def record_forced(self, dia_forced_sources: pa.Table) -> pa.Table:
        """Add forced photometry (one or several detectors of one visit); re-recording a
        ``(visit, detector)`` replaces its rows.

        Returns
        -------
        pyarrow.Table
            The DiaObjects whose ``fpFlux``/``scienceFlux`` means changed (latest rows).

        Raises
        ------
        ValueError
            A row names a DiaObject this shard does not hold.
        """
        table = conform_table(dia_forced_sources, "diaForcedSource", self.schema)
        if table.num_rows == 0:
            return self.schema.arrow_schema("diaObject").empty_table()
        obj = self._lookup(table["diaObjectId"].to_numpy())
        unknown = (obj < 0) | ~self._alive[np.maximum(obj, 0)]
        if unknown.any():
            bad = table["diaObjectId"].to_numpy()[unknown][:5].tolist()
            raise ValueError(f"forced sources name DiaObjects this shard does not hold: {bad}")
        visit = table["visit"].to_numpy()
        det = table["detector"].to_numpy().astype(np.int64)
        keys = set(zip(visit.tolist(), det.tolist(), strict=True))
        undone = self._undo(self._forced, self._done_forced, keys)
        self._append_forced(table, obj)
        touched = unique_sorted(np.concatenate([obj, undone]))
        self._recompute(touched)
        return self._object_rows(touched[self._alive[touched]])
