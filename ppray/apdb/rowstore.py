"""Columnar row storage for the in-memory APDB state, and a fast sorted ``unique``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["RowStore", "unique_sorted"]


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (numpy's hash-based ``unique`` is 10x slower on 1e6 ints)."""
    s = np.sort(np.asarray(values).ravel())
    return s[np.r_[True, s[1:] != s[:-1]]] if s.size else s


class RowStore:
    """Append-only rows: pyarrow chunks for output, growable numpy columns for arithmetic.

    The pyarrow rows are a combined ``base`` plus a ``tail`` of recent chunks, so a
    ``take`` costs the rows taken, not a copy of everything held; the tail is folded
    into the base once it is a quarter of it (amortised O(1) per row).
    """

    def __init__(self, empty: pa.Table, dtypes: dict[str, Any]) -> None:
        self._base = empty
        self._tail: list[pa.Table] = []
        self._tail_rows = 0
        self._cols = {k: np.empty(0, dtype=v) for k, v in dtypes.items()}
        self._cols["alive"] = np.empty(0, dtype=bool)
        self.n = 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self._cols[name][: self.n]

    def append(self, table: pa.Table, **cols: np.ndarray) -> np.ndarray:
        m = table.num_rows
        need = self.n + m
        if need > self._cols["alive"].size:
            cap = max(need, 2 * self._cols["alive"].size, 1024)
            for k, v in self._cols.items():
                grown = np.empty((cap, *v.shape[1:]), dtype=v.dtype)
                grown[: self.n] = v[: self.n]
                self._cols[k] = grown
        for k, v in cols.items():
            self._cols[k][self.n : need] = v
        self._cols["alive"][self.n : need] = True
        rows = np.arange(self.n, need)
        self.n = need
        if self._base.num_rows == 0 and not self._tail:
            self._base = table
        else:
            self._tail.append(table)
            self._tail_rows += m
            if self._tail_rows > max(self._base.num_rows // 4, 65536) or len(self._tail) > 256:
                self._base = pa.concat_tables([self._base, *self._tail]).combine_chunks()
                self._tail, self._tail_rows = [], 0
        return rows

    def kill(self, rows: np.ndarray) -> None:
        self._cols["alive"][rows] = False

    def take(self, rows: np.ndarray) -> pa.Table:
        """Rows by index, in that order; a negative index gives a null row."""
        rows = np.asarray(rows, dtype=np.int64)
        n_base = self._base.num_rows
        if rows.size == 0 or not self._tail or rows.max() < n_base:
            return self._base.take(pa.array(rows, mask=rows < 0))
        tail = pa.concat_tables(self._tail).combine_chunks()
        in_tail = rows >= n_base
        from_base = rows[~in_tail]
        both = pa.concat_tables(
            [
                self._base.take(pa.array(from_base, mask=from_base < 0)),
                tail.take(pa.array(rows[in_tail] - n_base)),
            ]
        )
        # Back to the order asked for: base rows first in ``both``, then tail rows.
        order = np.empty(rows.size, dtype=np.int64)
        order[~in_tail] = np.arange(from_base.size)
        order[in_tail] = np.arange(rows.size - from_base.size) + from_base.size
        return both.take(pa.array(order))

    def compact(self) -> np.ndarray:
        """Drop dead rows; returns the new index of each old row (-1 for dropped ones)."""
        alive = self["alive"]
        keep = np.flatnonzero(alive)
        table = self.take(keep).combine_chunks()
        remap = np.full(self.n, -1, dtype=np.int64)
        remap[keep] = np.arange(keep.size)
        for k, v in self._cols.items():
            self._cols[k] = v[keep].copy()
        self.n = keep.size
        self._base, self._tail, self._tail_rows = table, [], 0
        return remap
