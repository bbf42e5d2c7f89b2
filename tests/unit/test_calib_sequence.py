"""Per-detector calibration sequences (``ppray.calib.sequence``), their results and simulator."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ppray.calib.combine import combine_calibration
from ppray.calib.prepare import CalibKind
from ppray.calib.registry import CalibRegistry
from ppray.calib.results import CalibResult, flat_factors, summarize_calibration
from ppray.calib.sequence import (
    DetectorSequence,
    InputMasters,
    SequenceProduct,
    certify_product,
    finish_sequence,
    input_masters,
    needed_masters,
    sequence_calib_id,
    sequence_kind,
    sequence_validity,
)
from ppray.config import CalibrationConfig, CalibSurveys, DeploymentConfig, load_config
from ppray.errors import NonRetriableError, RetriableError
from ppray.instrument import load_instrument
from ppray.messages import NextVisit, RawArrival
from ppray.rawio import read_raw
from ppray.sim.calib_sequence import CalibrationSimulator
from ppray.storage import Storage, read_uri

from .helpers import next_visit

SYN = load_instrument("synthetic")
DET = SYN.detector("R22_S11")
SHAPE = (SYN.layout.ny, SYN.layout.nx)
T0 = 1_790_000_000.0


def _config(root: Path) -> DeploymentConfig:
    return load_config(env={}).rooted_at(str(root)).with_overrides(detectors=("R22_S11",))


@cache
def _exposures(root: str, kind: str, n: int) -> tuple[NextVisit, tuple[RawArrival, ...]]:
    """A sequence of ``n`` exposures of ``kind`` written under ``root`` (cached per root)."""
    sim = CalibrationSimulator(_config(Path(root)), start_time=T0, cosmic_rays=10)
    visit = None
    for k in ("bias", "dark", "flat"):  # the same start times whatever kind is asked
        v = sim.sequence(k, n)
        if k == kind:
            visit = v
    assert visit is not None
    raws = tuple(r for snap in range(n) for r in sim.expose(visit, snap))
    return visit, raws


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("seq"))


def _feed(seq: DetectorSequence, raws: tuple[RawArrival, ...] | list[RawArrival]) -> None:
    for raw in raws:
        seq.offer(raw)
        for due in seq.due():
            seq.add_raw(due)
    for rest in seq.rest():
        seq.add_raw(rest)


# --- which sequence, which masters ---------------------------------------------------


def test_sequences_are_recognised_by_survey() -> None:
    surveys = CalibSurveys()
    assert sequence_kind(next_visit(survey="CALIB-BIAS"), surveys) is CalibKind.BIAS
    assert sequence_kind(next_visit(survey="CALIB-FLAT"), surveys) is CalibKind.FLAT
    assert sequence_kind(next_visit(survey="BLOCK-365"), surveys) is None
    custom = CalibSurveys(dark="DARKS")
    assert sequence_kind(next_visit(survey="DARKS"), custom) is CalibKind.DARK
    assert sequence_kind(next_visit(survey="CALIB-DARK"), custom) is None
    assert needed_masters("bias") == ()
    assert needed_masters("dark") == ("bias",)
    assert needed_masters(CalibKind.FLAT) == ("bias", "dark")


def test_input_masters_prefer_certified_then_legacy_else_say_why(tmp_path: Path) -> None:
    registry = CalibRegistry(Storage(str(tmp_path)), SYN.name)
    bias = np.full(SHAPE, 3.0, dtype=np.float32)
    registry.certify("bias", DET.name, bias, valid_from=T0, calib_id="bias-a")
    legacy = CalibrationSimulator(_config(tmp_path), start_time=T0).truth(DET.name).calibs
    got = input_masters(("bias", "dark"), registry, DET.name, T0 + 10, SHAPE, legacy)
    assert dict(got.calib_ids) == {"bias": "bias-a", "dark": "legacy"}
    assert_array_equal(got.planes["bias"], bias)
    assert got.planes["dark"] is legacy.dark
    # Before the bias's validity: only the legacy file.
    early = input_masters(("bias",), registry, DET.name, T0 - 10, SHAPE, legacy)
    assert dict(early.calib_ids) == {"bias": "legacy"}
    with pytest.raises(NonRetriableError, match=r"no master dark certified valid at .* run a dark"):
        input_masters(("dark",), registry, DET.name, T0, SHAPE, None)
    with pytest.raises(ValueError, match="need the master bias"):
        DetectorSequence("dark", SYN, DET, expected=2, masters=InputMasters())


def test_ids_and_validity_are_deterministic() -> None:
    visit = next_visit(survey="CALIB-FLAT", groupId="2026-11-25T03:14:15.926535", filters="r")
    assert sequence_calib_id("flat", visit) == "flat-r-2026-11-25T03-14-15.926535"
    assert sequence_calib_id("defects", visit) == "defects-2026-11-25T03-14-15.926535"
    assert sequence_validity(visit, CalibrationConfig()) == (visit.startTime, None)
    week = CalibrationConfig(validity_days=7)
    assert sequence_validity(visit, week) == (visit.startTime, visit.startTime + 7 * 86400)


# --- accumulation ----------------------------------------------------------------------


def test_raws_are_taken_in_snap_order_whatever_their_arrival(root: str) -> None:
    _, raws = _exposures(root, "bias", 4)
    seq = DetectorSequence("bias", SYN, DET, expected=4)
    assert seq.offer(raws[2]) and seq.due() == []  # snaps 0 and 1 are missing
    assert seq.offer(raws[0]) and [r.snap for r in seq.due()] == [0]
    assert not seq.offer(raws[0])  # a duplicate
    assert seq.offer(raws[3]) and seq.due() == []
    assert [r.snap for r in seq.rest()] == [2, 3]  # the end: the gap will not fill
    assert seq.n_seen == 3 and not seq.complete


def test_the_master_does_not_depend_on_arrival_order(root: str) -> None:
    _, raws = _exposures(root, "bias", 7)
    forward = DetectorSequence("bias", SYN, DET, expected=7)
    _feed(forward, raws)
    backward = DetectorSequence("bias", SYN, DET, expected=7)
    _feed(backward, raws[::-1])
    assert forward.added == backward.added == list(range(7))
    assert_array_equal(forward.combine().combined.image, backward.combine().combined.image)
    # ... and it is the library's combination of the same inputs.
    library = combine_calibration(
        "bias", (read_raw(read_uri(r.uri), SYN, DET) for r in raws), SYN, DET
    )
    assert_array_equal(forward.combine().combined.image, library.combined.image)


def test_state_is_bounded_whatever_the_number_of_exposures(root: str) -> None:
    plane = SHAPE[0] * SHAPE[1] * 4
    peaks = []
    for n in (6, 12):
        _, raws = _exposures(root, "bias", n)
        seq = DetectorSequence("bias", SYN, DET, expected=n)
        _feed(seq, raws)
        assert seq.complete and len(seq.added) == n
        peaks.append(seq.peak_nbytes)
        assert seq.combiner.nbytes <= 8 * plane  # after the reference: sums, not images
    assert peaks[0] == peaks[1] == 2 * 5 * plane


def test_unusable_inputs_are_rejected_and_the_rest_combine(root: str, tmp_path: Path) -> None:
    _, biases = _exposures(root, "bias", 4)
    _, darks = _exposures(root, "dark", 4)
    corrupt = tmp_path / "corrupt.fits"
    corrupt.write_bytes(b"SIMPLE  = not a FITS file")
    seq = DetectorSequence("bias", SYN, DET, expected=4)
    assert seq.add_raw(biases[0]) and seq.add_raw(biases[1])
    assert not seq.add_raw(darks[2])  # a dark in a bias sequence
    assert not seq.add_raw(biases[3].model_copy(update={"uri": str(corrupt)}))
    assert "IMGTYPE 'dark'" in seq.rejected[2] and "FITS" in seq.rejected[3]
    assert seq.complete and seq.combine().n_inputs == 2
    missing = biases[0].model_copy(update={"uri": str(tmp_path / "not-there.fits"), "snap": 9})
    with pytest.raises(RetriableError):  # storage: the sequence cannot go on
        seq.add_raw(missing)
    nothing = DetectorSequence("bias", SYN, DET, expected=1)
    nothing.add_raw(darks[0])
    with pytest.raises(NonRetriableError, match="no usable bias inputs"):
        nothing.combine()
    assert nothing.snapshot()["rejected"] == {"0": nothing.rejected[0]}


# --- products and certification --------------------------------------------------------


@cache
def _flat_product(root: str) -> tuple[NextVisit, DetectorSequence, SequenceProduct]:
    sim = CalibrationSimulator(_config(Path(root)), start_time=T0, cosmic_rays=10)
    truth = sim.truth(DET.name).calibs
    masters = InputMasters({"bias": truth.bias, "dark": truth.dark}, {"bias": "b", "dark": "d"})
    visit, raws = _exposures(root, "flat", 8)
    seq = DetectorSequence("flat", SYN, DET, expected=8, masters=masters)
    _feed(seq, raws)
    return visit, seq, finish_sequence(seq, CalibrationConfig())


def test_a_flat_yields_defects_quality_and_focal_plane_statistics(root: str) -> None:
    _, seq, product = _flat_product(root)
    sim = CalibrationSimulator(_config(Path(root)), start_time=T0)
    truth = sim.truth(DET.name)
    assert product.defects is not None and product.flat_statistics is not None
    found = product.defects.mask
    assert (found & truth.calibs.defects).sum() >= 0.95 * truth.calibs.defects.sum()
    quality = product.quality
    assert set(quality) == {"flat", "defects"}
    assert quality["flat"]["n_inputs"] == 8 and quality["defects"]["n_dead"] >= 14
    assert all(math.isfinite(v) for q in quality.values() for v in q.values())
    stats = product.flat_statistics
    # The flat's level in e- carries the detector's gain and the lamp: what the
    # focal-plane reduction needs.
    assert_allclose(stats.scale, np.mean(seq.scales))
    assert_allclose(stats.median, 20_000 * sim.relative_gain(DET.name), rtol=0.06)


def test_certification_applies_the_factor_and_is_idempotent(root: str, tmp_path: Path) -> None:
    visit, _, product = _flat_product(root)
    registry = CalibRegistry(Storage(str(tmp_path)), SYN.name)
    config = CalibrationConfig(validity_days=30)
    with pytest.raises(ValueError, match="focal-plane factor"):
        certify_product(registry, product, visit, DET.name, config)
    flat, defects = certify_product(registry, product, visit, DET.name, config, flat_factor=0.9)
    assert (flat.kind, flat.band, defects.kind, defects.band) == ("flat", "r", "defects", None)
    assert flat.valid_to == pytest.approx(visit.startTime + 30 * 86400)
    assert flat.quality["focal_plane_factor"] == 0.9 and "noise" in flat.quality
    assert defects.quality["n_hot"] > 0
    image = product.image
    assert_allclose(
        registry.read(flat, SHAPE), np.where(np.isfinite(image), image, 1) * 0.9, rtol=1e-6
    )
    again = certify_product(registry, product, visit, DET.name, config, flat_factor=0.9)
    assert again == [flat, defects]  # a retried certification writes nothing new
    assert len(registry.records(detector=DET.name)) == 2


# --- results and their gather --------------------------------------------------------


def _result(detector: str, **kw: object) -> CalibResult:
    base: dict[str, object] = {
        "instrument": "Synthetic",
        "group_id": "g",
        "detector": detector,
        "detector_id": 0,
        "kind": "flat",
        "status": "ok",
    }
    return CalibResult.model_validate(base | kw)


def test_flat_factors_are_a_reduction_over_statistics_in_any_order(root: str) -> None:
    _, _, product = _flat_product(root)
    stats = product.flat_statistics
    assert stats is not None
    other = stats.model_copy(
        update={
            "detector": "R22_S00",
            "scale": stats.scale * 1.1,
            "median": stats.median * 1.1,
            "quantiles": tuple(q * 1.1 for q in stats.quantiles),
        }
    )
    results = [
        _result("R22_S11", pending=True, flat_statistics=stats),
        _result("R22_S00", pending=True, flat_statistics=other),
        _result("R22_S01", status="failed"),
    ]
    factors = flat_factors(results)
    assert factors == flat_factors(results[::-1])
    assert set(factors) == {"R22_S00", "R22_S11"}
    assert_allclose(factors["R22_S00"] / factors["R22_S11"], 1.1, rtol=1e-9)


def test_summary_counts_missing_and_uncertified_detectors() -> None:
    certified = _result(
        "R22_S00",
        kind="bias",
        n_inputs=5,
        quality={"bias": {"noise": 2.0}},
        combiner_peak_bytes=10,
        last_raw_at=5.0,
    )
    pending = _result("R22_S01", kind="bias", pending=True)
    timed_out = _result("R22_S10", kind="bias", status="timed_out", reason="2 of 5 raws")
    summary = summarize_calibration(
        "Synthetic",
        "g",
        "bias",
        ["R22_S00", "R22_S01", "R22_S10", "R22_S11"],
        [timed_out, pending, certified],
        done_at=7.0,
    )
    assert summary.detectors == {
        "R22_S00": "ok",
        "R22_S01": "failed",
        "R22_S10": "timed_out",
        "R22_S11": "failed",
    }
    assert summary.reasons["R22_S11"] == "no result"
    assert summary.reasons["R22_S01"] == "flat never certified"
    assert (summary.n_ok, summary.n_failed, summary.n_timed_out, summary.n_retriable) == (
        1,
        2,
        1,
        1,
    )
    assert summary.quality == {"R22_S00": {"bias": {"noise": 2.0}}}
    assert summary.latency_s == 2.0


# --- the simulator ----------------------------------------------------------------------


def test_simulator_announces_sequences_in_order_with_raws_on_disk(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    sim = CalibrationSimulator(cfg, start_time=T0)
    bias = sim.sequence("bias", 3)
    flat = sim.sequence("flat", 2, band="g")
    assert (bias.survey, bias.nimages, bias.startTime) == ("CALIB-BIAS", 3, T0)
    assert flat.startTime >= bias.startTime + bias.duration
    assert (flat.survey, flat.filter_band) == ("CALIB-FLAT", "g")
    raws = sim.expose(flat, 1)
    assert [(r.detector, r.snap, r.group_id) for r in raws] == [("R22_S11", 1, flat.groupId)]
    parsed = read_raw(read_uri(raws[0].uri), SYN, DET)
    assert parsed.header["IMGTYPE"] == "FLAT" and parsed.header["GROUPID"] == flat.groupId
    assert Storage(cfg.raw_root).exists(raws[0].uri.split(cfg.raw_root + "/", 1)[1][:-5] + ".json")
    assert sim.relative_gain("R22_S11") == CalibrationSimulator(cfg).relative_gain("R22_S11")
    with pytest.raises(ValueError, match="no filter"):
        sim.sequence("flat", 2, band="q")
    with pytest.raises(ValueError, match="at least one"):
        sim.sequence("dark", 0)
    with pytest.raises(ValueError, match="outside"):
        sim.expose(bias, 3)
