"""Master calibrations from calibration exposures: combine, find defects, normalise flats.

Pure, stateless science (no Ray): :mod:`.prepare` runs ISR on the inputs,
:mod:`.combine` combines them in bounded memory, :mod:`.defects` finds defects, :mod:`.flatnorm`
normalises flats over the focal plane and :mod:`.quality` measures the products.
:mod:`.registry` certifies products with their validity (time range, band) into
the calibration store; :mod:`.resolve` picks, per visit, the products valid at
its time and band (falling back to the legacy ``calib.fits``).
:mod:`.sequence` is one detector's calibration sequence (inputs fed as they
arrive, products certified) and :mod:`.results` what it sends to the gather.
"""

import lazy_loader

# The public API (``__init__.pyi``) is imported on first use: an actor that needs one
# module of the package does not pay for the rest (scipy, astropy) when it starts.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
