from __future__ import annotations

import json

import pytest

from ppray.errors import ValidationFailure
from ppray.messages import Dome, NextVisit, RawArrival, parse_message

from .helpers import raw, sal_next_visit


def test_full_sal_record_is_accepted_and_round_trips() -> None:
    record = sal_next_visit(unknownFutureField="tolerated")
    visit = parse_message("next_visit", json.dumps(record).encode())
    assert isinstance(visit, NextVisit)
    assert visit.dome is Dome.OPEN
    assert visit.private_seqNum == 77
    assert visit.key.group_id == record["groupId"]
    again = NextVisit.model_validate_json(visit.model_dump_json())
    assert again == visit
    assert "unknownFutureField" not in visit.model_dump()


@pytest.mark.parametrize("field", ["groupId", "instrument", "position", "duration", "nimages"])
def test_missing_required_field_is_named(field: str) -> None:
    record = sal_next_visit()
    del record[field]
    with pytest.raises(ValidationFailure) as info:
        parse_message("next_visit", record)
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("dome", 9), ("position", [1.0]), ("nimages", -1), ("groupId", "../etc"), ("duration", "x")],
)
def test_invalid_values_are_rejected_with_field(field: str, value: object) -> None:
    with pytest.raises(ValidationFailure) as info:
        parse_message("next_visit", sal_next_visit(**{field: value}))
    assert info.value.field.split(".")[0] == field


def test_bad_json_is_a_validation_failure() -> None:
    with pytest.raises(ValidationFailure, match="not valid JSON"):
        parse_message("next_visit", b"{not json")
    with pytest.raises(ValidationFailure, match="JSON object"):
        parse_message("next_visit", b"[1, 2]")


def test_visit_derived_properties() -> None:
    visit = NextVisit.model_validate(sal_next_visit(filters="SDSSr_65mm~empty", duration=30.0))
    assert visit.filter_band == "r"
    assert visit.timeout_s(20.0) == pytest.approx(80.0)
    # 2026-11-25T03:14 UTC is still the night of 2026-11-24 (UTC-12h rollover).
    assert visit.day_obs == "20261124"


def test_raw_arrival_round_trip_and_frozen() -> None:
    r = raw()
    assert RawArrival.model_validate_json(r.model_dump_json()) == r
    with pytest.raises(ValueError):
        r.snap = 3  # type: ignore[misc]
