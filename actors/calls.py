"""The one place that knows Ray's exceptions for a call to another actor.

Every actor call that may meet a dead or restarting actor goes through here,
and comes back as a value or one of two exceptions that say what a caller
can do about it:

- :class:`ActorDied`: the actor's process is gone (killed, node lost). Ray
  restarts it (``max_restarts``) and its ``__init__`` runs again; redoing the
  work on the new incarnation may succeed.
- :class:`ActorCallFailed`: anything else Ray reports for the call (the
  method raised, the object was lost). Redoing it the same way will not help.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

__all__ = ["ActorCallFailed", "ActorDied", "get", "resolve", "wait_restarted"]

log = logging.getLogger(__name__)


class ActorCallFailed(Exception):
    """An actor call failed for a reason other than the actor's death (``__cause__``)."""


class ActorDied(ActorCallFailed):
    """The actor died under the call (``__cause__``); its restarted incarnation may redo it."""


async def resolve(ref: Any) -> Any:
    """The value of an actor call's ``ObjectRef``.

    Raises
    ------
    ActorDied
        If the actor died before answering.
    ActorCallFailed
        If Ray reports any other error for the call.
    """
    try:
        return await ref
    except ray.exceptions.RayActorError as exc:
        raise ActorDied(f"{type(exc).__name__}: {exc}") from exc
    except ray.exceptions.RayError as exc:
        raise ActorCallFailed(f"{type(exc).__name__}: {exc}") from exc


def get(ref: Any) -> Any:
    """:func:`resolve` for a caller outside an event loop (the driver): ``ray.get``."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        raise ActorDied(f"{type(exc).__name__}: {exc}") from exc
    except ray.exceptions.RayError as exc:
        raise ActorCallFailed(f"{type(exc).__name__}: {exc}") from exc


async def wait_restarted(
    actor: Any, timeout_s: float, poll_s: float = 0.1, call_timeout_s: float = 5.0
) -> bool:
    """Whether ``actor`` answers ``ready`` within ``timeout_s``.

    Every actor-death error is waited out until the deadline, not only Ray's
    ``ActorUnavailableError`` while it restarts the actor: on a loaded node the
    caller may learn of the death (from another actor) before its own handle does,
    and a ``ready`` sent to the old process then fails with ``ActorDiedError``
    although Ray is restarting it. A ``ready`` sent while the actor restarts can
    also go unanswered (seen on a loaded node: one call waited out the whole
    minute while the new process was up within seconds), so each call gets
    ``call_timeout_s`` and then a new one is sent. Any other error, or the
    deadline, is a no, logged with its cause.
    """
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while (left := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(actor.ready.remote(), max(min(left, call_timeout_s), poll_s))
            return True
        except TimeoutError as exc:
            last = exc
        except ray.exceptions.RayActorError as exc:
            last = exc
            await asyncio.sleep(poll_s)
        except ray.exceptions.RayError as exc:
            last = exc
            break
    log.error(
        "actor did not answer ready within %.0f s: %s",
        timeout_s,
        f"{type(last).__name__}: {last}" if last is not None else "no answer",
    )
    return False
