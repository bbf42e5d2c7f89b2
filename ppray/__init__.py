"""ppray: Prompt Processing on Ray.

The library half: message and config models, instruments, science steps,
storage and messaging adapters, the simulator. The Ray layer lives in
``ppray.actors`` (the ``actors/`` directory) and is never imported from here.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
