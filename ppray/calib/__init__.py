"""Master calibrations from calibration exposures: combine, find defects, normalise flats.

Pure, stateless science (no Ray): :mod:`.combine` prepares and combines
inputs in bounded memory, :mod:`.defects` finds defects, :mod:`.flatnorm`
normalises flats over the focal plane and :mod:`.quality` measures the products.
"""

__all__: list[str] = []
