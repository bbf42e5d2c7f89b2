"""Time conversions, all through astropy: unix seconds, MJD (UTC) and MJD (TAI).

``next_visit`` and raw arrivals carry unix seconds; FITS headers ``MJD-OBS``
(UTC); the APDB and alerts MJD in TAI. Leap seconds come from astropy's
table (TAI - UTC is 37 s since 2017), never from a constant in ppray.
"""

from __future__ import annotations

import time

from astropy.time import Time, TimeDelta

__all__ = ["exposure_midpoint_mjd_tai", "now_mjd_tai", "unix_to_mjd_tai", "unix_to_mjd_utc"]


def unix_to_mjd_utc(unix_s: float) -> float:
    """MJD (UTC) of a unix time, as written to FITS ``MJD-OBS``."""
    return float(Time(unix_s, format="unix", scale="utc").mjd)


def unix_to_mjd_tai(unix_s: float) -> float:
    """MJD (TAI) of a unix time."""
    return float(Time(unix_s, format="unix", scale="utc").tai.mjd)


def now_mjd_tai() -> float:
    """Now, as MJD (TAI)."""
    return unix_to_mjd_tai(time.time())


def exposure_midpoint_mjd_tai(
    start_unix_s: float, exptime_s: float = 0.0, mjd_obs: object = None
) -> float:
    """The midpoint of an exposure as MJD (TAI).

    Parameters
    ----------
    start_unix_s
        The scheduled start (``next_visit.startTime``), used when the raw had no
        ``MJD-OBS``.
    exptime_s
        Exposure time; the midpoint is half of it after the start.
    mjd_obs
        The raw's ``MJD-OBS`` header (UTC start), if it had a number there.
    """
    if isinstance(mjd_obs, int | float) and not isinstance(mjd_obs, bool):
        start = Time(float(mjd_obs), format="mjd", scale="utc")
    else:
        start = Time(start_unix_s, format="unix", scale="utc")
    return float((start + TimeDelta(0.5 * exptime_s, format="sec")).tai.mjd)
