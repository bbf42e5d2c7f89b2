"""The public API of :mod:`ppray.apdb`, for type checkers and for the lazy loader
(:func:`lazy_loader.attach_stub` reads what to load, and from where, here)."""

from .backend import ApdbStore, create_store, open_store
from .diaobject import FORCED_FIELDS, Summary, summarize
from .ids import pack_id, unpack_id
from .rowstore import RowStore, unique_sorted
from .rubin import RubinApdb
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
    "ApdbStore",
    "ApdbTables",
    "AssociationResult",
    "AssociationService",
    "LocalAssociation",
    "RowStore",
    "RubinApdb",
    "ShardRouter",
    "ShardedAssociation",
    "Summary",
    "create_store",
    "load_shard",
    "merge_results",
    "merge_tables",
    "open_store",
    "pack_id",
    "summarize",
    "unique_sorted",
    "unpack_id",
]
