"""The public API of :mod:`ppray.apdb`, for type checkers and for the lazy loader
(:func:`lazy_loader.attach_stub` reads what to load, and from where, here)."""

from .diaobject import FORCED_FIELDS, Summary, summarize
from .ids import pack_id, unpack_id
from .rowstore import RowStore, unique_sorted
from .service import (
    AssociationService,
    LocalAssociation,
    ShardedAssociation,
    ShardRouter,
    load_shard,
    merge_results,
    merge_tables,
)
from .shard import ApdbShard, AssociationResult
from .store import TABLES, Apdb, ApdbTables

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
