"""The agent's messages as the protocol package defines them: what a command, a result and a
heartbeat must hold, and what is refused (with the field named)."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from image_service.protocol.agent import (
    AgentResult,
    CreateCommand,
    DeleteCommand,
    DownloadCommand,
    Heartbeat,
    parse_command,
)
from image_service.protocol.errors import ErrorCode, validation_details

OP = str(uuid.uuid4())
IMG = "a" * 32
BS = "b" * 32
PATH = f"/srv/bs/templates/{IMG}/x.template"


def download(**changes: object) -> bytes:
    body = {
        "command": "download",
        "opId": OP,
        "imageUuid": IMG,
        "backupStorageUuid": BS,
        "url": "http://127.0.0.1/x.qcow2",
        "format": "qcow2",
        "installPath": PATH,
        "md5Sum": None,
        **changes,
    }
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def refused(body: bytes) -> str:
    with pytest.raises(ValidationError) as excinfo:
        parse_command(body)
    return validation_details(excinfo.value)


def test_each_command_has_its_model() -> None:
    assert isinstance(parse_command(download()), DownloadCommand)
    create = {
        "command": "create",
        "opId": OP,
        "imageUuid": IMG,
        "backupStorageUuid": BS,
        "source": "file:///v/root.qcow2",
        "sourceFormat": "qcow2",
        "format": "qcow2",
        "installPath": PATH,
    }
    assert isinstance(parse_command(json.dumps(create)), CreateCommand)
    delete = {
        "command": "delete",
        "opId": OP,
        "imageUuid": IMG,
        "backupStorageUuid": BS,
        "installPath": PATH,
        "cancelOpIds": [uuid.uuid4().hex],
    }
    parsed = parse_command(json.dumps(delete))
    assert isinstance(parsed, DeleteCommand)
    assert parsed.cancelOpIds[0].count("-") == 4, "op ids have one spelling"


def test_op_ids_have_one_spelling() -> None:
    undashed = uuid.UUID(OP).hex.upper()
    assert parse_command(download(opId=undashed)).opId == OP


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"command": "format-disk"}, "command"),
        ({"command": ...}, "command"),
        ({"opId": "../../etc/passwd"}, "opId"),
        ({"opId": ...}, "opId"),
        ({"imageUuid": "A" * 32}, "imageUuid"),
        ({"installPath": ""}, "installPath"),
        ({"installPath": "/x\u0000y"}, "installPath"),
        ({"format": "vmdk"}, "format"),
        ({"md5Sum": "0" * 31}, "md5Sum"),
        ({"url": 42}, "url"),
    ],
)
def test_invalid_commands_name_the_field(changes: dict[str, object], field: str) -> None:
    assert field in refused(download(**changes))


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b"null", b'{"command": 1}'])
def test_garbage_is_refused(body: bytes) -> None:
    refused(body)


def test_unknown_fields_are_ignored_for_rolling_upgrades() -> None:
    assert parse_command(download(newField=1)).url == "http://127.0.0.1/x.qcow2"


def stored(**changes: object) -> dict[str, object]:
    return {
        "opId": OP,
        "backupStorageUuid": BS,
        "success": True,
        "installPath": PATH,
        "size": 10,
        "actualSize": 4096,
        "virtualSize": 65536,
        "md5Sum": "0" * 32,
        "format": "qcow2",
        **changes,
    }


def test_a_stored_file_is_whole_or_absent() -> None:
    result = AgentResult.model_validate(stored())
    assert result.stored is not None and result.stored.size == 10
    with pytest.raises(ValidationError, match="md5Sum"):
        AgentResult.model_validate(stored(md5Sum=None))
    with pytest.raises(ValidationError, match="failed op stores no file"):
        AgentResult.model_validate(stored(success=False, code="DOWNLOAD_FAILED"))
    assert (
        AgentResult.model_validate({"opId": OP, "backupStorageUuid": BS, "success": True}).stored
        is None
    )


@pytest.mark.parametrize("size", [-1, 2**63, "10", 1.5])
def test_sizes_are_64_bit_non_negative_integers(size: object) -> None:
    with pytest.raises(ValidationError):
        AgentResult.model_validate_json(json.dumps(stored(size=size)))


def test_unknown_codes_become_operation_error() -> None:
    result = AgentResult.failed(OP, BS, ErrorCode.CHECKSUM_MISMATCH, "x")
    assert result.error_code is ErrorCode.CHECKSUM_MISMATCH
    odd = AgentResult.model_validate(
        {"opId": OP, "backupStorageUuid": BS, "success": False, "code": "DISK_ON_FIRE"}
    )
    assert odd.error_code is ErrorCode.OPERATION_ERROR


def test_results_round_trip_through_json() -> None:
    result = AgentResult.model_validate(stored())
    assert AgentResult.model_validate_json(result.to_json()) == result
    assert b"null" not in result.to_json()


def test_heartbeat_bounds() -> None:
    beat = {
        "uuid": BS,
        "name": "bs1",
        "url": "/srv",
        "hostname": "h",
        "totalCapacity": 1,
        "availableCapacity": 0,
        "heartbeatInterval": 10,
    }
    assert Heartbeat.model_validate(beat).heartbeatInterval == 10
    for bad in ({"heartbeatInterval": 0}, {"availableCapacity": -1}, {"uuid": "x"}, {"name": ""}):
        with pytest.raises(ValidationError):
            Heartbeat.model_validate({**beat, **bad})


def test_a_failure_is_always_reportable() -> None:
    result = AgentResult.failed(OP, BS, ErrorCode.DOWNLOAD_FAILED, "x" * 100_000)
    assert result.details is not None and len(result.details) == 65536
    assert AgentResult.model_validate_json(result.to_json()) == result
