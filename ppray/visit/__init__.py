"""The hot path of one visit, without Ray, in call order.

1. :mod:`.coordinator` — :class:`CoordinatorState` decides: dedup a
   ``next_visit``, broadcast ``prepare``, route each raw to its detector,
   queue visits beyond the in-flight bound, decide detector retries.
2. :mod:`.slots` — one detector's visits as they come: a raw may land before
   or after ``prepare``; a result is computed once per visit, whoever asks,
   with a deadline.
3. :mod:`.processor` — :class:`DetectorProcessor`: ``prepare`` from
   ``next_visit`` alone, ``process`` on the raws.
4. :mod:`.steps` — the science of ``process``: characterize, calibrate,
   difference imaging.
5. :mod:`.alert_production` — association, forced photometry, alerts and
   APDB rows of one detector.
6. :mod:`.aggregate` — the visit summary from the detectors' results.

The Ray actors in ``ppray.actors`` only wrap these.
"""

import lazy_loader

# The public API (``__init__.pyi``) is imported on first use: an actor that needs one
# module of the package does not pay for the rest (scipy, astropy) when it starts.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
