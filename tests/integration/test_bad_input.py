"""Bad messages through the real broker: each gets its error reply (contract §2), nothing is
created, and the service keeps serving. Also: messages without reply_to, and duplicates."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

from tests.conftest import Stack, wait_for
from tests.helpers import add_ready, assert_serving, error_of, image_count, query_image

# --- helpers ------------------------------------------------------------------------------


async def raw_call(
    stack: Stack,
    body: bytes,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    timeout: float = 15,
) -> dict[str, Any]:
    message_id = message_id or uuid.uuid4().hex
    future = stack.client.expect(correlation_id or message_id)
    await stack.client.publish_raw(
        body,
        message_id=message_id,
        reply_to=stack.client.reply_to,
        correlation_id=correlation_id,
    )
    return await asyncio.wait_for(future, timeout)


# --- the envelope -----------------------------------------------------------------------

MALFORMED_BODIES: list[bytes] = [
    b"this is not json",
    b"",
    b"\xff\xfe\x00garbage",
    b'{"api": "QueryImage", "params": {',
    b"[1, 2, 3]",
    b'["QueryImage", {}]',
    b"null",
    b'"QueryImage"',
    b"42",
    b'{"params": {}}',
    b'{"api": null, "params": {}}',
    b'{"api": 5, "params": {}}',
    b'{"api": "", "params": {}}',
    b'{"api": "QueryImage", "params": [1]}',
    b'{"api": "QueryImage", "params": "conditions"}',
    b'{"api": "QueryImage", "params": 7}',
]


async def test_malformed_messages(stack: Stack) -> None:
    wrong: list[tuple[bytes, Any]] = []
    for body in MALFORMED_BODIES:
        try:
            reply = await raw_call(stack, body)
        except TimeoutError:
            wrong.append((body, "no reply"))
        else:
            if reply.get("success") is not False or reply["error"]["code"] != "MALFORMED_MESSAGE":
                wrong.append((body, reply))
        await assert_serving(stack)
    assert wrong == []


async def test_unknown_api(stack: Stack) -> None:
    for name in ("FormatDisk", "addImage", "ADDIMAGE", "Add Image", "__init__"):
        reply = await raw_call(stack, json.dumps({"api": name, "params": {}}).encode())
        error = error_of(reply)
        assert error["code"] == "UNKNOWN_API", (name, reply)
        await assert_serving(stack)


async def test_correlation_id_is_honoured(stack: Stack) -> None:
    correlation = f"corr-{uuid.uuid4().hex}"
    reply = await raw_call(
        stack,
        json.dumps({"api": "QueryImage", "params": {}}).encode(),
        correlation_id=correlation,
    )
    assert reply["success"] is True and reply["api"] == "QueryImage", reply


# --- AddImage parameters ---------------------------------------------------------------


# An unsupported scheme may be answered with the contract's more specific URL_NOT_ALLOWED.
SCHEME_CASES = {"url ftp", "url file"}


def add_image_cases(bs_uuid: str) -> list[tuple[str, dict[str, Any], str]]:
    """(label, params, the field the details must name)."""
    long = "x" * 256
    return [
        ("missing name", {"name": None}, "name"),
        ("missing url", {"url": None}, "url"),
        ("missing backupStorageUuids", {"backupStorageUuids": None}, "backupStorageUuids"),
        ("unknown parameter", {"colour": "blue"}, "colour"),
        ("system as string", {"system": "yes"}, "system"),
        ("system as int", {"system": 1}, "system"),
        ("uuids as string", {"backupStorageUuids": "abc"}, "backupStorageUuids"),
        ("uuids as bare uuid", {"backupStorageUuids": bs_uuid}, "backupStorageUuids"),
        ("uuids empty", {"backupStorageUuids": []}, "backupStorageUuids"),
        ("name as int", {"name": 123}, "name"),
        ("name empty", {"name": ""}, "name"),
        ("mediaType Floppy", {"mediaType": "Floppy"}, "mediaType"),
        ("platform BeOS", {"platform": "BeOS"}, "platform"),
        ("format vmdk", {"format": "vmdk"}, "format"),
        ("type vmware", {"type": "vmware"}, "type"),
        ("name too long", {"name": long}, "name"),
        ("description too long", {"description": "d" * 3000}, "description"),
        ("guestOsType too long", {"guestOsType": "g" * 3000}, "guestOsType"),
        ("name with slash", {"name": "a/b"}, "name"),
        ("name escaping", {"name": "../../etc/passwd"}, "name"),
        ("name dotdot", {"name": ".."}, "name"),
        ("name dot", {"name": "."}, "name"),
        ("name with NUL", {"name": "a\x00b"}, "name"),
        ("name with backslash", {"name": "a\\b"}, "name"),
        ("name with newline", {"name": "a\nb"}, "name"),
        ("resourceUuid non-hex", {"resourceUuid": "z" * 32}, "resourceUuid"),
        ("resourceUuid uppercase", {"resourceUuid": uuid.uuid4().hex.upper()}, "resourceUuid"),
        ("resourceUuid dashed", {"resourceUuid": str(uuid.uuid4())}, "resourceUuid"),
        ("resourceUuid short", {"resourceUuid": "abc"}, "resourceUuid"),
        ("bs uuid uppercase", {"backupStorageUuids": [bs_uuid.upper()]}, "backupStorageUuids"),
        ("bs uuid non-hex", {"backupStorageUuids": ["g" * 32]}, "backupStorageUuids"),
        ("bs uuid duplicated", {"backupStorageUuids": [bs_uuid, bs_uuid]}, "backupStorageUuids"),
        ("url ftp", {"url": "ftp://127.0.0.1/image.raw"}, "url"),
        ("url file", {"url": "file:///etc/passwd"}, "url"),
        ("url not a url", {"url": "image.raw"}, "url"),
        ("url as list", {"url": ["http://127.0.0.1/x"]}, "url"),
        ("url with password", {"url": "sftp://u:secret@127.0.0.1/x.raw"}, "url"),
        ("http url with password", {"url": "http://u:secret@127.0.0.1/x.raw"}, "url"),
        ("md5Sum not hex", {"md5Sum": "not-an-md5"}, "md5Sum"),
        ("format missing", {"format": None}, "format"),
        ("format iso without ISO", {"format": "iso"}, "format"),
        ("ISO with qcow2", {"mediaType": "ISO", "format": "qcow2"}, "format"),
        ("ISO system", {"mediaType": "ISO", "format": None, "system": True}, "system"),
    ]


async def test_add_image_invalid_arguments_name_the_field(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, _ = stack.http.add("ok.raw", os.urandom(16 * 1024))
    base = {"name": "ok", "url": url, "format": "raw", "backupStorageUuids": [bs.uuid]}
    wrong: list[tuple[str, Any]] = []
    for label, change, field in add_image_cases(bs.uuid):
        params = {**base, **change}
        params = {k: v for k, v in params.items() if v is not None}
        try:
            reply = await stack.call("AddImage", params, timeout=15)
        except TimeoutError:
            wrong.append((label, "no reply"))
            continue
        error = reply.get("error") or {}
        codes = {"INVALID_ARGUMENT", "URL_NOT_ALLOWED"} if label in SCHEME_CASES else set()
        codes.add("INVALID_ARGUMENT")
        if reply.get("success") is not False or error.get("code") not in codes:
            wrong.append((label, reply))
        elif field not in (error.get("details") or ""):
            wrong.append((label, f"details do not name {field!r}: {error.get('details')!r}"))
        await assert_serving(stack)
    assert wrong == []
    assert await image_count(stack) == 0
    assert bs.files() == []
    assert stack.http.hits.get("ok.raw", 0) == 0


async def test_unknown_backup_storage_is_not_found(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, _ = stack.http.add("ok.raw", os.urandom(16 * 1024))
    missing = uuid.uuid4().hex
    reply = await stack.call(
        "AddImage",
        {"name": "ok", "url": url, "format": "raw", "backupStorageUuids": [missing]},
    )
    error = error_of(reply)
    assert error["code"] == "RESOURCE_NOT_FOUND", reply
    assert missing in error["details"], reply
    reply = await stack.call(
        "AddImage",
        {"name": "ok", "url": url, "format": "raw", "backupStorageUuids": [bs.uuid, missing]},
    )
    assert error_of(reply)["code"] == "RESOURCE_NOT_FOUND", reply
    assert await image_count(stack) == 0
    assert bs.files() == []
    await assert_serving(stack)


# --- other APIs ---------------------------------------------------------------------------


async def test_missing_image_is_not_found(stack: Stack) -> None:
    missing = uuid.uuid4().hex
    for api, params in [
        ("ChangeImageState", {"uuid": missing, "stateEvent": "disable"}),
        ("UpdateImage", {"uuid": missing, "name": "new"}),
    ]:
        reply = await stack.call(api, params)
        error = error_of(reply)
        assert error["code"] == "RESOURCE_NOT_FOUND", (api, reply)
        assert reply["api"] == api
        await assert_serving(stack)
    assert await image_count(stack) == 0


async def test_other_invalid_arguments(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    image = await add_ready(stack, [bs])
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("ChangeImageState", {"uuid": image["uuid"], "stateEvent": "toggle"}, "stateEvent"),
        ("ChangeImageState", {"uuid": image["uuid"]}, "stateEvent"),
        ("ChangeImageState", {"uuid": "x" * 32, "stateEvent": "disable"}, "uuid"),
        ("UpdateImage", {"uuid": image["uuid"], "name": "a/b"}, "name"),
        ("UpdateImage", {"uuid": image["uuid"], "platform": "BeOS"}, "platform"),
        ("UpdateImage", {"uuid": image["uuid"], "system": "no"}, "system"),
        ("UpdateImage", {"uuid": image["uuid"], "size": 1}, "size"),
        ("DeleteImage", {"uuid": image["uuid"], "deleteMode": "Gentle"}, "deleteMode"),
        ("DeleteImage", {"uuid": image["uuid"].upper()}, "uuid"),
        ("ChangeBackupStorageState", {"uuid": bs.uuid, "stateEvent": "off"}, "stateEvent"),
        ("QueryImage", {"conditions": [{"name": "nosuch", "op": "=", "value": 1}]}, "nosuch"),
        ("QueryImage", {"limit": "ten"}, "limit"),
    ]
    wrong: list[tuple[str, dict[str, Any], Any]] = []
    for api, params, field in cases:
        reply = await stack.call(api, params, timeout=15)
        error = reply.get("error") or {}
        if reply.get("success") is not False or error.get("code") != "INVALID_ARGUMENT":
            wrong.append((api, params, reply))
        elif field not in (error.get("details") or ""):
            wrong.append((api, params, f"details do not name {field!r}: {error['details']!r}"))
        await assert_serving(stack)
    assert wrong == []
    after = await query_image(stack, image["uuid"])
    assert after is not None
    assert (after["name"], after["state"], after["platform"], after["system"]) == (
        image["name"],
        "Enabled",
        "Linux",
        False,
    )
    assert len(bs.files()) == 1


# --- delivery semantics ---------------------------------------------------------------


async def test_message_without_reply_to_is_executed(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    image = await add_ready(stack, [bs])
    body = {"api": "ChangeImageState", "params": {"uuid": image["uuid"], "stateEvent": "disable"}}
    await stack.client.publish_raw(
        json.dumps(body).encode(), message_id=uuid.uuid4().hex, reply_to=None
    )

    async def disabled() -> bool:
        found = await query_image(stack, image["uuid"])
        return found is not None and found["state"] == "Disabled"

    await wait_for(disabled, timeout=10)
    # A bad message without reply_to does not stop the service either.
    await stack.client.publish_raw(b"not json", message_id=uuid.uuid4().hex, reply_to=None)
    await assert_serving(stack)


async def test_same_message_id_runs_once_and_replies_the_same(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    url, _ = stack.http.add("once.raw", os.urandom(64 * 1024))
    params = {"name": "once", "url": url, "format": "raw", "backupStorageUuids": [bs.uuid]}
    message_id = uuid.uuid4().hex
    first = await stack.call("AddImage", params, message_id=message_id)
    assert first["success"], first
    second = await stack.call("AddImage", params, message_id=message_id)
    assert second == first
    assert await image_count(stack) == 1
    assert len(bs.files()) == 1
    assert stack.http.hits["once.raw"] == 1

    # A failing message is not re-run either: same error reply.
    message_id = uuid.uuid4().hex
    first = await stack.call("UpdateImage", {"uuid": uuid.uuid4().hex}, message_id=message_id)
    second = await stack.call("UpdateImage", {"uuid": uuid.uuid4().hex}, message_id=message_id)
    assert error_of(first)["code"] == "RESOURCE_NOT_FOUND"
    assert second == first
    await assert_serving(stack)


async def test_duplicate_sent_while_running_gets_the_same_reply(stack: Stack) -> None:
    bs = await stack.start_agent("bs1")
    stack.http.add("dup.raw", os.urandom(2 * 2**20))
    url = stack.http.url(f"slow/dup.raw?rate={2**20}")
    body = json.dumps(
        {
            "api": "AddImage",
            "params": {"name": "dup", "url": url, "format": "raw", "backupStorageUuids": [bs.uuid]},
        }
    ).encode()
    message_id = uuid.uuid4().hex
    first = asyncio.create_task(raw_call(stack, body, message_id=message_id, timeout=30))

    async def running() -> bool:
        status: str | None = await stack.db.fetchval(
            "SELECT status::text FROM image WHERE name = 'dup'"
        )
        return status == "Downloading"

    await wait_for(running, timeout=15, interval=0.05)
    assert not first.done()
    second = await raw_call(
        stack, body, message_id=message_id, correlation_id=f"again-{message_id}", timeout=30
    )
    first_reply = await first
    assert first_reply["success"], first_reply
    assert second == first_reply
    assert await image_count(stack) == 1
    assert len(bs.files()) == 1
    assert stack.http.hits["dup.raw"] == 1
