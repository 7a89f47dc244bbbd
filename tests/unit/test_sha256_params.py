"""AddImage's `sha256Sum` (contract section 9) on the service side: the parameter as the service
validates it, the download command it becomes, the inventory field, the queryable field and
the migration that adds its columns."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, cast

import pytest
from pydantic import ValidationError

from image_service.api import APIS
from image_service.api.creation import Source, _command
from image_service.errors import ErrorCode
from image_service.inventory import image_inventory
from image_service.lifecycle import ImageStatus, OpKind
from image_service.params import AddImage, Envelope
from image_service.pipeline import Pipeline
from image_service.protocol.agent import DownloadCommand
from image_service.protocol.errors import validation_details
from image_service.query import IMAGE, Kind
from image_service.settlement import settle_message
from image_service.store.images import NewImageRow
from image_service.store.migrations import available_migrations

U1 = "a" * 32
SHA = hashlib.sha256(b"cloud image").hexdigest()


def add_image(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "jammy",
        "url": "https://cloud-images.example.com/jammy.img",
        "format": "qcow2",
        "backupStorageUuids": [U1],
        **overrides,
    }


def validate(params: dict[str, Any]) -> AddImage:
    """How the service validates: `model_validate_json(json.dumps(params))`."""
    return AddImage.model_validate_json(json.dumps(params))


def service_reply(params: dict[str, Any]) -> dict[str, Any] | None:
    """The reply the service's pipeline gives to AddImage with `params` when validation refuses
    them, None when they pass (validation reads only the API table)."""
    pipeline = Pipeline(cast(Any, None), cast(Any, None), APIS, settle_message)
    checked = pipeline._validate(Envelope(api="AddImage", params=params))
    return checked if isinstance(checked, dict) else None


# --- the parameter -------------------------------------------------------------------------


def test_sha256_is_optional() -> None:
    assert validate(add_image()).sha256Sum is None
    assert validate(add_image(sha256Sum=None)).sha256Sum is None


def test_a_lowercase_sha256_is_kept() -> None:
    assert validate(add_image(sha256Sum=SHA)).sha256Sum == SHA
    assert service_reply(add_image(sha256Sum=SHA)) is None


def test_an_uppercase_or_mixed_case_sha256_is_stored_lowercased() -> None:
    assert validate(add_image(sha256Sum=SHA.upper())).sha256Sum == SHA
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(SHA))
    assert validate(add_image(sha256Sum=mixed)).sha256Sum == SHA


def test_md5_and_sha256_are_independent() -> None:
    md5 = hashlib.md5(b"cloud image").hexdigest()
    image = validate(add_image(md5Sum=md5.upper(), sha256Sum=SHA.upper()))
    assert (image.md5Sum, image.sha256Sum) == (md5, SHA)


BAD_SHA256 = [
    pytest.param(SHA[:-1], id="63 characters"),
    pytest.param(SHA + "0", id="65 characters"),
    pytest.param(SHA[:32], id="an md5's length"),
    pytest.param("", id="empty"),
    pytest.param("g" + SHA[1:], id="non-hex g"),
    pytest.param("-" + SHA[1:], id="non-hex dash"),
    pytest.param(" " + SHA[1:], id="leading space"),
    pytest.param(SHA[:-1] + "\n", id="newline for the last digit"),
    # `$` of a Python regex also matches before a final newline: the length bound refuses it.
    pytest.param(SHA + "\n", id="trailing newline"),
    pytest.param("sha256:" + SHA[7:], id="prefixed"),
    pytest.param("٣" + SHA[1:], id="non-ASCII digit"),
    pytest.param(42, id="a number"),
    pytest.param([SHA], id="a list"),
]


@pytest.mark.parametrize("bad", BAD_SHA256)
def test_a_bad_sha256_is_rejected_by_name(bad: Any) -> None:
    with pytest.raises(ValidationError) as excinfo:
        validate(add_image(sha256Sum=bad))
    details = validation_details(excinfo.value)
    assert details.startswith("sha256Sum:"), details


@pytest.mark.parametrize("bad", BAD_SHA256)
def test_the_service_answers_a_bad_sha256_with_invalid_argument(bad: Any) -> None:
    reply = service_reply(add_image(sha256Sum=bad))
    assert reply is not None and reply["success"] is False, reply
    assert reply["error"]["code"] == ErrorCode.INVALID_ARGUMENT.value
    assert "sha256Sum" in reply["error"]["details"], reply


def test_a_non_hex_sha256_says_what_is_expected() -> None:
    reply = service_reply(add_image(sha256Sum="z" * 64))
    assert reply is not None
    assert reply["error"]["details"] == "sha256Sum: must be 64 hex characters"


# --- the download command ------------------------------------------------------------------


def new_image(**overrides: Any) -> NewImageRow:
    fields: dict[str, Any] = {
        "uuid": uuid.uuid4().hex,
        "name": "jammy",
        "description": None,
        "status": ImageStatus.Downloading,
        "url": "https://cloud-images.example.com/jammy.img",
        "media_type": "RootVolumeTemplate",
        "guest_os_type": None,
        "platform": "Linux",
        "system": False,
        "format": "qcow2",
        "expected_md5": None,
        "expected_sha256": SHA,
        **overrides,
    }
    return NewImageRow(**fields)


def test_the_download_command_carries_the_expected_sha256() -> None:
    image = new_image()
    source = Source(OpKind.download, url=image.url, sha256_sum=SHA)
    command = _command(image, source, uuid.uuid4(), U1, "/bs/templates/x/jammy.template")
    assert isinstance(command, DownloadCommand)
    assert (command.sha256Sum, command.md5Sum) == (SHA, None)
    # As stored in the op table and re-sent from there.
    assert command.model_dump(mode="json")["sha256Sum"] == SHA


def test_without_an_expected_sha256_the_command_has_none() -> None:
    image = new_image(expected_sha256=None)
    source = Source(OpKind.download, url=image.url)
    command = _command(image, source, uuid.uuid4(), U1, "/bs/templates/x/jammy.template")
    assert isinstance(command, DownloadCommand) and command.sha256Sum is None


# --- the inventory, the query, the schema ---------------------------------------------------


def inventory_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "uuid": U1,
        "name": "jammy",
        "description": None,
        "state": "Enabled",
        "status": "Ready",
        "size": 1,
        "actual_size": 1,
        "virtual_size": 1,
        "url": "https://cloud-images.example.com/jammy.img",
        "media_type": "RootVolumeTemplate",
        "guest_os_type": None,
        "platform": "Linux",
        "system": False,
        "format": "qcow2",
        "md5_sum": "0" * 32,
        "sha256_sum": SHA,
        "type": "zstack",
        "refs": [],
        "created_iso": "2024-01-01T00:00:00.000000Z",
        "last_op_iso": "2024-01-01T00:00:00.000000Z",
    }
    row.update(overrides)
    return row


def test_the_inventory_has_sha256_beside_md5() -> None:
    inventory = image_inventory(inventory_row())
    assert (inventory["md5Sum"], inventory["sha256Sum"]) == ("0" * 32, SHA)
    assert list(inventory).index("sha256Sum") == list(inventory).index("md5Sum") + 1


def test_an_unknown_sha256_is_null_in_the_inventory() -> None:
    assert image_inventory(inventory_row(sha256_sum=None))["sha256Sum"] is None


def test_sha256_is_a_text_field_of_queries_like_md5() -> None:
    column = IMAGE.columns["sha256Sum"]
    assert (column.sql, column.kind) == ("sha256_sum", Kind.TEXT)
    assert IMAGE.columns["md5Sum"].kind is Kind.TEXT


def test_migration_4_adds_both_columns_with_named_checks() -> None:
    migration = available_migrations()[3]
    assert (migration.version, migration.name) == (4, "sha256")
    sql = migration.sql
    for column, constraint in (
        ("sha256_sum", "image_sha256_sum_hex"),
        ("expected_sha256", "image_expected_sha256_hex"),
    ):
        assert f"ADD COLUMN IF NOT EXISTS {column} text" in sql
        assert f"CONSTRAINT {constraint}" in sql


def test_agent_checksums_refuse_a_trailing_newline() -> None:
    """`$` matches before a final newline: the agent's checksum fields must not."""
    from image_service.protocol.agent import check_hex32, check_hex64

    for check, length in ((check_hex32, 32), (check_hex64, 64)):
        check("a" * length)
        with pytest.raises(ValueError):
            check("a" * length + "\n")
