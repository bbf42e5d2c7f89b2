"""Combine calibration exposures into master bias, dark and flat, one exposure at a time.

Algorithm (:class:`StreamingCombiner`)
--------------------------------------
A median of all inputs would reject outliers best, but needs every input in
memory at once (20 LSSTCam flats are 1.3 GB per detector). Instead:

1. Hold the first ``n_reference`` inputs (5 by default). Their per-pixel
   median is the *reference*: with at most two of five inputs hit by a cosmic
   ray at a pixel it is still clean, and its noise is ``sqrt(pi / 2 / K)`` of
   an input's.
2. Clip each input against the reference: a pixel is rejected when
   ``|x - ref| > nsigma * sqrt(var_x + var_ref)``. ``var_x`` is the *expected*
   variance of that input at that pixel (the held inputs' median variance
   shape times the input's typical variance), not the input's own variance
   plane, which a cosmic ray inflates along with the value. Rejected pixels
   may be grown by ``grow`` pixels, since real cosmic rays have faint wings.
3. Accumulate the kept deviations ``d = x - ref`` into weighted running sums
   ``sum w``, ``sum w d``, ``sum w d^2``, ``sum w^2 var`` and a count: the held
   inputs once the reference exists (then they are dropped), every later input
   as it arrives. Deviations from the reference are small, so ``float32`` sums
   lose nothing to cancellation.
4. The result is ``ref + sum(w d) / sum(w)``: a clipped weighted mean, as
   efficient as a mean on clean pixels (a median would cost 25% more
   variance), with the propagated variance ``sum(w^2 var) / sum(w)^2`` and the
   empirical one from the scatter.

Memory is ``n_reference`` images (and their variance planes) until the
reference is formed, then about seven planes whatever the number of inputs.
Weights are one number per input (the inverse of its typical variance), not
per-pixel inverse variances: ISR's variance comes from the noisy data, so
per-pixel weights would favour pixels that fluctuated low and bias a flat low.

Inputs are prepared (ISR, masters subtracted, scaled) by
:mod:`ppray.calib.prepare`; :func:`combine_calibration` does both, one input at
a time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from scipy.ndimage import binary_dilation

from ppray.calib.prepare import REJECT_BITS, CalibKind, InputPreparer, PreparedInput, input_preparer
from ppray.image import Calibrations, Exposure, RawExposure
from ppray.instrument import Detector, Instrument
from ppray.science.stats import MAD_TO_SIGMA

# REJECT_BITS, CalibKind, InputPreparer, PreparedInput and input_preparer live in
# .prepare; they stay importable from here.
__all__ = [
    "REJECT_BITS",
    "CalibKind",
    "CombinedImage",
    "InputPreparer",
    "MasterResult",
    "PreparedInput",
    "StreamingCombiner",
    "combine_calibration",
    "input_preparer",
    "master_calibrations",
]

# Variance of the median of K normal values, over the variance of one (large K).
_MEDIAN_VARIANCE = math.pi / 2.0
# Sample every 4th row and column for an input's typical variance or median level:
# 1/16 of a 4k x 4k CCD is a million pixels, plenty for a median.
_SAMPLE_STRIDE = 4
# Rows per block when the reference median is formed.
_REFERENCE_ROWS = 64


@dataclass(frozen=True)
class CombinedImage:
    """The result of a combination.

    Attributes
    ----------
    image
        Combined image, ``float32``; NaN where no input was kept.
    variance
        Variance of ``image`` per pixel: propagated from the inputs' noise
        model, or (when no input gave one) from the pooled scatter of the
        reference inputs (``"mean"``: the empirical variance). NaN where unknown.
    n_used
        Inputs kept per pixel, ``uint16``.
    n_inputs
        Inputs added.
    empirical_variance
        Variance of ``image`` from the kept inputs' own scatter (NaN where
        fewer than two were kept): noisy per pixel, but a check of the model.
    common_variance
        The part of ``variance`` common to every input (the noise of masters
        they all had subtracted, see :func:`combine_calibration`), which their
        scatter cannot show: compare ``empirical_variance`` with
        ``variance - common_variance``.
    """

    image: np.ndarray
    variance: np.ndarray
    n_used: np.ndarray
    n_inputs: int
    empirical_variance: np.ndarray
    common_variance: np.ndarray | float = 0.0


@dataclass
class _Input:
    scale: float  # the input's typical variance
    weight: float
    variance: np.ndarray | None  # per pixel, or None: scale * the reference shape


def _finite_median(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(np.median(v)) if v.size else math.nan


class StreamingCombiner:
    """Clipped weighted mean of images added one at a time, in bounded memory.

    See the module docstring for the algorithm.

    Parameters
    ----------
    shape
        ``(ny, nx)`` of every input.
    method
        ``"clipped_mean"`` (reject outliers against the reference) or
        ``"mean"`` (keep everything but masked pixels; no inputs are held).
    nsigma
        Clipping threshold in standard deviations of ``x - ref``.
    n_reference
        Inputs held to form the reference median. Clipping needs at least
        three at a pixel; with fewer in all, nothing is clipped.
    grow
        Also reject pixels within this many pixels (a square) of a clipped one.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        method: Literal["clipped_mean", "mean"] = "clipped_mean",
        nsigma: float = 4.0,
        n_reference: int = 5,
        grow: int = 1,
    ) -> None:
        if method not in ("clipped_mean", "mean"):
            raise ValueError(f"method must be 'clipped_mean' or 'mean', not {method!r}")
        if not nsigma > 0:
            raise ValueError(f"nsigma must be > 0, not {nsigma!r}")
        if n_reference < 1:
            raise ValueError(f"n_reference must be >= 1, not {n_reference!r}")
        if grow < 0:
            raise ValueError(f"grow must be >= 0, not {grow!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.method = method
        self.nsigma = float(nsigma)
        self.n_reference = int(n_reference) if method == "clipped_mean" else 0
        self.grow = int(grow)
        self._n_added = 0
        self._noise: Literal["plane", "scalar", "none"] | None = None
        self._held_image: np.ndarray | None = None
        self._held_variance: np.ndarray | None = None
        self._held: list[_Input] = []
        self._pooled_scale: float | None = None
        self._ref: np.ndarray | None = None
        self._ref_variance: np.ndarray | None = None
        self._shape_variance: np.ndarray | None = None
        self._sum_w: np.ndarray | None = None
        self._sum_wd: np.ndarray | None = None
        self._sum_wd2: np.ndarray | None = None
        self._sum_w2v: np.ndarray | None = None
        self._count: np.ndarray | None = None

    @property
    def n_added(self) -> int:
        """Inputs added so far."""
        return self._n_added

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The arrays the combiner holds now, by name (to check its memory)."""
        names = (
            "_held_image",
            "_held_variance",
            "_ref",
            "_ref_variance",
            "_shape_variance",
            "_sum_w",
            "_sum_wd",
            "_sum_wd2",
            "_sum_w2v",
            "_count",
        )
        out = {n.lstrip("_"): getattr(self, n) for n in names}
        return {k: v for k, v in out.items() if v is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays the combiner holds now."""
        return sum(a.nbytes for a in self.state_arrays().values())

    # --- adding inputs ---------------------------------------------------------------

    def add_exposure(
        self, exposure: Exposure, *, weight: float | None = None, reject_bits: int = REJECT_BITS
    ) -> float:
        """Add an ISR-processed exposure; pixels with any of ``reject_bits`` are left out.

        Returns the input's weight, as :meth:`add`.
        """
        mask = (exposure.mask & np.uint32(reject_bits)) != 0
        return self.add(exposure.image, exposure.variance, mask=mask, weight=weight)

    def add(
        self,
        image: np.ndarray,
        variance: np.ndarray | float | None = None,
        *,
        mask: np.ndarray | None = None,
        weight: float | None = None,
    ) -> float:
        """Add one input.

        Parameters
        ----------
        image
            The input, ``shape``; non-finite pixels are left out.
        variance
            Its noise model: a variance per pixel, one variance for every
            pixel, or ``None`` (unknown: the scatter of the reference inputs
            gives one shared variance). All inputs must give the same form.
        mask
            ``True`` where the input must be left out.
        weight
            Weight of this input in the mean; default the inverse of its
            typical (median) variance, or 1 when the variance is unknown.

        Returns
        -------
        float
            The weight given to the input.

        Raises
        ------
        ValueError
            On a shape mismatch, a change of noise-model form, or more than
            65535 inputs.
        """
        image = np.asarray(image, dtype=np.float32)
        if image.shape != self.shape:
            raise ValueError(f"image shape {image.shape} != combiner shape {self.shape}")
        if mask is not None and np.shape(mask) != self.shape:
            raise ValueError(f"mask shape {np.shape(mask)} != combiner shape {self.shape}")
        if self._n_added >= np.iinfo(np.uint16).max:
            raise ValueError("too many inputs for one combination")
        noise: Literal["plane", "scalar", "none"]
        var_plane: np.ndarray | None = None
        if variance is None:
            noise, scale = "none", 1.0
        elif np.ndim(variance) == 0:
            noise, scale = "scalar", float(variance)
            if not scale > 0:
                raise ValueError(f"variance must be > 0, not {scale!r}")
        else:
            noise = "plane"
            var_plane = np.asarray(variance, dtype=np.float32)
            if var_plane.shape != self.shape:
                raise ValueError(f"variance shape {var_plane.shape} != combiner shape {self.shape}")
            scale = _typical_variance(var_plane, mask)
        if self._noise is None:
            self._noise = noise
        elif noise != self._noise:
            raise ValueError(f"input {self._n_added}: noise model {noise!r} after {self._noise!r}")
        if weight is None:
            weight = 1.0 / scale if noise != "none" else 1.0
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be finite and > 0, not {weight!r}")
        info = _Input(scale=scale, weight=float(weight), variance=var_plane)
        self._n_added += 1
        if self._ref is None and len(self._held) < self.n_reference:
            self._hold(image, info, mask)
            if len(self._held) == self.n_reference:
                self._form_reference()
            return info.weight
        if self._ref is None:  # method "mean": the first input is the reference
            self._start_mean(image, mask)
        self._accumulate(image, info, mask)
        return info.weight

    def _hold(self, image: np.ndarray, info: _Input, mask: np.ndarray | None) -> None:
        k = len(self._held)
        if self._held_image is None:
            self._held_image = np.empty((self.n_reference, *self.shape), dtype=np.float32)
            if self._noise == "plane":
                self._held_variance = np.empty_like(self._held_image)
        held = self._held_image[k]
        np.copyto(held, image)
        if mask is not None:
            held[mask] = np.nan
        held[~np.isfinite(held)] = np.nan
        if self._held_variance is not None and info.variance is not None:
            np.copyto(self._held_variance[k], info.variance)
            info.variance = self._held_variance[k]
        self._held.append(info)

    def _start_mean(self, image: np.ndarray, mask: np.ndarray | None) -> None:
        ref = np.where(np.isfinite(image), image, np.float32(0.0))
        if mask is not None:
            ref[mask] = 0.0
        self._ref = ref.astype(np.float32, copy=False)
        self._ref_variance = np.full(self.shape, np.inf, dtype=np.float32)
        self._alloc_sums()

    def _alloc_sums(self) -> None:
        self._sum_w = np.zeros(self.shape, dtype=np.float32)
        self._sum_wd = np.zeros(self.shape, dtype=np.float32)
        self._sum_wd2 = np.zeros(self.shape, dtype=np.float32)
        self._sum_w2v = np.zeros(self.shape, dtype=np.float32)
        self._count = np.zeros(self.shape, dtype=np.uint16)

    def _form_reference(self) -> None:
        """Median of the held inputs, the noise model about it, then fold them in."""
        assert self._held_image is not None
        n = len(self._held)
        stack = self._held_image[:n]
        ref = np.empty(self.shape, dtype=np.float32)
        n_ref = np.empty(self.shape, dtype=np.float32)
        if self._noise == "plane":
            assert self._held_variance is not None
            self._shape_variance = np.empty(self.shape, dtype=np.float32)
            inv_scales = np.asarray([1.0 / h.scale for h in self._held], dtype=np.float32)
        # Medians copy what they sort: going by blocks of rows keeps that copy small.
        for r0 in range(0, self.shape[0], _REFERENCE_ROWS):
            rows = slice(r0, r0 + _REFERENCE_ROWS)
            block = stack[:, rows]
            has_nan = bool(np.isnan(block).any())
            median = np.nanmedian if has_nan else np.median
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
                ref[rows] = median(block, axis=0)
                n_ref[rows] = np.isfinite(block).sum(axis=0) if has_nan else n
                if self._shape_variance is not None and self._held_variance is not None:
                    shape_var = self._held_variance[:n, rows] * inv_scales[:, None, None]
                    if has_nan:
                        shape_var[np.isnan(block)] = np.nan
                    self._shape_variance[rows] = median(shape_var, axis=0)
        if self._noise == "none":
            self._pooled_scale = _pooled_variance(stack)
            for h in self._held:
                h.scale = self._pooled_scale
        mean_scale = float(np.mean([h.scale for h in self._held]))
        with np.errstate(divide="ignore", invalid="ignore"):
            ref_var = np.float32(_MEDIAN_VARIANCE * mean_scale) / n_ref
        if self._shape_variance is not None:
            ref_var *= self._shape_variance
        # Fewer than three values have no majority to outvote an outlier: no clipping.
        unclipped = (n_ref < 3) | ~np.isfinite(ref)
        ref_var[unclipped] = np.inf
        if self._shape_variance is not None:
            self._shape_variance[~np.isfinite(self._shape_variance)] = 1.0
        ref[~np.isfinite(ref)] = 0.0
        del n_ref, unclipped
        self._ref, self._ref_variance = ref, ref_var
        self._alloc_sums()
        held, self._held = self._held, []
        for k, info in enumerate(held):
            self._accumulate(stack[k], info, None)
        self._held_image = self._held_variance = None

    def _accumulate(self, image: np.ndarray, info: _Input, mask: np.ndarray | None) -> None:
        assert self._ref is not None and self._ref_variance is not None
        assert self._sum_w is not None and self._sum_wd is not None and self._count is not None
        assert self._sum_wd2 is not None and self._sum_w2v is not None
        if self._noise == "none" and self._pooled_scale is not None:
            info.scale = self._pooled_scale
        d = image - self._ref
        expected_var: np.ndarray | np.float32 = np.float32(info.scale)
        if self._shape_variance is not None:
            expected_var = self._shape_variance * np.float32(info.scale)
        with np.errstate(invalid="ignore"):
            threshold = self._ref_variance + expected_var
            threshold *= np.float32(self.nsigma**2)
            # NaN compares False: non-finite input pixels are rejected with the outliers.
            reject = ~(d * d <= threshold)
        del threshold
        if self.grow and self.method == "clipped_mean":
            _grow(reject & np.isfinite(d), self.grow, out=reject)
        if mask is not None:
            reject |= mask
        keep = ~reject
        d[reject] = 0.0
        w = np.float32(info.weight)
        self._sum_wd += w * d
        d *= d
        self._sum_wd2 += w * d
        self._sum_w += w * keep
        self._count += keep
        if info.variance is not None:
            var = np.where(keep, info.variance, np.float32(0.0))
        else:
            var = keep * expected_var
        var *= w * w
        self._sum_w2v += var

    # --- the result ------------------------------------------------------------------

    def result(self) -> CombinedImage:
        """The combination of the inputs added so far.

        With fewer than ``n_reference`` inputs the reference is formed from
        those; later inputs are then clipped against it.

        Raises
        ------
        ValueError
            When no input was added.
        """
        if self._n_added == 0:
            raise ValueError("no inputs to combine")
        if self._ref is None:
            self._form_reference()
        assert self._ref is not None and self._sum_w is not None and self._count is not None
        assert self._sum_wd is not None and self._sum_wd2 is not None
        assert self._sum_w2v is not None
        sum_w, count = self._sum_w, self._count
        with np.errstate(divide="ignore", invalid="ignore"):
            # Sums of deviations from the reference: float32 loses nothing to cancellation.
            mean_d = self._sum_wd / sum_w
            image = mean_d + self._ref
            variance = self._sum_w2v / (sum_w * sum_w)
            chi2 = self._sum_wd2 - self._sum_wd * mean_d
            np.maximum(chi2, np.float32(0.0), out=chi2)
            chi2 /= sum_w
            chi2 /= count.astype(np.float32) - np.float32(1.0)
            empirical = chi2
        del mean_d
        none = self._count == 0
        image[none] = np.nan
        empirical[self._count < 2] = np.nan
        if self._noise == "none" and self._pooled_scale is None:
            # "mean" never pools a noise estimate: the scatter is all there is.
            variance = empirical.copy()
        # Infinite means unknown here (a pooled estimate from a single input).
        variance[none | ~np.isfinite(variance)] = np.nan
        return CombinedImage(
            image=image,
            variance=variance,
            n_used=self._count.copy(),
            n_inputs=self._n_added,
            empirical_variance=empirical,
        )


def _grow(clipped: np.ndarray, grow: int, *, out: np.ndarray) -> None:
    """Set ``out`` within ``grow`` pixels (a square) of every ``clipped`` pixel.

    Clipped pixels are few (cosmic rays, rare noise): shifting their indices
    is ten times faster than a dilation of the whole image.
    """
    ys, xs = np.nonzero(clipped)
    if ys.size == 0:
        return
    if ys.size > clipped.size // 64:
        out |= binary_dilation(clipped, structure=np.ones((2 * grow + 1,) * 2, dtype=bool))
        return
    ny, nx = clipped.shape
    for dy in range(-grow, grow + 1):
        yy = np.clip(ys + dy, 0, ny - 1)
        for dx in range(-grow, grow + 1):
            out[yy, np.clip(xs + dx, 0, nx - 1)] = True


def _typical_variance(variance: np.ndarray, mask: np.ndarray | None) -> float:
    sample = variance[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE]
    if mask is not None:
        sample = sample[~mask[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE]]
    scale = _finite_median(sample)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"an input's typical variance must be finite and > 0, not {scale!r}")
    return scale


def _pooled_variance(stack: np.ndarray) -> float:
    """One variance for every input, from differences of consecutive held inputs.

    ``x_a - x_b`` has variance ``2 sigma^2`` whatever the signal, and its
    median absolute value ignores the few pixels a cosmic ray hit.
    """
    if stack.shape[0] < 2:
        return math.inf
    diffs = np.abs(np.diff(stack[:, ::2, ::2], axis=0))
    # The deviations are about zero, the differences' true mean, not about their
    # median: hence the factor rather than mad_std.
    mad = _finite_median(diffs)
    return (MAD_TO_SIGMA * mad) ** 2 / 2.0 if mad > 0 else math.inf


@dataclass(frozen=True)
class MasterResult:
    """A combined calibration and how it was made.

    Attributes
    ----------
    kind
        Bias, dark or flat.
    combined
        e- (bias), e-/s (dark), or relative response with median about 1 (flat).
    mean_scale
        Mean of the inputs' :attr:`PreparedInput.scale`: for a flat, its level
        in e-, which :func:`ppray.calib.flatnorm.flat_statistics` takes so
        that relative gains between detectors survive.
    """

    kind: CalibKind
    combined: CombinedImage
    mean_scale: float

    @property
    def n_inputs(self) -> int:
        return self.combined.n_inputs


def combine_calibration(
    kind: CalibKind | str,
    raws: Iterable[RawExposure],
    instrument: Instrument,
    detector: Detector,
    *,
    bias: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    bias_variance: np.ndarray | None = None,
    dark_variance: np.ndarray | None = None,
    **combiner_options: Any,
) -> MasterResult:
    """Prepare and combine raws of one kind, one at a time (an iterator keeps memory bounded).

    Parameters
    ----------
    kind, instrument, detector, bias, dark
        As :func:`input_preparer`.
    raws
        The inputs; consumed once.
    bias_variance, dark_variance
        Variances of the masters subtracted from every input. Their noise is
        common to all inputs, so averaging does not reduce it: it is added to
        the result's ``variance`` as ``(mean coefficient)^2 * variance`` and
        kept as its ``common_variance``.
    **combiner_options
        Passed to :class:`StreamingCombiner` (``method``, ``nsigma``,
        ``n_reference``, ``grow``).

    Raises
    ------
    ValueError
        When ``raws`` is empty.
    """
    preparer = input_preparer(kind, instrument, detector, bias=bias, dark=dark)
    combiner = StreamingCombiner(preparer.calibs.shape, **combiner_options)
    scales, weights, bias_coef, dark_coef = [], [], [], []
    for raw in raws:
        prepared = preparer.prepare(raw)
        weights.append(combiner.add_exposure(prepared.exposure))
        scales.append(prepared.scale)
        # What each input carries of the masters it had subtracted, after its scaling.
        bias_coef.append(1.0 / prepared.scale)
        dark_coef.append(raw.darktime_s / prepared.scale)
    if not scales:
        raise ValueError(f"no {preparer.kind} inputs for {detector.name}")
    combined = combiner.result()
    w = np.asarray(weights)
    common: np.ndarray | float = 0.0
    if bias_variance is not None and preparer.kind is not CalibKind.BIAS:
        common = common + np.float32(np.dot(w, bias_coef) / w.sum()) ** 2 * bias_variance
    if dark_variance is not None and preparer.kind is CalibKind.FLAT:
        common = common + np.float32(np.dot(w, dark_coef) / w.sum()) ** 2 * dark_variance
    if not isinstance(common, float):
        common = np.asarray(common, dtype=np.float32)
        combined = replace(
            combined,
            variance=(combined.variance + common).astype(np.float32),
            common_variance=common,
        )
    return MasterResult(kind=preparer.kind, combined=combined, mean_scale=float(np.mean(scales)))


def master_calibrations(
    bias: np.ndarray,
    dark: np.ndarray,
    flat: np.ndarray,
    defects: np.ndarray,
    *,
    metadata: dict[str, Any] | None = None,
) -> Calibrations:
    """Assemble masters into the :class:`~ppray.image.Calibrations` that ISR uses.

    Pixels with no data in any master (NaN) or a flat that is not positive
    become defects, with bias 0, dark 0 and flat 1 so that ISR's arithmetic
    stays finite there; the ``BAD`` mask says they are unusable. The flat is
    taken as normalised (per detector, or over the focal plane with
    :mod:`ppray.calib.flatnorm`).

    Parameters
    ----------
    bias, dark, flat
        Combined images (e-, e-/s, relative response), all of one shape.
    defects
        ``True`` on defects (:attr:`ppray.calib.defects.Defects.mask`).
    metadata
        Kept on the result.
    """
    bias = np.asarray(bias, dtype=np.float32)
    dark = np.asarray(dark, dtype=np.float32)
    flat = np.asarray(flat, dtype=np.float32)
    shapes = {np.shape(a) for a in (bias, dark, flat, defects)}
    if len(shapes) != 1:
        raise ValueError(f"masters differ in shape: {sorted(shapes)}")
    with np.errstate(invalid="ignore"):
        unusable = ~np.isfinite(bias) | ~np.isfinite(dark) | ~(flat > 0) | ~np.isfinite(flat)
    all_defects = np.asarray(defects, dtype=bool) | unusable
    return Calibrations(
        bias=np.where(unusable, np.float32(0.0), bias),
        dark=np.where(unusable, np.float32(0.0), dark),
        flat=np.where(unusable, np.float32(1.0), flat),
        defects=all_defects,
        metadata=dict(metadata or {}),
    )
