"""The image lifecycle through the real broker, database, service and agent processes
(contract §2-4 and §7): AddImage and its failures, state and update, delete in both modes,
queries and events."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.conftest import Agent, EventRecorder, Stack, wait_for
from tests.helpers import (
    BARRIER_BINDING,
    add_ready,
    closed_port,
    error_of,
    events_delivered,
    heartbeats_handled,
    image_count,
    md5_of,
    pending_ops,
    qemu_info,
    query_image,
    wait_disconnected,
    wait_no_files,
)

IMAGE_FIELDS = {
    "uuid",
    "name",
    "description",
    "state",
    "status",
    "size",
    "actualSize",
    "virtualSize",
    "url",
    "mediaType",
    "guestOsType",
    "platform",
    "system",
    "format",
    "md5Sum",
    "type",
    "backupStorageRefs",
    "createDate",
    "lastOpDate",
}
REF_FIELDS = {"imageUuid", "backupStorageUuid", "installPath", "status", "createDate", "lastOpDate"}
UUID_RE = re.compile(r"^[0-9a-f]{32}$")


# --- helpers ------------------------------------------------------------------------------


def iso_bytes(size: int = 64 * 1024) -> bytes:
    """A minimal ISO 9660 look-alike: 'CD001' at offset 0x8001."""
    data = bytes(0x8001) + b"CD001"
    return data + bytes(size - len(data))


class StallingServer:
    """An HTTP server that promises `size` bytes, sends 1 KiB, then nothing until closed
    (the fixture's /stall route would hold the test's teardown for a minute)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.port = 0
        self._server: asyncio.Server | None = None
        self._release = asyncio.Event()
        self.requests = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + f"Content-Length: {self.size}\r\n\r\n".encode()
                + bytes(1024)
            )
            await writer.drain()
            await self._release.wait()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stall.raw"

    async def __aenter__(self) -> StallingServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def parse_date(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0, value
    return parsed


async def query_images(stack: Stack, **equals: Any) -> list[dict[str, Any]]:
    conditions = [{"name": k, "op": "=", "value": v} for k, v in equals.items()]
    reply = await stack.call("QueryImage", {"conditions": conditions})
    assert reply["success"], reply
    inventories: list[dict[str, Any]] = reply["inventories"]
    return inventories


# --- AddImage ----------------------------------------------------------------------------


async def test_add_image_defaults_and_full_inventory(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    data = os.urandom(300 * 1024 + 17)
    url, md5 = stack.http.add("disk.raw", data)
    reply = await stack.call(
        "AddImage",
        {"name": "disk", "url": url, "format": "raw", "backupStorageUuids": [bs.uuid]},
    )
    assert reply["success"] is True and reply["api"] == "AddImage", reply
    inv = reply["inventory"]
    assert set(inv) >= IMAGE_FIELDS, IMAGE_FIELDS - set(inv)
    assert UUID_RE.match(inv["uuid"])
    assert inv["name"] == "disk"
    assert inv["url"] == url
    assert (inv["mediaType"], inv["platform"], inv["system"], inv["type"]) == (
        "RootVolumeTemplate",
        "Linux",
        False,
        "zstack",
    )
    assert (inv["state"], inv["status"], inv["format"]) == ("Enabled", "Ready", "raw")
    assert inv["md5Sum"] == md5 == hashlib.md5(data).hexdigest()
    assert inv["size"] == len(data)
    virtual_size = qemu_info(stack.http.directory / "disk.raw", "raw")["virtual-size"]
    assert inv["virtualSize"] == virtual_size
    assert isinstance(inv["actualSize"], int) and inv["actualSize"] > 0
    assert parse_date(inv["createDate"]) <= parse_date(inv["lastOpDate"])

    assert len(inv["backupStorageRefs"]) == 1
    ref = inv["backupStorageRefs"][0]
    assert set(ref) >= REF_FIELDS, REF_FIELDS - set(ref)
    assert ref["imageUuid"] == inv["uuid"]
    assert ref["backupStorageUuid"] == bs.uuid
    assert ref["status"] == "Ready"
    parse_date(ref["createDate"])
    parse_date(ref["lastOpDate"])
    expected_path = bs.root / "templates" / inv["uuid"] / "disk.template"
    assert Path(ref["installPath"]).resolve() == expected_path.resolve()
    assert expected_path.is_file()
    assert expected_path.read_bytes() == data
    assert bs.files() == [expected_path]

    # The same inventory through QueryImage and a row in the database.
    assert await query_image(stack, inv["uuid"]) == inv
    row = await stack.image_row(inv["uuid"])
    assert row is not None


async def test_resource_uuid_honoured_and_duplicate_refused(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    wanted = uuid.uuid4().hex
    url, md5 = stack.http.add("a.raw", os.urandom(64 * 1024))
    reply = await stack.add_image(url, [bs], name="first", resourceUuid=wanted)
    assert reply["success"], reply
    assert reply["inventory"]["uuid"] == wanted
    before = await query_image(stack, wanted)
    assert before is not None and before["name"] == "first"

    url2, _ = stack.http.add("b.raw", os.urandom(32 * 1024))
    reply = await stack.add_image(url2, [bs], name="second", resourceUuid=wanted)
    error = error_of(reply)
    assert error["code"] == "INVALID_ARGUMENT", reply
    assert "resourceUuid" in error["details"], reply
    assert await query_image(stack, wanted) == before
    assert await image_count(stack) == 1
    assert len(bs.files()) == 1
    assert md5_of(bs.files()[0]) == md5


async def test_partial_success_lists_only_successful_backup_storage(stack: Stack) -> None:
    big = await stack.start_agent("big")
    small = await stack.start_agent("small", "--capacity", "1000")
    url, md5 = stack.http.add("five.raw", os.urandom(5 * 2**20))
    reply = await stack.add_image(url, [big, small], name="five")
    assert reply["success"] is True, reply
    inv = reply["inventory"]
    assert inv["status"] == "Ready" and inv["md5Sum"] == md5
    assert [r["backupStorageUuid"] for r in inv["backupStorageRefs"]] == [big.uuid]
    causes = reply.get("causes")
    assert causes and [c["backupStorageUuid"] for c in causes] == [small.uuid], reply
    assert causes[0]["code"] == "CAPACITY_EXCEEDED", reply
    assert len(big.files()) == 1
    assert small.files() == []
    queried = await query_image(stack, inv["uuid"])
    assert queried is not None
    assert [r["backupStorageUuid"] for r in queried["backupStorageRefs"]] == [big.uuid]


async def test_all_backup_storages_fail_leaves_nothing(stack: Stack) -> None:
    bs1 = await stack.start_agent("bs1")
    bs2 = await stack.start_agent("bs2")
    reply = await stack.add_image(stack.http.url("files/missing.raw"), [bs1, bs2], name="gone")
    error = error_of(reply)
    assert error["code"] == "OPERATION_ERROR", reply
    causes = error["causes"]
    assert sorted(c["backupStorageUuid"] for c in causes) == sorted([bs1.uuid, bs2.uuid])
    assert all(c["code"] == "DOWNLOAD_FAILED" for c in causes), causes
    assert await image_count(stack) == 0
    assert await query_images(stack) == []
    assert bs1.files() == [] and bs2.files() == []


async def test_md5_mismatch_is_refused_and_removed(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, md5 = stack.http.add("sum.raw", os.urandom(200 * 1024))
    wrong = hashlib.md5(b"something else").hexdigest()
    assert wrong != md5
    reply = await stack.add_image(url, [bs], name="sum", md5Sum=wrong)
    error = error_of(reply)
    assert error["code"] == "CHECKSUM_MISMATCH", reply
    assert await image_count(stack) == 0
    assert bs.files() == []


async def test_md5_given_and_right_is_ready(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, md5 = stack.http.add("sum.raw", os.urandom(200 * 1024))
    reply = await stack.add_image(url, [bs], name="sum", md5Sum=md5)
    assert reply["success"], reply
    assert reply["inventory"]["status"] == "Ready"
    assert reply["inventory"]["md5Sum"] == md5
    assert len(bs.files()) == 1


async def test_longest_multibyte_name_fits_the_file_system(stack: Stack) -> None:
    """255 characters of three UTF-8 bytes each: the image keeps its name, the file name is
    cut to fit the 255-byte limit of the file system, and deletion still finds the file."""
    bs = await stack.start_agent("bs1")
    name = "镜" * 255
    url, md5 = stack.http.add("long.raw", os.urandom(64 * 1024))
    reply = await stack.add_image(url, [bs], name=name)
    assert reply["success"], reply
    inventory = reply["inventory"]
    assert inventory["name"] == name and inventory["md5Sum"] == md5
    (path,) = bs.files()
    assert len(path.name.encode()) <= 255 and path.name.endswith(".template")
    assert inventory["backupStorageRefs"][0]["installPath"] == str(path)
    reply = await stack.call("DeleteImage", {"uuid": inventory["uuid"]})
    assert reply["success"], reply
    assert bs.files() == []


async def _assert_unsafe(stack: Stack, bs: Agent, url: str, fmt: str) -> None:
    reply = await stack.add_image(url, [bs], name="unsafe", format=fmt)
    error = error_of(reply)
    assert error["code"] == "UNSAFE_IMAGE", reply
    assert await image_count(stack) == 0
    assert bs.files() == []


async def test_qcow2_declared_raw_is_unsafe(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, _ = stack.http.add_qcow2("real.qcow2", "16M")
    await _assert_unsafe(stack, bs, url, "raw")


async def test_random_bytes_declared_qcow2_is_unsafe(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, _ = stack.http.add("noise.qcow2", os.urandom(256 * 1024))
    await _assert_unsafe(stack, bs, url, "qcow2")


async def test_qcow2_with_backing_file_is_unsafe(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    www = stack.http.directory
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(www / "base.qcow2"), "16M"], check=True
    )
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            str(www / "overlay.qcow2"),
        ],
        check=True,
        cwd=www,
    )
    await _assert_unsafe(stack, bs, stack.http.url("files/overlay.qcow2"), "qcow2")


async def test_iso_image_is_ready_with_format_iso(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    data = iso_bytes()
    url, md5 = stack.http.add("cd.iso", data)
    reply = await stack.call(
        "AddImage",
        {"name": "cd", "url": url, "mediaType": "ISO", "backupStorageUuids": [bs.uuid]},
    )
    assert reply["success"], reply
    inv = reply["inventory"]
    assert (inv["mediaType"], inv["format"], inv["status"]) == ("ISO", "iso", "Ready")
    assert inv["md5Sum"] == md5 and inv["size"] == len(data)
    assert len(bs.files()) == 1


async def test_iso_cannot_be_system(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, _ = stack.http.add("cd.iso", iso_bytes())
    reply = await stack.call(
        "AddImage",
        {
            "name": "cd",
            "url": url,
            "mediaType": "ISO",
            "system": True,
            "backupStorageUuids": [bs.uuid],
        },
    )
    error = error_of(reply)
    assert error["code"] == "INVALID_ARGUMENT", reply
    assert "system" in error["details"], reply
    assert await image_count(stack) == 0
    assert stack.http.hits.get("cd.iso", 0) == 0
    assert bs.files() == []


async def _assert_download_failed(stack: Stack, bs: Agent, url: str) -> None:
    started = time.monotonic()
    reply = await stack.add_image(url, [bs], name="broken")
    elapsed = time.monotonic() - started
    error = error_of(reply)
    assert error["code"] == "DOWNLOAD_FAILED", reply
    assert elapsed < 30, elapsed
    assert await image_count(stack) == 0
    assert bs.files() == []


async def test_truncated_body_is_download_failed(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    stack.http.add("half.raw", os.urandom(3 * 2**20))
    await _assert_download_failed(stack, bs, stack.http.url("truncated/half.raw"))


async def test_stalled_server_is_download_failed(stack: Stack) -> None:
    # One retry is enough to show that a stall is not retried for ever (each costs the 3 s
    # stall timeout; the default four made this the slowest test of the suite).
    bs = await stack.start_agent("bs1", "--download-retries", "1")
    async with StallingServer(2**20) as server:
        await _assert_download_failed(stack, bs, server.url())
        assert server.requests >= 1


async def test_connection_refused_is_download_failed(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    await _assert_download_failed(stack, bs, f"http://127.0.0.1:{closed_port()}/files/nothing.img")


async def test_disabled_and_disconnected_backup_storages_are_skipped(stack: Stack) -> None:
    good = await stack.start_agent("good")
    disabled = await stack.start_agent("disabled")
    lost = await stack.start_agent("lost")
    reply = await stack.call(
        "ChangeBackupStorageState", {"uuid": disabled.uuid, "stateEvent": "disable"}
    )
    assert reply["success"] and reply["inventory"]["state"] == "Disabled", reply
    lost.proc.kill()
    await wait_disconnected(stack, lost)

    url, _ = stack.http.add("skip.raw", os.urandom(64 * 1024))
    reply = await stack.add_image(url, [good, disabled, lost], name="skip")
    assert reply["success"], reply
    inv = reply["inventory"]
    assert [r["backupStorageUuid"] for r in inv["backupStorageRefs"]] == [good.uuid]
    causes = {c["backupStorageUuid"]: c for c in reply.get("causes") or []}
    assert set(causes) == {disabled.uuid, lost.uuid}, reply
    assert all(c["code"] and c["details"] for c in causes.values()), causes
    assert disabled.files() == [] and lost.files() == []

    # None of the named ones usable: NO_BACKUP_STORAGE, nothing created.
    reply = await stack.add_image(url, [disabled, lost], name="nowhere")
    error = error_of(reply)
    assert error["code"] == "NO_BACKUP_STORAGE", reply
    assert await image_count(stack) == 1
    assert await query_images(stack, name="nowhere") == []
    assert disabled.files() == [] and lost.files() == []


async def test_downloading_status_is_visible_then_ready(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    stack.http.add("slow.raw", os.urandom(3 * 2**20))
    url = stack.http.url(f"slow/slow.raw?rate={2**20}")
    task = asyncio.create_task(stack.add_image(url, [bs], name="slow"))

    async def downloading() -> dict[str, Any] | None:
        found = await query_images(stack, name="slow")
        return found[0] if found and found[0]["status"] == "Downloading" else None

    seen = await wait_for(downloading, timeout=10, interval=0.05)
    assert [r["status"] for r in seen["backupStorageRefs"]] == ["Downloading"]
    assert [r["backupStorageUuid"] for r in seen["backupStorageRefs"]] == [bs.uuid]
    assert not task.done()
    reply = await asyncio.wait_for(task, 30)
    assert reply["success"], reply
    ready = await query_image(stack, seen["uuid"])
    assert ready is not None and ready["status"] == "Ready"
    assert [r["status"] for r in ready["backupStorageRefs"]] == ["Ready"]


# --- state and update ----------------------------------------------------------------------


async def test_change_image_state_disable_enable(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    inv = await add_ready(stack, [bs])
    reply = await stack.call("ChangeImageState", {"uuid": inv["uuid"], "stateEvent": "disable"})
    assert reply["success"] and reply["inventory"]["state"] == "Disabled", reply
    assert (await query_image(stack, inv["uuid"]))["state"] == "Disabled"
    assert (await stack.image_row(inv["uuid"]))["state"] == "Disabled"
    reply = await stack.call("ChangeImageState", {"uuid": inv["uuid"], "stateEvent": "enable"})
    assert reply["success"] and reply["inventory"]["state"] == "Enabled", reply
    assert (await query_image(stack, inv["uuid"]))["state"] == "Enabled"


async def test_update_image_fields(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    inv = await add_ready(stack, [bs], name="old")
    changes = {
        "name": "new-name",
        "description": "a description",
        "guestOsType": "CentOS 7",
        "platform": "Windows",
        "system": True,
    }
    reply = await stack.call("UpdateImage", {"uuid": inv["uuid"], **changes})
    assert reply["success"], reply
    for key, value in changes.items():
        assert reply["inventory"][key] == value, (key, reply)
    queried = await query_image(stack, inv["uuid"])
    assert queried is not None
    for key, value in changes.items():
        assert queried[key] == value, (key, queried)
    assert queried["md5Sum"] == inv["md5Sum"] and queried["status"] == "Ready"


async def test_update_qcow2_to_iso_is_refused(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, _ = stack.http.add_qcow2("q.qcow2", "16M")
    reply = await stack.add_image(url, [bs], name="q", format="qcow2")
    assert reply["success"], reply
    image_uuid = reply["inventory"]["uuid"]
    reply = await stack.call("UpdateImage", {"uuid": image_uuid, "mediaType": "ISO"})
    error = error_of(reply)
    assert error["code"] == "INVALID_ARGUMENT", reply
    assert "mediaType" in error["details"], reply
    queried = await query_image(stack, image_uuid)
    assert queried is not None
    assert (queried["mediaType"], queried["format"]) == ("RootVolumeTemplate", "qcow2")


# --- delete -------------------------------------------------------------------------------


async def test_delete_from_one_then_the_rest(stack: Stack) -> None:
    bs1 = await stack.start_agent("bs1")
    bs2 = await stack.start_agent("bs2")
    inv = await add_ready(stack, [bs1, bs2])
    assert len(bs1.files()) == 1 and len(bs2.files()) == 1

    reply = await stack.call(
        "DeleteImage",
        {"uuid": inv["uuid"], "backupStorageUuids": [bs1.uuid], "deleteMode": "Permissive"},
    )
    assert reply["success"], reply
    assert [r["backupStorageUuid"] for r in reply["inventory"]["backupStorageRefs"]] == [bs2.uuid]
    assert bs1.files() == [] and len(bs2.files()) == 1
    queried = await query_image(stack, inv["uuid"])
    assert queried is not None
    assert [r["backupStorageUuid"] for r in queried["backupStorageRefs"]] == [bs2.uuid]

    reply = await stack.call("DeleteImage", {"uuid": inv["uuid"], "deleteMode": "Enforcing"})
    assert reply["success"] and "inventory" not in reply, reply
    assert await query_image(stack, inv["uuid"]) is None
    assert await stack.image_row(inv["uuid"]) is None
    assert bs1.files() == [] and bs2.files() == []


async def _start_slow_add(stack: Stack, bs: Agent, size: int, rate: int):
    stack.http.add("slow.raw", os.urandom(size))
    url = stack.http.url(f"slow/slow.raw?rate={rate}")
    task = asyncio.create_task(stack.add_image(url, [bs], name="slow"))

    async def downloading() -> dict[str, Any] | None:
        found = await query_images(stack, name="slow")
        return found[0] if found and found[0]["status"] == "Downloading" else None

    inv: dict[str, Any] = await wait_for(downloading, timeout=10, interval=0.05)
    return task, inv


async def test_permissive_delete_of_downloading_image_is_refused(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    task, inv = await _start_slow_add(stack, bs, 2 * 2**20, 2**20)
    reply = await stack.call("DeleteImage", {"uuid": inv["uuid"], "deleteMode": "Permissive"})
    error = error_of(reply)
    assert error["code"] == "INVALID_STATE", reply
    # The download was not disturbed.
    added = await asyncio.wait_for(task, 30)
    assert added["success"], added
    assert added["inventory"]["status"] == "Ready"
    assert len(bs.files()) == 1


async def test_enforcing_delete_cancels_download(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    task, inv = await _start_slow_add(stack, bs, 8 * 2**20, 2**20)
    op_id = await stack.db.fetchval(
        "SELECT op_id FROM op WHERE image_uuid = $1 AND kind = 'download'", inv["uuid"]
    )
    reply = await stack.call("DeleteImage", {"uuid": inv["uuid"], "deleteMode": "Enforcing"})
    assert reply["success"], reply
    added = await asyncio.wait_for(task, 15)
    assert added["success"] is False, added
    assert await query_image(stack, inv["uuid"]) is None
    assert await stack.image_row(inv["uuid"]) is None
    await wait_no_files(bs, timeout=10)

    # And it stays that way: the cancelled download does not come back. The agent's download
    # ends with a result the service no longer wants; once that has arrived, and whatever it
    # led to is done, nothing of the download is left to run.
    async def download_over() -> bool:
        stale = f"stale result for op {op_id}" in stack.services[0].log()
        return stale and bs.files() == [] and await pending_ops(stack) == 0

    await wait_for(download_over, timeout=15)
    assert bs.files() == []
    assert await image_count(stack) == 0


async def _image_on_two_with_one_lost(stack: Stack) -> tuple[Agent, Agent, dict[str, Any]]:
    bs1 = await stack.start_agent("bs1")
    bs2 = await stack.start_agent("bs2")
    inv = await add_ready(stack, [bs1, bs2])
    bs2.proc.kill()
    await wait_disconnected(stack, bs2)
    return bs1, bs2, inv


async def test_permissive_delete_with_disconnected_holder_is_refused(stack: Stack) -> None:
    bs1, bs2, inv = await _image_on_two_with_one_lost(stack)
    reply = await stack.call("DeleteImage", {"uuid": inv["uuid"], "deleteMode": "Permissive"})
    error = error_of(reply)
    assert error["code"] == "INVALID_STATE", reply
    queried = await query_image(stack, inv["uuid"])
    assert queried is not None
    assert len(queried["backupStorageRefs"]) == 2
    assert len(bs1.files()) == 1 and len(bs2.files()) == 1


async def test_enforcing_delete_with_disconnected_holder_cleans_up_on_return(
    stack: Stack,
) -> None:
    bs1, bs2, inv = await _image_on_two_with_one_lost(stack)
    reply = await stack.call("DeleteImage", {"uuid": inv["uuid"], "deleteMode": "Enforcing"})
    assert reply["success"], reply
    assert await query_image(stack, inv["uuid"]) is None
    assert await stack.image_row(inv["uuid"]) is None
    assert bs1.files() == []
    assert len(bs2.files()) == 1  # the agent is away: its file waits for it
    stack.restart(bs2.proc)
    await stack.wait_connected(bs2)
    await wait_no_files(bs2, timeout=15)


async def test_delete_nonexistent_image_succeeds(stack: Stack) -> None:
    reply = await stack.call("DeleteImage", {"uuid": uuid.uuid4().hex})
    assert reply["success"] is True, reply
    reply = await stack.call("DeleteImage", {"uuid": uuid.uuid4().hex, "deleteMode": "Enforcing"})
    assert reply["success"] is True, reply


# --- queries ------------------------------------------------------------------------------


async def test_query_image_equality_and_count(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    user = await add_ready(stack, [bs], name="user")
    system = await add_ready(stack, [bs], name="sys", system=True)
    other = await add_ready(stack, [bs], name="other")

    found = await query_images(stack, uuid=user["uuid"])
    assert [i["uuid"] for i in found] == [user["uuid"]]
    found = await query_images(stack, status="Ready", system=False)
    assert sorted(i["uuid"] for i in found) == sorted([user["uuid"], other["uuid"]])
    found = await query_images(stack, status="Ready", system=True)
    assert [i["uuid"] for i in found] == [system["uuid"]]
    assert await query_images(stack, status="Downloading") == []

    reply = await stack.call("QueryImage", {"conditions": [], "count": True})
    assert reply["success"] and reply["total"] == 3, reply
    assert not reply.get("inventories"), reply
    reply = await stack.call(
        "QueryImage",
        {
            "conditions": [{"name": "system", "op": "=", "value": False}],
            "replyWithCount": True,
            "limit": 1,
        },
    )
    assert reply["success"] and reply["total"] == 2, reply
    assert len(reply["inventories"]) == 1
    reply = await stack.call("QueryImage", {"conditions": []})
    assert reply["success"] and "total" not in reply, reply
    assert len(reply["inventories"]) == 3


async def test_query_backup_storage_capacity(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    reply = await stack.call(
        "QueryBackupStorage", {"conditions": [{"name": "uuid", "op": "=", "value": bs.uuid}]}
    )
    assert reply["success"], reply
    [inv] = reply["inventories"]
    assert inv["uuid"] == bs.uuid and inv["name"] == "bs1"
    assert inv["status"] == "Connected" and inv["state"] == "Enabled"
    assert Path(inv["url"]).resolve() == bs.root.resolve()
    assert inv["totalCapacity"] > 0 and inv["availableCapacity"] > 0
    assert inv["availableCapacity"] <= inv["totalCapacity"]
    usage = os.statvfs(bs.root)
    assert inv["totalCapacity"] == usage.f_blocks * usage.f_frsize


# --- events -------------------------------------------------------------------------------


async def test_image_events(stack: Stack, events_recorder) -> None:
    recorder: EventRecorder = events_recorder()
    await stack.client.subscribe(["image.#", "backupStorage.#"], recorder)
    bs = await stack.start_agent("bs1")
    data = os.urandom(3 * 2**20)
    stack.http.add("ev.raw", data)
    reply = await stack.add_image(stack.http.url(f"slow/ev.raw?rate={2**20}"), [bs], name="ev")
    assert reply["success"], reply
    image_uuid = reply["inventory"]["uuid"]

    async def statuses() -> list[dict[str, Any]] | None:
        found = recorder.of(f"image.status.{image_uuid}")
        return found if len(found) >= 2 else None

    found = await wait_for(statuses, timeout=10)
    assert [(e["oldStatus"], e["newStatus"]) for e in found][-1] == ("Downloading", "Ready")
    assert found[0]["newStatus"] == "Downloading"
    assert found[0]["uuid"] == image_uuid
    assert found[-1]["inventory"]["uuid"] == image_uuid
    assert found[-1]["inventory"]["status"] == "Ready"
    assert found[-1]["inventory"]["md5Sum"] == hashlib.md5(data).hexdigest()

    progress = recorder.of(f"image.progress.{image_uuid}")
    assert progress, recorder.keys()
    assert all(p["backupStorageUuid"] == bs.uuid for p in progress)
    assert all(p["totalBytes"] == len(data) for p in progress), progress
    done = [p["downloadedBytes"] for p in progress]
    assert done == sorted(done) and done[-1] == len(data), done
    assert any(0 < d < len(data) for d in done), done

    reply = await stack.call("ChangeImageState", {"uuid": image_uuid, "stateEvent": "disable"})
    assert reply["success"], reply
    state_events = await wait_for(lambda: _events(recorder, f"image.state.{image_uuid}"), 10)
    assert state_events[0]["uuid"] == image_uuid
    assert state_events[0]["inventory"]["state"] == "Disabled"

    reply = await stack.call("DeleteImage", {"uuid": image_uuid})
    assert reply["success"], reply
    deleted = await wait_for(lambda: _events(recorder, f"image.deleted.{image_uuid}"), 10)
    assert deleted[0]["uuid"] == image_uuid


async def _events(recorder: EventRecorder, key: str) -> list[dict[str, Any]]:
    return recorder.of(key)


async def test_backup_storage_status_events(stack: Stack, events_recorder) -> None:
    recorder: EventRecorder = events_recorder()
    await stack.client.subscribe(["image.#", "backupStorage.#", BARRIER_BINDING], recorder)
    bs = await stack.start_agent("bs1")
    key = f"backupStorage.status.{bs.uuid}"
    await wait_for(lambda: _events(recorder, key), 10)
    await heartbeats_handled(stack, bs, 3)  # a few steady heartbeats: no status change, no event
    bs.proc.kill()
    await wait_disconnected(stack, bs)
    stack.restart(bs.proc)
    await stack.wait_connected(bs)
    await heartbeats_handled(stack, bs, 3)  # steady again
    await events_delivered(stack, recorder)  # every event they caused has reached the recorder

    found = recorder.of(key)
    transitions = [(e["oldStatus"], e["newStatus"]) for e in found]
    assert len(found) == 3, transitions
    assert found[0]["newStatus"] == "Connected"
    assert found[0]["oldStatus"] in (None, "Connecting"), transitions
    assert transitions[1:] == [("Connected", "Disconnected"), ("Disconnected", "Connected")]
    assert all(e["uuid"] == bs.uuid for e in found)
    assert found[1]["inventory"]["status"] == "Disconnected"
    assert found[2]["inventory"]["status"] == "Connected"
