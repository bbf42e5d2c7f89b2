"""Where the coordinator keeps its snapshot: Ray's cluster key-value store (in the GCS).

The GCS outlives any actor, so a restarted coordinator finds its visits there,
on whatever node Ray restarts it; with GCS fault tolerance (KubeRay with Redis)
it outlives the head too. Ray offers this store only as ``internal_kv``: it is
used here and nowhere else, so a change in Ray touches this module alone.
"""

from __future__ import annotations

import json
from typing import Any

from ray.experimental import internal_kv

__all__ = ["clear_snapshot", "read_snapshot", "write_snapshot"]

_KEY = b"ppray/coordinator-snapshot"


def write_snapshot(namespace: str, snapshot: dict[str, Any]) -> None:
    """Replace the coordinator snapshot of deployment ``namespace``."""
    data = json.dumps(snapshot, separators=(",", ":")).encode()
    internal_kv._internal_kv_put(_KEY, data, overwrite=True, namespace=namespace)


def read_snapshot(namespace: str) -> dict[str, Any] | None:
    """The last snapshot written in ``namespace``, or None."""
    data = internal_kv._internal_kv_get(_KEY, namespace=namespace)
    if not data:
        return None
    snapshot: dict[str, Any] = json.loads(data)
    return snapshot


def clear_snapshot(namespace: str) -> None:
    """Forget the snapshot: a new deployment starts with no visits in flight."""
    internal_kv._internal_kv_del(_KEY, namespace=namespace)
