"""What the local servers for tests share: stopping by PID, serving until Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

__all__ = ["serve_until_interrupted", "stop_process"]


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace_s: float = 5.0
) -> None:
    """Send ``sig`` to ``proc`` (this PID only), wait ``grace_s``, then kill it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def serve_until_interrupted(
    process: Callable[[], subprocess.Popen[bytes] | None], stop: Callable[[], None]
) -> int:
    """Wait while ``process()`` runs; on Ctrl-C or its exit, ``stop()``. Returns 0."""
    try:
        while (proc := process()) is not None and proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
