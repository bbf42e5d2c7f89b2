"""The Alert Production Database: what is known about every DiaObject.

- :mod:`.store` — :class:`Apdb`, the tables as HEALPix-partitioned Parquet.
- :mod:`.ids` — deterministic ids, so that a re-run writes the same rows.
- :mod:`.shard` — :class:`ApdbShard`, one sky region in memory: preload,
  association, forced-source history.
- :mod:`.service` — :class:`AssociationService`, the shards as one service
  (routing, merging; :class:`LocalAssociation` is its in-process twin).
- :mod:`.diaobject` — DiaObject summaries; :mod:`.rowstore` — the shards'
  row storage.

Its tables have the fields of the alert schema's records (:mod:`ppray.schema`).
"""

from ppray.apdb.diaobject import FORCED_FIELDS, Summary, summarize
from ppray.apdb.ids import pack_id, unpack_id
from ppray.apdb.rowstore import RowStore, unique_sorted
from ppray.apdb.service import (
    AssociationService,
    LocalAssociation,
    ShardedAssociation,
    ShardRouter,
    load_shard,
    merge_results,
    merge_tables,
)
from ppray.apdb.shard import ApdbShard, AssociationResult
from ppray.apdb.store import TABLES, Apdb, ApdbTables

__all__ = [
    "FORCED_FIELDS",
    "TABLES",
    "Apdb",
    "ApdbShard",
    "ApdbTables",
    "AssociationResult",
    "AssociationService",
    "LocalAssociation",
    "RowStore",
    "ShardRouter",
    "ShardedAssociation",
    "Summary",
    "load_shard",
    "merge_results",
    "merge_tables",
    "pack_id",
    "summarize",
    "unique_sorted",
    "unpack_id",
]
