"""DiaObject summaries from grouped DiaSource and DiaForcedSource rows (numpy only).

:func:`summarize` is the arithmetic behind :class:`ppray.apdb.shard.ApdbShard`:
given rows already labelled with their object's group ``g`` (0..m-1), it
returns the alert-schema ``diaObject`` columns that depend on them. Rows are
sorted by (group, time, id) first and every sum is a ``bincount`` in that
order, so the result does not depend on the order rows arrived in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ppray.skyregion import xyz_to_radec

__all__ = ["FORCED_FIELDS", "Summary", "summarize"]

FORCED_FIELDS = ("fpFluxMean", "fpFluxMeanErr", "scienceFluxMean", "scienceFluxMeanErr")
"""Per-band ``diaObject`` fields (``<band>_<field>``) that come from forced photometry."""


@dataclass(frozen=True)
class Summary:
    """Output of :func:`summarize` for ``m`` objects.

    ``columns`` are ``diaObject`` fields (NaN where undefined); ``n_sources`` and
    ``n_forced`` count each object's rows; ``xyz`` is the mean position
    (NaN without sources), ``xyz_before_last`` the mean without the sources of
    the object's latest visit ``last_visit`` (-1 without sources).
    """

    columns: dict[str, np.ndarray]
    n_sources: np.ndarray
    n_forced: np.ndarray
    xyz: np.ndarray
    xyz_before_last: np.ndarray
    last_visit: np.ndarray


def _sum(g: np.ndarray, values: np.ndarray, m: int) -> np.ndarray:
    return np.bincount(g, weights=values, minlength=m)[:m]


def _extreme(op: np.ufunc, g: np.ndarray, values: np.ndarray, m: int) -> np.ndarray:
    fill = np.inf if op is np.minimum else -np.inf
    out = np.full(m, fill)
    op.at(out, g, values)
    return np.where(np.isinf(out), np.nan, out)


def _mean_xyz(g: np.ndarray, xyz: np.ndarray, m: int) -> np.ndarray:
    total = np.stack([_sum(g, xyz[:, k], m) for k in range(3)], axis=1)
    norm = np.linalg.norm(total, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, total / norm, np.nan)


def _weighted(
    g: np.ndarray, flux: np.ndarray, err: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean and its error per group (NaN without valid rows)."""
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    w = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
    sw = _sum(g, w, m)
    swf = _sum(g, w * np.where(ok, flux, 0.0), m)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sw > 0, swf / sw, np.nan), np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)


def _band_stats(
    g: np.ndarray, mjd: np.ndarray, flux: np.ndarray, err: np.ndarray, m: int
) -> dict[str, np.ndarray]:
    """``psfFlux*`` statistics of one band; rows sorted by (group, time)."""
    ok = np.isfinite(flux)
    gg, ff, tt, ee = g[ok], flux[ok], mjd[ok], err[ok]
    n = np.bincount(gg, minlength=m)[:m]
    mean, mean_err = _weighted(gg, ff, ee, m)
    with np.errstate(invalid="ignore", divide="ignore"):
        plain = _sum(gg, ff, m) / n
        ss = _sum(gg, (ff - plain[gg]) ** 2, m)
        sigma = np.where(n > 1, np.sqrt(ss / np.maximum(n - 1, 1)), np.nan)
        fin_err = np.isfinite(ee)
        n_err = np.bincount(gg[fin_err], minlength=m)[:m]
        err_mean = np.where(n_err > 0, _sum(gg[fin_err], ee[fin_err], m) / n_err, np.nan)
    # Consecutive observations of one object (rows are time-sorted within a group).
    same = (gg[1:] == gg[:-1]) & (tt[1:] > tt[:-1])
    slope = (ff[1:] - ff[:-1])[same] / (tt[1:] - tt[:-1])[same]
    return {
        "psfFluxMean": mean,
        "psfFluxMeanErr": mean_err,
        "psfFluxSigma": sigma,
        "psfFluxNdata": n.astype(np.int32),
        "psfFluxMin": _extreme(np.minimum, gg, ff, m),
        "psfFluxMax": _extreme(np.maximum, gg, ff, m),
        "psfFluxMaxSlope": _extreme(np.maximum, gg[1:][same], slope, m),
        "psfFluxErrMean": err_mean,
    }


def summarize(
    m: int,
    src: dict[str, np.ndarray],
    forced: dict[str, np.ndarray],
    bands: tuple[str, ...],
    *,
    positions_only: bool = False,
) -> Summary:
    """DiaObject summary columns of ``m`` objects from their rows.

    Parameters
    ----------
    m
        Number of objects (groups).
    src
        DiaSource rows: ``g`` (group), ``id``, ``visit``, ``mjd``, ``band`` (index
        into ``bands``, -1 other), ``flux``, ``err`` (nJy), ``xyz`` (unit vectors),
        ``raErr``, ``decErr``, ``cov``.
    forced
        DiaForcedSource rows: ``g``, ``id``, ``mjd``, ``band``, ``flux``, ``err``
        (difference image), ``sflux``, ``serr`` (science image).
    bands
        Band names, e.g. ``("u", "g", "r", "i", "z", "y")``.
    positions_only
        Compute only the positions, ``last_visit`` and counts (``columns`` is empty).
    """
    order = np.lexsort((src["id"], src["mjd"], src["g"]))
    s = {k: v[order] for k, v in src.items()}
    g = s["g"]
    n_src = np.bincount(g, minlength=m)[:m]
    xyz = _mean_xyz(g, s["xyz"], m)
    last_visit = np.full(m, -1, dtype=np.int64)
    np.maximum.at(last_visit, g, s["visit"])
    earlier = s["visit"] != last_visit[g]
    xyz_before = _mean_xyz(g[earlier], s["xyz"][earlier], m)
    if positions_only:
        n_forced = np.bincount(forced["g"], minlength=m)[:m]
        return Summary({}, n_src, n_forced, xyz, xyz_before, last_visit)
    ra, dec = xyz_to_radec(xyz)
    cols: dict[str, np.ndarray] = {"ra": ra, "dec": dec}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, key, power in (("raErr", "raErr", 2), ("decErr", "decErr", 2)):
            v = s[key]
            ok = np.isfinite(v)
            cnt = np.bincount(g[ok], minlength=m)[:m]
            cols[name] = np.where(cnt > 0, np.sqrt(_sum(g[ok], v[ok] ** power, m)) / cnt, np.nan)
        ok = np.isfinite(s["cov"])
        cnt = np.bincount(g[ok], minlength=m)[:m]
        cols["ra_dec_Cov"] = np.where(cnt > 0, _sum(g[ok], s["cov"][ok], m) / cnt**2, np.nan)
    first = _extreme(np.minimum, g, s["mjd"], m)
    last = _extreme(np.maximum, g, s["mjd"], m)
    cols["firstDiaSourceMjdTai"] = first
    cols["lastDiaSourceMjdTai"] = last
    cols["nDiaSources"] = n_src.astype(np.int32)
    for b, band in enumerate(bands):
        sel = s["band"] == b
        stats = _band_stats(g[sel], s["mjd"][sel], s["flux"][sel], s["err"][sel], m)
        cols.update({f"{band}_{k}": v for k, v in stats.items()})

    f_order = np.lexsort((forced["id"], forced["mjd"], forced["g"]))
    f = {k: v[f_order] for k, v in forced.items()}
    n_forced = np.bincount(f["g"], minlength=m)[:m]
    # A version starts at the visit that last changed the object, by a source or by
    # forced photometry: what Rubin's APDB stores as the version's validityStart.
    cols["validityStartMjdTai"] = np.fmax(last, _extreme(np.maximum, f["g"], f["mjd"], m))
    for b, band in enumerate(bands):
        sel = f["band"] == b
        fg = f["g"][sel]
        mean, err = _weighted(fg, f["flux"][sel], f["err"][sel], m)
        cols[f"{band}_fpFluxMean"], cols[f"{band}_fpFluxMeanErr"] = mean, err
        mean, err = _weighted(fg, f["sflux"][sel], f["serr"][sel], m)
        cols[f"{band}_scienceFluxMean"], cols[f"{band}_scienceFluxMeanErr"] = mean, err
    return Summary(cols, n_src, n_forced, xyz, xyz_before, last_visit)
