"""Errors keep their cause: the exception ppray raises has the original as ``__cause__``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppray.config import load_config
from ppray.errors import NonRetriableError, RetriableError, ValidationFailure
from ppray.instrument import load_instrument
from ppray.messages import parse_message
from ppray.rawio import read_raw
from ppray.rawkeys import parse_s3_notification
from ppray.storage import Storage


def test_missing_object_is_retriable_with_the_filesystem_error(tmp_path: Path) -> None:
    with pytest.raises(RetriableError, match="no object") as info:
        Storage(str(tmp_path)).read_bytes("nothing/here.fits")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_bad_json_message_names_the_decoder_error() -> None:
    with pytest.raises(ValidationFailure, match="not valid JSON") as info:
        parse_message("next_visit", b"{not json")
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_bad_field_keeps_pydantics_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationFailure) as info:
        parse_message("next_visit", {"groupId": 3})
    assert isinstance(info.value.__cause__, ValidationError)


def test_notification_without_a_key_keeps_the_lookup_error() -> None:
    record = {"eventName": "ObjectCreated:Put", "s3": {"object": {}}}
    with pytest.raises(ValidationFailure, match="missing") as info:
        parse_s3_notification({"Records": [record]})
    assert isinstance(info.value.__cause__, KeyError)


def test_missing_config_file_keeps_the_filesystem_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist") as info:
        load_config(tmp_path / "absent.yaml")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_corrupt_raw_is_non_retriable_with_astropys_error() -> None:
    instrument = load_instrument("synthetic")
    with pytest.raises(NonRetriableError, match="not a valid FITS") as info:
        read_raw(b"SIMPLE  =  garbage", instrument, instrument.detector("R22_S11"))
    assert info.value.__cause__ is not None
