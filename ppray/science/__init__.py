"""Science steps: stateless functions on images and catalogs.

The public API of every module is importable from here (``from ppray.science
import measure_psf``); the modules stay importable on their own.
"""

import lazy_loader

# The public API (``__init__.pyi``) is imported on first use: an actor that needs one
# module of the package does not pay for the rest (scipy, astropy) when it starts.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
