"""Certified calibrations: validity ranges, bands, products, concurrency, resolution."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from numpy.testing import assert_array_equal

from ppray.calib import (
    LEGACY_CALIB_ID,
    CalibError,
    CalibRecord,
    CalibRegistry,
    CalibResolver,
    decode_product,
    encode_product,
)
from ppray.errors import NonRetriableError, RetriableError
from ppray.image import Calibrations
from ppray.storage import Storage

SHAPE = (12, 10)
T0 = 1_795_000_000.0
DAY = 86_400.0


@pytest.fixture
def registry(tmp_path: Path) -> CalibRegistry:
    return CalibRegistry(Storage(str(tmp_path / "calib")), "Synthetic")


def image(value: float, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    return np.full(shape, value, dtype=np.float32)


def legacy(value: float = 1.0) -> Calibrations:
    return Calibrations(
        bias=image(10 * value),
        dark=image(0.1 * value),
        flat=image(value),
        defects=np.zeros(SHAPE, dtype=bool),
    )


# --- lookup ---------------------------------------------------------------------------------


def test_newest_certification_wins_where_ranges_overlap(registry: CalibRegistry) -> None:
    old = registry.certify("bias", "R22_S00", image(1), valid_from=T0, valid_to=T0 + 10 * DAY)
    new = registry.certify("bias", "R22_S00", image(2), valid_from=T0 + DAY, valid_to=T0 + 2 * DAY)
    assert new.certified_at >= old.certified_at
    assert registry.lookup("R22_S00", "bias", None, T0 + 0.5 * DAY) == old
    assert registry.lookup("R22_S00", "bias", None, T0 + 1.5 * DAY) == new
    assert registry.lookup("R22_S00", "bias", None, T0 + 3 * DAY) == old  # new one ended
    # A later certification of the whole range supersedes both.
    newest = registry.certify("bias", "R22_S00", image(3), valid_from=T0 - DAY)
    for when in (T0, T0 + 1.5 * DAY, T0 + 100 * DAY):
        assert registry.lookup("R22_S00", "bias", None, when) == newest
    assert_array_equal(registry.read(newest, SHAPE), image(3))
    assert_array_equal(registry.read(old, SHAPE), image(1))


def test_validity_is_inclusive_from_exclusive_to(registry: CalibRegistry) -> None:
    rec = registry.certify("dark", "R22_S00", image(0.5), valid_from=T0, valid_to=T0 + 100.0)
    assert registry.lookup("R22_S00", "dark", None, T0 - 1e-3) is None
    assert registry.lookup("R22_S00", "dark", None, T0) == rec
    assert registry.lookup("R22_S00", "dark", None, T0 + 99.999) == rec
    assert registry.lookup("R22_S00", "dark", None, T0 + 100.0) is None
    # Back-to-back ranges: exactly one is valid at the seam.
    nxt = registry.certify("dark", "R22_S00", image(0.6), valid_from=T0 + 100.0)
    assert registry.lookup("R22_S00", "dark", None, T0 + 100.0) == nxt


def test_open_ended_range_is_valid_forever_after(registry: CalibRegistry) -> None:
    rec = registry.certify("defects", "R22_S00", np.eye(*SHAPE, dtype=bool), valid_from=T0)
    assert rec.valid_to is None
    assert registry.lookup("R22_S00", "defects", None, T0 + 1e6 * DAY) == rec
    assert registry.lookup("R22_S00", "defects", None, T0 - 1) is None


def test_flats_match_their_band_only(registry: CalibRegistry) -> None:
    r = registry.certify("flat", "R22_S00", image(1.1), band="r", valid_from=T0)
    g = registry.certify("flat", "R22_S00", image(0.9), band="g", valid_from=T0)
    assert registry.lookup("R22_S00", "flat", "r", T0 + 1) == r
    assert registry.lookup("R22_S00", "flat", "g", T0 + 1) == g
    assert registry.lookup("R22_S00", "flat", "i", T0 + 1) is None
    assert registry.lookup("R22_S00", "flat", None, T0 + 1) is None
    # The band is ignored for kinds that are not per band.
    bias = registry.certify("bias", "R22_S00", image(3), valid_from=T0)
    assert registry.lookup("R22_S00", "bias", "r", T0 + 1) == bias


def test_detectors_and_kinds_are_separate(registry: CalibRegistry) -> None:
    a = registry.certify("bias", "R22_S00", image(1), valid_from=T0, calib_id="bias-night1")
    b = registry.certify("bias", "R22_S01", image(2), valid_from=T0, calib_id="bias-night1")
    assert registry.lookup("R22_S01", "bias", None, T0) == b
    assert registry.lookup("R22_S00", "dark", None, T0) is None
    assert registry.lookup("R22_S11", "bias", None, T0) is None
    assert registry.records(detector="R22_S00") == [a]
    assert {r.detector for r in registry.records("bias")} == {"R22_S00", "R22_S01"}
    assert registry.records("flat") == []
    assert a.key != b.key and a.calib_id == b.calib_id
    # A fresh registry object (another process) sees the same records.
    again = CalibRegistry(registry.storage, "Synthetic")
    assert again.records() == registry.records()


def test_record_is_json_with_quality(registry: CalibRegistry) -> None:
    rec = registry.certify(
        "flat", "R22_S00", image(1), band="r", valid_from=T0, quality={"noise_ratio": 1.02}
    )
    stored = registry.storage.read_json(f"Synthetic/registry/R22_S00/{rec.calib_id}.json")
    assert CalibRecord.model_validate(stored) == rec
    assert rec.quality == {"noise_ratio": 1.02}
    assert rec.calib_id.startswith("flat-r-")
    assert registry.storage.exists(rec.key)


# --- products -------------------------------------------------------------------------------


def test_products_round_trip(registry: CalibRegistry) -> None:
    rng = np.random.default_rng(0)
    flat = rng.normal(1.0, 0.05, SHAPE).astype(np.float32)
    data = encode_product("flat", flat, {"band": "r", "nInputs": 20, "skipped": [1, 2]})
    assert_array_equal(decode_product("flat", data, SHAPE), flat)
    header = fits.getheader(io.BytesIO(data))
    assert header["CALKIND"] == "flat" and header["BAND"] == "r" and header["nInputs"] == 20
    defects = rng.random(SHAPE) < 0.1
    raw = encode_product("defects", defects)
    back = decode_product("defects", raw, SHAPE)
    assert back.dtype == bool
    assert_array_equal(back, defects)
    ints = decode_product("bias", encode_product("bias", np.arange(120).reshape(SHAPE)), SHAPE)
    assert ints.dtype == np.float32 and ints[11, 9] == 119


def test_decode_rejects_wrong_shape_kind_and_garbage() -> None:
    data = encode_product("dark", image(0.1))
    with pytest.raises(ValueError, match=r"shape \(12, 10\), expected \(10, 12\)"):
        decode_product("dark", data, (10, 12))
    with pytest.raises(ValueError, match="holds a 'dark' calibration, expected 'flat'"):
        decode_product("flat", data, SHAPE)
    with pytest.raises(ValueError, match="not valid FITS"):
        decode_product("dark", b"not a fits file at all", SHAPE)
    with pytest.raises(ValueError, match="unknown calibration kind"):
        decode_product("sky", data, SHAPE)  # type: ignore[arg-type]


def test_read_checks_shape_and_missing_product(registry: CalibRegistry) -> None:
    rec = registry.certify("bias", "R22_S00", image(1), valid_from=T0)
    with pytest.raises(CalibError, match="shape"):
        registry.read(rec, (4, 4))
    registry.storage.delete(rec.key)
    with pytest.raises(RetriableError):
        registry.read(rec, SHAPE)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "sky"}, "unknown calibration kind"),
        ({"kind": "bias", "band": "r"}, "not per band"),
        ({"kind": "flat"}, "must be certified for a filter band"),
        ({"valid_to": T0}, r"valid_to .* must be after valid_from"),
        ({"valid_to": T0 - 1}, "must be after valid_from"),
        ({"valid_from": float("nan")}, "valid_from must be finite"),
        ({"image": np.zeros(5, np.float32)}, "2-D"),
        ({"image": np.full(SHAPE, np.nan, np.float32)}, "non-finite"),
        ({"kind": "defects", "image": np.full(SHAPE, 2)}, "boolean"),
        ({"detector": "../R22"}, "detector"),
        ({"calib_id": "a/b"}, "calib_id"),
    ],
)
def test_bad_certifications_are_refused(
    registry: CalibRegistry, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {
        "kind": "dark",
        "detector": "R22_S00",
        "image": image(1),
        "valid_from": T0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as err:
        registry.certify(**args)  # type: ignore[arg-type]
    assert isinstance(err.value, NonRetriableError)
    assert registry.records() == []
    assert registry.storage.list("Synthetic") == []


def test_calib_id_is_unique_per_detector_but_retry_is_idempotent(registry: CalibRegistry) -> None:
    first = registry.certify("bias", "R22_S00", image(1), valid_from=T0, calib_id="bias-a")
    again = registry.certify("bias", "R22_S00", image(1), valid_from=T0, calib_id="bias-a")
    assert again == first
    with pytest.raises(CalibError, match="already certified"):
        registry.certify("bias", "R22_S00", image(1), valid_from=T0 + 1, calib_id="bias-a")
    with pytest.raises(CalibError, match="already certified"):
        registry.certify("dark", "R22_S00", image(1), valid_from=T0, calib_id="bias-a")
    assert len(registry.records()) == 1


# --- concurrency and versions ---------------------------------------------------------------


def test_concurrent_certifiers_leave_every_record(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "calib"))
    detectors = [f"R{r:02d}_S{s:02d}" for r in range(4) for s in range(6)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(detectors))

    def certify(detector: str) -> None:
        try:
            registry = CalibRegistry(storage, "LSSTCam")  # one per certifier, like actors
            barrier.wait()
            for kind in ("bias", "dark", "defects"):
                plane = np.zeros(SHAPE, bool) if kind == "defects" else image(1)
                registry.certify(kind, detector, plane, valid_from=T0, calib_id=f"{kind}-n1")
            for band in "gri":
                registry.certify("flat", detector, image(1), band=band, valid_from=T0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=certify, args=(d,)) for d in detectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    records = CalibRegistry(storage, "LSSTCam").records()
    assert len(records) == 6 * len(detectors)
    assert {(r.detector, r.kind, r.band) for r in records} == {
        (d, k, b)
        for d in detectors
        for k, b in [
            ("bias", None),
            ("dark", None),
            ("defects", None),
            *[("flat", c) for c in "gri"],
        ]
    }
    assert not [k for k in storage.list() if ".tmp-" in k]


def test_version_changes_on_every_certification(registry: CalibRegistry) -> None:
    seen = {registry.version()}
    s00 = registry.version("R22_S00")
    for i in range(3):
        registry.certify("bias", "R22_S01", image(i), valid_from=T0 + i)
        v = registry.version()
        assert v not in seen
        seen.add(v)
        assert registry.version() == v  # stable while nothing is certified
    assert registry.version("R22_S00") == s00  # another detector's certifications
    registry.certify("bias", "R22_S00", image(1), valid_from=T0)
    assert registry.version("R22_S00") != s00
    assert CalibRegistry(registry.storage, "Synthetic").version() == registry.version()


# --- resolution -----------------------------------------------------------------------------


def test_resolver_falls_back_to_legacy_per_kind(registry: CalibRegistry) -> None:
    base = legacy()
    resolver = CalibResolver(registry, "R22_S00", SHAPE, base)
    first = resolver.for_visit("r", T0)
    assert first.calibs is base
    assert set(first.calib_ids.values()) == {LEGACY_CALIB_ID}
    flat = registry.certify("flat", "R22_S00", image(1.25), band="r", valid_from=T0 + 10)
    # Before its validity: still legacy, the same object.
    assert resolver.for_visit("r", T0 + 5).calibs is base
    swapped = resolver.for_visit("r", T0 + 10)
    assert swapped.calib_ids == {**first.calib_ids, "flat": flat.calib_id}
    assert swapped.calibs is not base
    assert_array_equal(swapped.calibs.flat, image(1.25))
    assert_array_equal(swapped.calibs.inverse_flat, image(0.8))
    assert swapped.calibs.bias is base.bias  # unchanged planes are shared, not re-read
    assert_array_equal(base.flat, image(1.0))  # the set a visit holds is left alone
    assert_array_equal(base.inverse_flat, image(1.0))
    assert resolver.for_visit("r", T0 + 20) is swapped  # nothing changed: no rebuild
    assert resolver.current is swapped
    # Another band, or the same band again: legacy flat, the r flat comes back.
    g = resolver.for_visit("g", T0 + 30)
    assert g.calib_ids["flat"] == LEGACY_CALIB_ID
    assert_array_equal(g.calibs.flat, base.flat)
    assert resolver.for_visit("r", T0 + 40).calib_ids["flat"] == flat.calib_id


def test_resolver_without_legacy_needs_every_kind(registry: CalibRegistry) -> None:
    resolver = CalibResolver(registry, "R22_S00", SHAPE, None)
    assert resolver.current is None
    for kind, value in (("bias", 5.0), ("dark", 0.2)):
        registry.certify(kind, "R22_S00", image(value), valid_from=T0)  # type: ignore[arg-type]
    registry.certify("defects", "R22_S00", np.ones(SHAPE, bool), valid_from=T0)
    with pytest.raises(NonRetriableError, match="no flat certified"):
        resolver.for_visit("r", T0)
    registry.certify("flat", "R22_S00", image(1.0), band="r", valid_from=T0)
    got = resolver.for_visit("r", T0)
    assert LEGACY_CALIB_ID not in got.calib_ids.values()
    assert_array_equal(got.calibs.bias_and_dark(10.0), image(7.0))
    assert got.calibs.defects.all()


def test_resolver_rejects_products_of_the_wrong_shape(registry: CalibRegistry) -> None:
    resolver = CalibResolver(registry, "R22_S00", SHAPE, legacy())
    registry.certify("bias", "R22_S00", image(1, (6, 5)), valid_from=T0)
    with pytest.raises(CalibError, match="shape"):
        resolver.for_visit("r", T0)
    with pytest.raises(NonRetriableError, match="shape"):
        CalibResolver(registry, "R22_S00", (6, 5), legacy())
