"""The Rubin alert schema, loaded from the installed ``lsst-alert-packet`` package.

The schema is never copied into ppray: :func:`load_alert_schema` reads the
version ppray writes, :data:`ALERT_SCHEMA_VERSION` (11.1, first shipped by
``lsst-alert-packet`` 30.2026.2700, the lower bound in ``pyproject.toml``; pinned so
that a newer package does not change the alerts under the brokers' feet), through
the package's own loader
(``lsst.alert.packet.Schema.from_file``), and everything else here is derived
from it: the pyarrow schemas of the APDB tables (``diaSource``, ``diaObject``,
``diaForcedSource`` records; column names are the Avro field names), which
fields are required, and the photometric bands of the ``diaObject`` summaries.

Avro -> Arrow types: ``long`` int64, ``int`` int32, ``float`` float32,
``double`` float64, ``boolean`` bool, ``string`` string, ``bytes`` binary; a
``["null", T]`` union is a nullable ``T``, anything else is non-nullable.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lsst.alert.packet import Schema, get_schema_path

__all__ = [
    "ALERT_SCHEMA_VERSION",
    "RECORDS",
    "AlertSchema",
    "conform_table",
    "load_alert_schema",
    "table_from_columns",
]

ALERT_SCHEMA_VERSION = (11, 1)
"""The alert schema ppray writes: ``(major, minor)``; its registry id is 1101."""

RECORDS = ("diaSource", "diaObject", "diaForcedSource")
"""The flat records of the alert schema that are also APDB tables."""

_ARROW_TYPES: dict[str, pa.DataType] = {
    "long": pa.int64(),
    "int": pa.int32(),
    "float": pa.float32(),
    "double": pa.float64(),
    "boolean": pa.bool_(),
    "string": pa.string(),
    "bytes": pa.binary(),
}


def _arrow_field(avro_field: dict[str, Any], record: str) -> pa.Field:
    avro_type = avro_field["type"]
    nullable = False
    if isinstance(avro_type, list):
        non_null = [t for t in avro_type if t != "null"]
        if len(non_null) != 1 or len(avro_type) != 2:
            raise NotImplementedError(f"{record}.{avro_field['name']}: union {avro_type}")
        nullable, avro_type = True, non_null[0]
    if not isinstance(avro_type, str) or avro_type not in _ARROW_TYPES:
        raise NotImplementedError(f"{record}.{avro_field['name']}: Avro type {avro_type!r}")
    return pa.field(avro_field["name"], _ARROW_TYPES[avro_type], nullable=nullable)


@dataclass(frozen=True, eq=False)
class AlertSchema:
    """One version of the Rubin alert schema and what ppray derives from it.

    Attributes
    ----------
    version
        ``(major, minor)``, e.g. ``(11, 1)``.
    packet
        The package's own ``lsst.alert.packet.Schema`` (its ``serialize`` /
        ``deserialize`` / ``validate`` work on alert dicts).
    definition
        The parsed Avro definition of the whole alert (``fastavro`` parsed form;
        pass it to ``fastavro.schemaless_writer`` without re-parsing).
    schema_id
        The package's schema id (``Schema.get_schema_id``: ``major * 100 + minor``),
        used in the Confluent wire-format header.
    """

    version: tuple[int, int]
    packet: Schema
    definition: dict[str, Any]
    schema_id: int
    records: dict[str, dict[str, Any]] = field(repr=False)
    _arrow: dict[str, pa.Schema] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def alert_fields(self) -> tuple[str, ...]:
        """Top-level field names of the alert record."""
        return tuple(f["name"] for f in self.definition["fields"])

    def record(self, name: str) -> dict[str, Any]:
        """The Avro definition of ``diaSource``, ``diaObject`` or ``diaForcedSource``."""
        try:
            return self.records[name]
        except KeyError as exc:
            raise KeyError(
                f"alert schema {self.version_string} has no record {name!r}; "
                f"known: {sorted(self.records)}"
            ) from exc

    @property
    def version_string(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    def arrow_schema(self, name: str) -> pa.Schema:
        """The pyarrow schema of record ``name`` (an APDB table)."""
        if name not in self._arrow:
            rec = self.record(name)
            self._arrow[name] = pa.schema([_arrow_field(f, name) for f in rec["fields"]])
        return self._arrow[name]

    def required(self, name: str) -> tuple[str, ...]:
        """Fields of record ``name`` that may not be null."""
        return tuple(f.name for f in self.arrow_schema(name) if not f.nullable)

    @functools.cached_property
    def bands(self) -> tuple[str, ...]:
        """Bands with ``<band>_psfFluxMean`` in ``diaObject``, in schema order (``ugrizy``)."""
        names = [f["name"] for f in self.record("diaObject")["fields"]]
        return tuple(m.group(1) for n in names if (m := re.fullmatch(r"(\w)_psfFluxMean", n)))


def _find_records(node: Any, out: dict[str, dict[str, Any]]) -> None:
    """Collect every named record of a parsed Avro schema by its short name."""
    if isinstance(node, dict):
        if node.get("type") == "record":
            out.setdefault(str(node["name"]).rsplit(".", 1)[-1], node)
        for key, value in node.items():
            if key != "__named_schemas":
                _find_records(value, out)
    elif isinstance(node, list):
        for value in node:
            _find_records(value, out)


@functools.lru_cache(maxsize=8)
def load_alert_schema(version: tuple[int, int] | None = None) -> AlertSchema:
    """Load an alert schema shipped by ``lsst-alert-packet`` (cached).

    Parameters
    ----------
    version
        ``(major, minor)``; default :data:`ALERT_SCHEMA_VERSION`.

    Raises
    ------
    ValueError
        If the package does not ship that version.
    """
    major, minor = version if version is not None else ALERT_SCHEMA_VERSION
    path = f"{get_schema_path(major, minor)}/lsst.v{major}_{minor}.alert.avsc"
    if not os.path.isfile(path):
        raise ValueError(
            f"the installed lsst-alert-packet ships no alert schema {major}.{minor} ({path}): "
            "install lsst-alert-packet>=30.2026.2700"
        )
    packet = Schema.from_file(path)
    records: dict[str, dict[str, Any]] = {}
    _find_records(packet.definition, records)
    missing = [r for r in RECORDS if r not in records]
    if missing:
        raise ValueError(f"alert schema {major}.{minor} lacks records {missing}")
    return AlertSchema(
        version=(major, minor),
        packet=packet,
        definition=packet.definition,
        schema_id=int(packet.get_schema_id()),
        records=records,
    )


def conform_table(table: pa.Table, name: str, schema: AlertSchema | None = None) -> pa.Table:
    """``table`` with exactly the columns of record ``name``, in schema order and types.

    Missing nullable columns are added as nulls; extra columns are dropped.

    Raises
    ------
    ValueError
        Naming the column: a required column is missing or holds nulls, or a
        column cannot be cast to the schema's type.
    """
    schema = schema or load_alert_schema()
    target = schema.arrow_schema(name)
    n = table.num_rows
    columns = []
    for f in target:
        if f.name not in table.column_names:
            if not f.nullable:
                raise ValueError(f"{name}: required column {f.name!r} is missing")
            columns.append(pa.nulls(n, f.type))
            continue
        col = table[f.name]
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(
                    f"{name}: column {f.name!r} of type {col.type} cannot become {f.type}: {exc}"
                ) from exc
        if not f.nullable and col.null_count:
            bad = np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[:5]
            raise ValueError(f"{name}: required column {f.name!r} is null in rows {bad.tolist()}")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=target)


def table_from_columns(
    columns: dict[str, np.ndarray], n: int, record: str, schema: AlertSchema
) -> pa.Table:
    """A table of record ``record`` from numpy columns; NaN becomes null where nullable.

    Raises
    ------
    ValueError
        A required field is missing (a bug in the caller: the message names it).
    """
    arrays = []
    target = schema.arrow_schema(record)
    for f in target:
        value = columns.get(f.name)
        if value is None:
            if not f.nullable:
                raise ValueError(f"{record}: no value for required field {f.name!r}")
            arrays.append(pa.nulls(n, f.type))
            continue
        arr = np.asarray(value)
        if arr.ndim == 0:
            arr = np.full(n, arr)
        if arr.shape != (n,):
            raise ValueError(f"{record}.{f.name}: {arr.shape} values for {n} rows")
        # from_pandas=True turns NaN into null (nullable fields only: required ones keep NaN).
        arrays.append(pa.array(arr, type=f.type, from_pandas=f.nullable))
    return pa.Table.from_arrays(arrays, schema=target)
