"""Contract section 9, end to end: AddImage's optional `sha256Sum`, checked by the agent beside
`md5Sum`, and the image inventory's `sha256Sum`, the real SHA-256 of the stored file."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from tests.conftest import Stack, wait_for
from tests.helpers import error_of, image_count, install_path, query_image

MiB = 1 << 20


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def query_by_sha256(stack: Stack, sha256: str) -> list[str]:
    reply = await stack.call(
        "QueryImage", {"conditions": [{"name": "sha256Sum", "op": "=", "value": sha256}]}
    )
    assert reply["success"], reply
    return [inventory["uuid"] for inventory in reply["inventories"]]


async def test_the_right_sha256_is_ready_and_queryable(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    data = os.urandom(300 * 1024)
    url, md5 = stack.http.add("jammy.raw", data)
    sha256 = sha256_of(data)

    reply = await stack.add_image(url, [bs], name="jammy", sha256Sum=sha256)

    assert reply["success"], reply
    inventory = reply["inventory"]
    assert inventory["status"] == "Ready"
    assert (inventory["sha256Sum"], inventory["md5Sum"]) == (sha256, md5)
    stored = install_path(bs, inventory["uuid"], "jammy")
    assert sha256_of(stored.read_bytes()) == sha256
    assert await query_by_sha256(stack, sha256) == [inventory["uuid"]]
    queried = await query_image(stack, inventory["uuid"])
    assert queried is not None and queried["sha256Sum"] == sha256
    # What the service kept and sent: the expected checksum, in the image row and the command.
    assert (
        await stack.db.fetchval(
            "SELECT expected_sha256 FROM image WHERE uuid = $1", inventory["uuid"]
        )
        == sha256
    )
    command = await stack.db.fetchval(
        "SELECT command FROM op WHERE image_uuid = $1 AND kind = 'download'", inventory["uuid"]
    )
    command = json.loads(command) if isinstance(command, str) else command
    assert command["sha256Sum"] == sha256


async def test_an_uppercase_sha256_is_the_same_checksum(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    data = os.urandom(100 * 1024)
    url, _ = stack.http.add("upper.raw", data)
    sha256 = sha256_of(data)

    reply = await stack.add_image(url, [bs], name="upper", sha256Sum=sha256.upper())

    assert reply["success"], reply
    assert reply["inventory"]["sha256Sum"] == sha256
    assert await query_by_sha256(stack, sha256) == [reply["inventory"]["uuid"]]


async def test_a_wrong_sha256_is_a_checksum_mismatch_and_leaves_nothing(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    data = os.urandom(300 * 1024)
    url, md5 = stack.http.add("wrong.raw", data)
    wrong = sha256_of(b"something else")
    assert wrong != sha256_of(data)

    # The right md5 beside it: the sha256 alone must refuse the file.
    reply = await stack.add_image(url, [bs], name="wrong", md5Sum=md5, sha256Sum=wrong)

    error = error_of(reply)
    assert error["code"] == "CHECKSUM_MISMATCH", reply
    assert await image_count(stack) == 0
    assert await query_by_sha256(stack, wrong) == []
    templates = bs.root / "templates"
    left = [p for p in templates.rglob("*") if p.is_file()] if templates.exists() else []
    assert left == [], left
    assert bs.files() == []


async def test_without_a_sha256_the_inventory_has_the_files_real_one(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    data = os.urandom(200 * 1024)
    url, md5 = stack.http.add("plain.raw", data)

    reply = await stack.add_image(url, [bs], name="plain")

    assert reply["success"], reply
    inventory = reply["inventory"]
    assert inventory["status"] == "Ready"
    assert (inventory["sha256Sum"], inventory["md5Sum"]) == (sha256_of(data), md5)
    assert (
        await stack.db.fetchval(
            "SELECT expected_sha256 FROM image WHERE uuid = $1", inventory["uuid"]
        )
        is None
    )
    assert await query_by_sha256(stack, sha256_of(data)) == [inventory["uuid"]]


async def test_a_malformed_sha256_is_an_invalid_argument(stack: Stack) -> None:
    """Refused by the service before any agent is asked (no agent side needed)."""
    bs = await stack.start_agent("bs1")
    url, _ = stack.http.add("bad.raw", os.urandom(16 * 1024))
    for bad in ("z" * 64, "0" * 63, "0" * 65, hashlib.md5(b"x").hexdigest(), 42):
        reply = await stack.add_image(url, [bs], name="bad", sha256Sum=bad)
        error = error_of(reply)
        assert error["code"] == "INVALID_ARGUMENT", reply
        assert "sha256Sum" in error["details"], reply
    assert await image_count(stack) == 0
    assert bs.files() == []


async def test_a_template_has_the_sha256_of_its_stored_file(stack: Stack, tmp_path: Path) -> None:
    """The agent computes the sha256 of a created file too (no expected one: templates take
    no checksum), and the template's inventory carries it."""
    volumes = tmp_path / "vols"
    volumes.mkdir()
    disk = volumes / "disk.raw"
    payload = os.urandom(MiB) + bytes(3 * MiB)
    disk.write_bytes(payload)
    bs = await stack.start_agent("bs1", "--volume-root", str(volumes))
    volume = uuid.uuid4().hex
    await stack.publish_event(
        f"volume.created.{volume}",
        {
            "uuid": volume,
            "name": "root",
            "type": "Root",
            "vmInstanceUuid": uuid.uuid4().hex,
            "primaryStorageUuid": uuid.uuid4().hex,
            "installPath": f"file://{disk}",
            "format": "raw",
            "size": len(payload),
        },
    )

    async def known() -> bool:
        row = await stack.db.fetchrow("SELECT deleted FROM volume WHERE uuid = $1", volume)
        return row is not None and not row["deleted"]

    await wait_for(known, timeout=10)

    reply = await stack.call(
        "CreateRootVolumeTemplateFromRootVolume",
        {"name": "tpl", "rootVolumeUuid": volume, "backupStorageUuids": [bs.uuid]},
    )

    assert reply["success"], reply
    inventory = reply["inventory"]
    stored = install_path(bs, inventory["uuid"], "tpl").read_bytes()
    assert stored == payload
    assert inventory["sha256Sum"] == sha256_of(payload)
    assert (
        await stack.db.fetchval(
            "SELECT expected_sha256 FROM image WHERE uuid = $1", inventory["uuid"]
        )
        is None
    )
