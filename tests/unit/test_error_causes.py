"""Errors keep their cause: the exception ppray raises has the original as ``__cause__``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from ppray.actors import cli

from ppray.config import load_config
from ppray.errors import NonRetriableError, PprayError, RetriableError, ValidationFailure
from ppray.imageio import calibrations_from_fits
from ppray.instrument import load_instrument
from ppray.kafka.source import RawResolver
from ppray.messages import parse_message
from ppray.rawio import read_raw
from ppray.rawkeys import parse_s3_notification, raw_key, sidecar_key
from ppray.schema import load_alert_schema
from ppray.storage import Storage


def test_missing_object_is_retriable_with_the_filesystem_error(tmp_path: Path) -> None:
    with pytest.raises(RetriableError, match="no such object") as info:
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
    # astropy's own error (OSError, ValueError, TypeError or a warning), not ours.
    cause = info.value.__cause__
    assert isinstance(cause, (OSError, ValueError, TypeError, Warning))
    assert not isinstance(cause, PprayError)


def test_unsafe_raw_key_keeps_the_storage_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationFailure, match=r"s3\.object\.key") as info:
        RawResolver(str(tmp_path)).resolve("../outside/raw.fits")
    assert isinstance(info.value.__cause__, NonRetriableError)


def test_sidecar_that_is_not_json_keeps_the_decoder_error(tmp_path: Path) -> None:
    inst = load_instrument("synthetic")
    key = raw_key(inst.name, inst.obs_id_prefix, 20260101, 12, "R22_S01")
    store = Storage(str(tmp_path))
    store.write_bytes(key, b"raw")
    store.write_bytes(sidecar_key(key), b"{not json")
    with pytest.raises(ValidationFailure, match="not JSON") as info:
        RawResolver(str(tmp_path), instrument=inst, wait_s=0.1, poll_s=0.05).resolve(key)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_corrupt_calibration_file_is_non_retriable_with_the_os_error() -> None:
    with pytest.raises(NonRetriableError, match="not valid FITS") as info:
        calibrations_from_fits(b"SIMPLE  =  garbage", (4, 4))
    assert isinstance(info.value.__cause__, OSError)


def test_unknown_schema_record_keeps_the_lookup_error() -> None:
    with pytest.raises(KeyError, match="no record") as info:
        load_alert_schema().record("diaNothing")
    assert isinstance(info.value.__cause__, KeyError)


def test_cli_prints_one_line_and_logs_the_cause_at_debug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    image = tmp_path / "m.fits"
    image.write_bytes(b"SIMPLE  =  garbage")
    caplog.set_level(logging.DEBUG, logger=cli.__name__)
    argv = ["calib", "certify", "--output", str(tmp_path), "--file", str(image)]
    assert cli.main([*argv, "--kind", "bias", "--detector", "R22_S00"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppray: error: ") and "not a FITS file" in err[0]
    (record,) = [r for r in caplog.records if r.name == cli.__name__]
    assert record.levelno == logging.DEBUG and record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)
    assert isinstance(record.exc_info[1].__cause__, OSError)
