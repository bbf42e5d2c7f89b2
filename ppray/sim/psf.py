"""The true PSF of a simulated detector or template patch: elliptical, with wings, varying.

A :class:`PsfField` is the PSF at every position of one pixel grid. Its
profile is a round mixture of Gaussians (:func:`ppray.sim.mixture.profile_mixture`;
``"moffat"`` approximates a Moffat of beta 3.5 with its wings, ``"gaussian"``
is one Gaussian) stretched into an ellipse: with ``q = 1 - e`` its major and
minor axes are ``1/sqrt(q)`` and ``sqrt(q)`` times the round profile's, so
the FWHM of the round profile is the geometric mean of the major and minor
FWHM (:meth:`PsfField.fwhm_px`, "as if round").

Three quantities vary smoothly over the grid as quadratic polynomials of the
normalised coordinates ``u = (x - center_x) / half_extent_x`` and ``v``
likewise (``u, v`` in ``[-1, 1]`` over a detector): the FWHM (pixels) and the
two components of the ellipticity vector ``g = e (cos 2 theta, sin 2 theta)``,
so that ``e = |g|`` and the angle ``theta`` of the major axis, counted from
the +x axis towards +y (degrees, in ``(-90, 90]``), vary without jumps.
Coefficients are in the order ``1, u, v, u^2, u v, v^2``.

Pixel coordinates are 0-based numpy ``x`` (column), ``y`` (row); pixel
``(i, j)`` spans ``[i - 0.5, i + 0.5]``. Stamps from :meth:`PsfField.image` are
integrated over pixels (:mod:`ppray.sim.mixture`) and normalised so that the
PSF over the whole plane holds 1: a stamp sums to less, by the light beyond it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from ppray.sim.mixture import mixture_stamp, profile_mixture, shape_matrix

__all__ = ["ELLIPTICITY_LIMIT", "PsfField"]

ELLIPTICITY_LIMIT = 0.9
"""Largest ellipticity a field returns, however far its polynomials are extrapolated."""
# Likewise the FWHM never falls below this fraction of its value at the centre.
_MIN_FWHM_FRACTION = 0.25
_N_COEFFS = 6
# Quadrature points over the position angle for the enclosed energy (periodic
# trapezoid: exponentially convergent; 256 is exact to double precision here).
_N_ANGLES = 256


@overload
def _out(value: np.ndarray, scalar: bool) -> np.ndarray: ...
@overload
def _out(value: float, scalar: bool) -> float: ...
def _out(value: Any, scalar: bool) -> Any:
    return float(np.asarray(value).reshape(-1)[0]) if scalar else np.asarray(value)


def _coeffs(values: Any, name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) > _N_COEFFS or not out:
        raise ValueError(f"{name} must have 1 to {_N_COEFFS} coefficients, not {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite, not {out}")
    return out + (0.0,) * (_N_COEFFS - len(out))


@dataclass(frozen=True, eq=False)
class PsfField:
    """The true PSF over one pixel grid (module docstring).

    Attributes
    ----------
    fwhm_coeffs_px
        Polynomial of the FWHM (pixels, "as if round").
    g1_coeffs, g2_coeffs
        Polynomials of the ellipticity vector's components.
    center_px
        ``(x, y)`` where ``u = v = 0``.
    half_extent_px
        ``(x, y)`` distances from the centre to ``|u| = 1``, ``|v| = 1``.
    profile
        The round profile: ``"moffat"`` or ``"gaussian"``.
    """

    fwhm_coeffs_px: tuple[float, ...]
    g1_coeffs: tuple[float, ...] = (0.0,)
    g2_coeffs: tuple[float, ...] = (0.0,)
    center_px: tuple[float, float] = (0.0, 0.0)
    half_extent_px: tuple[float, float] = (1.0, 1.0)
    profile: str = "moffat"
    _fwhm: tuple[float, ...] = field(init=False, repr=False)
    _g1: tuple[float, ...] = field(init=False, repr=False)
    _g2: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.profile not in ("moffat", "gaussian"):
            raise ValueError(f"profile must be 'moffat' or 'gaussian', not {self.profile!r}")
        object.__setattr__(self, "_fwhm", _coeffs(self.fwhm_coeffs_px, "fwhm_coeffs_px"))
        object.__setattr__(self, "_g1", _coeffs(self.g1_coeffs, "g1_coeffs"))
        object.__setattr__(self, "_g2", _coeffs(self.g2_coeffs, "g2_coeffs"))
        if not self._fwhm[0] > 0:
            raise ValueError(f"the FWHM at the centre must be > 0, not {self._fwhm[0]!r}")
        if not all(h > 0 for h in self.half_extent_px):
            raise ValueError(f"half_extent_px must be > 0, not {self.half_extent_px!r}")

    # --- constructors -------------------------------------------------------------

    @staticmethod
    def _frame(shape: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
        ny, nx = shape
        return ((nx - 1) / 2.0, (ny - 1) / 2.0), (nx / 2.0, ny / 2.0)

    @classmethod
    def constant(
        cls,
        fwhm_px: float,
        shape: tuple[int, int],
        *,
        ellipticity: float = 0.0,
        angle_deg: float = 0.0,
        profile: str = "moffat",
    ) -> PsfField:
        """The same PSF everywhere on a grid of numpy ``shape``; round by default."""
        if not 0.0 <= ellipticity < ELLIPTICITY_LIMIT:
            raise ValueError(f"ellipticity must be in [0, {ELLIPTICITY_LIMIT}), not {ellipticity}")
        center, half = cls._frame(shape)
        two = math.radians(2.0 * angle_deg)
        return cls(
            fwhm_coeffs_px=(float(fwhm_px),),
            g1_coeffs=(ellipticity * math.cos(two),),
            g2_coeffs=(ellipticity * math.sin(two),),
            center_px=center,
            half_extent_px=half,
            profile=profile,
        )

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        shape: tuple[int, int],
        fwhm_px: float,
        *,
        fwhm_variation: float = 0.08,
        ellipticity_max: float = 0.4,
        profile: str = "moffat",
    ) -> PsfField:
        """A smoothly varying PSF over a grid of numpy ``shape``, drawn from ``rng``.

        Parameters
        ----------
        rng
            Random generator (seed it per visit and detector).
        shape
            Numpy ``(ny, nx)`` of the grid.
        fwhm_px
            FWHM at the centre of the grid (pixels).
        fwhm_variation
            Over the grid the FWHM departs from ``fwhm_px`` by at most a fraction
            drawn between half this and this.
        ellipticity_max
            The largest ellipticity on the grid, reached at one place (usually
            an edge or corner), is drawn between 0.6 and 1 times this.
        profile
            ``"moffat"`` (default) or ``"gaussian"``.
        """
        if not 0.0 <= ellipticity_max < ELLIPTICITY_LIMIT:
            raise ValueError(f"ellipticity_max must be in [0, {ELLIPTICITY_LIMIT})")
        if not 0.0 <= fwhm_variation < 0.5:
            raise ValueError("fwhm_variation must be in [0, 0.5)")
        grid = np.linspace(-1.0, 1.0, 9)
        terms = _terms(*np.meshgrid(grid, grid))
        shape_terms = rng.uniform(-1.0, 1.0, _N_COEFFS - 1)
        rel = np.tensordot(shape_terms, terms[1:], axes=1)
        span = float(np.abs(rel).max()) or 1.0
        scale = fwhm_variation * rng.uniform(0.5, 1.0) / span
        fwhm = (fwhm_px, *(fwhm_px * scale * shape_terms))
        g = rng.normal(0.0, 1.0, (2, _N_COEFFS))
        g_abs = np.hypot(np.tensordot(g[0], terms, axes=1), np.tensordot(g[1], terms, axes=1))
        g *= ellipticity_max * rng.uniform(0.6, 1.0) / (float(g_abs.max()) or 1.0)
        center, half = cls._frame(shape)
        return cls(
            fwhm_coeffs_px=tuple(float(v) for v in fwhm),
            g1_coeffs=tuple(float(v) for v in g[0]),
            g2_coeffs=tuple(float(v) for v in g[1]),
            center_px=center,
            half_extent_px=half,
            profile=profile,
        )

    def shifted(self, dx_px: float, dy_px: float) -> PsfField:
        """The same PSF on a grid whose pixel ``(x, y)`` is this one's ``(x + dx, y + dy)``."""
        cx, cy = self.center_px
        return PsfField(
            fwhm_coeffs_px=self._fwhm,
            g1_coeffs=self._g1,
            g2_coeffs=self._g2,
            center_px=(cx - dx_px, cy - dy_px),
            half_extent_px=self.half_extent_px,
            profile=self.profile,
        )

    # --- truth at a position -----------------------------------------------------

    def _uv(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray, bool]:
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
        scalar = xa.ndim == 0 and ya.ndim == 0
        xa, ya = np.broadcast_arrays(np.atleast_1d(xa), np.atleast_1d(ya))
        u = (xa - self.center_px[0]) / self.half_extent_px[0]
        v = (ya - self.center_px[1]) / self.half_extent_px[1]
        return u, v, scalar

    def _fwhm_at(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        fwhm = np.tensordot(np.asarray(self._fwhm), _terms(u, v), axes=1)
        return np.maximum(fwhm, _MIN_FWHM_FRACTION * self._fwhm[0])

    def _g_at(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        terms = _terms(u, v)
        g1 = np.tensordot(np.asarray(self._g1), terms, axes=1)
        g2 = np.tensordot(np.asarray(self._g2), terms, axes=1)
        return g1, g2

    @overload
    def fwhm_px(self, x: float, y: float) -> float: ...
    @overload
    def fwhm_px(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...
    def fwhm_px(self, x: Any, y: Any) -> Any:
        """True FWHM (pixels) at ``(x, y)``, as if round: ``sqrt(FWHM_major * FWHM_minor)``."""
        u, v, scalar = self._uv(x, y)
        return _out(self._fwhm_at(u, v), scalar)

    @overload
    def ellipticity(self, x: float, y: float) -> float: ...
    @overload
    def ellipticity(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...
    def ellipticity(self, x: Any, y: Any) -> Any:
        """``1 - b/a`` of the PSF at ``(x, y)`` (at most :data:`ELLIPTICITY_LIMIT`)."""
        u, v, scalar = self._uv(x, y)
        g1, g2 = self._g_at(u, v)
        return _out(np.minimum(np.hypot(g1, g2), ELLIPTICITY_LIMIT), scalar)

    @overload
    def angle_deg(self, x: float, y: float) -> float: ...
    @overload
    def angle_deg(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...
    def angle_deg(self, x: Any, y: Any) -> Any:
        """Angle of the major axis from +x towards +y (degrees, ``(-90, 90]``; 0 if round)."""
        u, v, scalar = self._uv(x, y)
        g1, g2 = self._g_at(u, v)
        angle = 0.5 * np.degrees(np.arctan2(g2, g1))
        return _out(np.where(angle <= -90.0, angle + 180.0, angle), scalar)

    def components(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """The Gaussian components of the PSF at positions ``(x, y)``.

        Returns
        -------
        weights
            ``(K,)`` fractions of the flux, summing to 1.
        cov
            ``(n, K, 3)`` covariances ``(cxx, cxy, cyy)`` in pixels² (the
            continuous PSF, before the pixel response), for ``n`` positions.
        """
        u, v, _ = self._uv(x, y)
        w, s = profile_mixture(self.profile)
        fwhm = self._fwhm_at(u, v).reshape(-1)
        g1, g2 = (g.reshape(-1) for g in self._g_at(u, v))
        e = np.minimum(np.hypot(g1, g2), ELLIPTICITY_LIMIT)
        sxx, sxy, syy = shape_matrix(e, 0.5 * np.arctan2(g2, g1))
        var = (fwhm[:, None] * s[None, :]) ** 2
        cov = np.stack([var * sxx[:, None], var * sxy[:, None], var * syy[:, None]], axis=-1)
        return np.array(w), cov

    def image(self, x: float, y: float, size: int, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        """The pixel-integrated PSF at ``(x, y)`` on a ``size x size`` stamp.

        Parameters
        ----------
        x, y
            Where on the grid to take the PSF (pixels).
        size
            Side of the stamp (pixels, >= 1).
        dx, dy
            Offset of the PSF's centre from the centre of stamp pixel
            ``(size // 2, size // 2)`` (pixels).

        Returns
        -------
        numpy.ndarray
            ``(size, size)`` float64, ``[y, x]``; the PSF over the whole plane
            holds 1, so the stamp sums to ``1`` minus the light outside it.
        """
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        w, cov = self.components(float(x), float(y))
        c = size // 2
        return mixture_stamp(w, cov[0], size, c + float(dx), c + float(dy))

    def encircled_energy(
        self, x: float, y: float, radius_px: Any, *, pixelized: bool = False
    ) -> Any:
        """Fraction of the PSF's light within ``radius_px`` of its centre at ``(x, y)``.

        Parameters
        ----------
        x, y
            Where on the grid (pixels).
        radius_px
            Aperture radius or radii (pixels).
        pixelized
            ``True``: of the PSF seen through square pixels (its covariance
            plus ``1/12`` px² per axis), which is what an aperture summed
            over a pixelised image of a point source approaches; ``False``
            (default): of the PSF itself.

        Returns
        -------
        float or numpy.ndarray
            Like ``radius_px``.
        """
        w, cov = self.components(float(x), float(y))
        cov = cov[0].copy()
        if pixelized:
            cov[:, 0] += 1.0 / 12.0
            cov[:, 2] += 1.0 / 12.0
        r = np.asarray(radius_px, dtype=np.float64)
        phi = np.linspace(0.0, 2.0 * math.pi, _N_ANGLES, endpoint=False)
        ux, uy = np.cos(phi), np.sin(phi)
        total = np.zeros(r.shape)
        for k in range(w.size):
            a, b, c = cov[k]
            det = a * c - b * b
            # Along direction phi the profile falls as exp(-rho^2 q / 2); integrated over rho.
            q = (c * ux * ux - 2.0 * b * ux * uy + a * uy * uy) / det
            inner = -np.expm1(-0.5 * r[..., None] ** 2 * q) / q
            total += w[k] * inner.mean(axis=-1) / math.sqrt(det)
        return _out(total, r.ndim == 0)

    # --- storage ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe description (:meth:`from_dict` reads it back)."""
        return {
            "fwhm_coeffs_px": list(self._fwhm),
            "g1_coeffs": list(self._g1),
            "g2_coeffs": list(self._g2),
            "center_px": list(self.center_px),
            "half_extent_px": list(self.half_extent_px),
            "profile": self.profile,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PsfField:
        """The field :meth:`to_dict` described."""
        cx, cy = data["center_px"]
        hx, hy = data["half_extent_px"]
        return cls(
            fwhm_coeffs_px=tuple(data["fwhm_coeffs_px"]),
            g1_coeffs=tuple(data["g1_coeffs"]),
            g2_coeffs=tuple(data["g2_coeffs"]),
            center_px=(float(cx), float(cy)),
            half_extent_px=(float(hx), float(hy)),
            profile=str(data["profile"]),
        )


def _terms(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The polynomial terms ``1, u, v, u^2, u v, v^2``, stacked on a new first axis."""
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v])
