"""Difference imaging of calibrated FITS images from any camera: ``ppray diff``.

1. :mod:`.headers` — gain, saturation, read noise, seeing and exposure time
   from the header or the options; :mod:`.reader` — one HDU of a FITS file as
   an exposure in electrons, with variance and mask; clear errors naming the
   file, the HDU and what to pass.
2. :mod:`.catalog` — a reference catalogue (Parquet, CSV, FITS) for calibration.
3. :mod:`.pipeline` — :func:`difference_fits`: the Alert Production steps of
   :mod:`ppray.visit.steps` on a science and a template image.
4. :mod:`.outputs` — the DIA sources, the difference and a summary on disk.
5. :mod:`.plot` — the diagnostic PNG.

The command line (``ppray diff``) is in ``ppray.actors.cli``; nothing here starts Ray.
"""

import lazy_loader

# The public API (``__init__.pyi``) is imported on first use: ``ppray --help`` does not
# import matplotlib and the science stack.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
