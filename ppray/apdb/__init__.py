"""The Alert Production Database: what is known about every DiaObject.

- :mod:`.rubin` — :class:`RubinApdb`, the store of record: Rubin's APDB through
  ``lsst.dax.apdb`` (SQLite, PostgreSQL, Cassandra).
- :mod:`.store` — :class:`Apdb`, the tables as HEALPix-partitioned Parquet (the
  ``parquet`` backend).
- :mod:`.backend` — :func:`open_store`: the one a deployment's config names.
- :mod:`.ids` — deterministic ids, so that a re-run writes the same rows.
- :mod:`.shard` — :class:`ApdbShard`, one sky region in memory: preload,
  association, forced-source history.
- :mod:`.service` — :class:`AssociationService`, the shards as one service
  (routing, merging; :class:`LocalAssociation` is its in-process twin).
- :mod:`.diaobject` — DiaObject summaries; :mod:`.rowstore` — the shards'
  row storage.

Its tables have the fields of the alert schema's records (:mod:`ppray.schema`).
"""

import lazy_loader

# The public API (``__init__.pyi``) is imported on first use: an actor that needs one
# module of the package does not pay for the rest (scipy, astropy) when it starts.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
