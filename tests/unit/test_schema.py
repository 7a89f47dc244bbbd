"""The published schema (docs/schema/) is what the models say, and the models are what the
service sends."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from image_service.api.config import config_inventory
from image_service.inventory import backup_storage_inventory, image_inventory, user_tag_inventory
from image_service.portal.accounts import Session
from image_service.protocol.inventories import (
    BackupStorageInventory,
    GlobalConfigInventory,
    ImageInventory,
    SessionInventory,
    UserTagInventory,
)
from image_service.schema import DEFAULT_DIRECTORY, differences, documents

NOW = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)
U1, U2 = "a" * 32, "b" * 32


def test_docs_schema_matches_the_models() -> None:
    problems = differences(DEFAULT_DIRECTORY)
    assert problems == [], "run: python -m image_service.schema\n" + "\n".join(problems)


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_the_asyncapi_document_points_at_files_that_exist() -> None:
    files = documents()
    asyncapi = files["asyncapi.json"]
    assert asyncapi["asyncapi"] == "3.0.0"
    external = [r for r in _refs(asyncapi) if not r.startswith("#")]
    assert external, "the channels name their payloads"
    assert sorted(set(external) - set(files)) == []
    for channel in asyncapi["channels"].values():
        names = set(re.findall(r"{(\w+)}", channel["address"]))
        assert names == set(channel.get("parameters", {})), channel["address"]
    for ref in (r for r in _refs(asyncapi) if r.startswith("#/channels/")):
        assert ref.removeprefix("#/channels/") in asyncapi["channels"]


def test_the_service_inventories_fit_their_models() -> None:
    ref = {
        "imageUuid": U1,
        "backupStorageUuid": U2,
        "installPath": "/store/templates/x/image.qcow2",
        "status": "Ready",
        "createDate": "2026-12-01T04:00:00.000000Z",
        "lastOpDate": "2026-12-01T04:00:00.000000Z",
    }
    image = image_inventory(
        {
            "uuid": U1,
            "name": "CentOS7",
            "description": None,
            "state": "Enabled",
            "status": "Ready",
            "size": 1,
            "actual_size": 1,
            "virtual_size": 2,
            "url": "http://x/y",
            "media_type": "RootVolumeTemplate",
            "guest_os_type": None,
            "platform": "Linux",
            "system": False,
            "format": "qcow2",
            "md5_sum": "c" * 32,
            "sha256_sum": None,
            "type": "zstack",
            "refs": [ref],
            "created_iso": "2026-12-01T04:00:00.000000Z",
            "last_op_iso": "2026-12-01T04:00:00.000000Z",
        }
    )
    ImageInventory.model_validate(image)
    assert list(image) == list(ImageInventory.model_fields)
    bs = backup_storage_inventory(
        {
            "uuid": U2,
            "name": "bs",
            "description": None,
            "url": "/store",
            "hostname": "h",
            "type": "LocalDirectory",
            "state": "Enabled",
            "status": "Connected",
            "total_capacity": 10,
            "available_capacity": 5,
            "create_date": NOW,
            "last_op_date": NOW,
        }
    )
    BackupStorageInventory.model_validate(bs)
    assert list(bs) == list(BackupStorageInventory.model_fields)
    tag = user_tag_inventory(
        {
            "uuid": U1,
            "resource_type": "ImageVO",
            "resource_uuid": U2,
            "tag": "golden",
            "type": "User",
            "create_date": NOW,
            "last_op_date": NOW,
        }
    )
    UserTagInventory.model_validate(tag)
    config = config_inventory(
        {
            "category": "image",
            "name": "deletionPolicy",
            "value": "Delay",
            "default_value": "Direct",
            "description": "d",
        }
    )
    GlobalConfigInventory.model_validate(config)
    session = Session(U1, U2, NOW, NOW).inventory()
    SessionInventory.model_validate(session)
    assert list(session) == list(SessionInventory.model_fields)
