"""The agent's messages as the protocol defines them: hostile commands on an agent's queue are
validated with the protocol's model, dropped with a log line that names what is wrong, and
change nothing on disk; a result that claims a success without its file fails its op."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import Agent, Stack
from tests.helpers import (
    add_ready,
    error_of,
    md5_of,
    publish,
    publish_result,
    wait_for,
    wait_no_files,
)


def snapshot(root: Path) -> list[str]:
    """Every path under the agent's root but its identity: templates, partials, journal."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "identity.json")


async def test_invalid_commands_are_dropped_with_a_reason_and_change_nothing(stack: Stack) -> None:
    agent = await stack.start_agent("bs1")
    url, _ = stack.http.add("bait.raw", os.urandom(64 * 1024))
    before = snapshot(agent.root)
    op = str(uuid.uuid4())
    base = {
        "command": "download",
        "opId": op,
        "imageUuid": uuid.uuid4().hex,
        "backupStorageUuid": agent.uuid,
        "url": url,
        "format": "raw",
        "installPath": f"{agent.root}/templates/x/x.template",
    }
    invalid = {
        b"not json": "Invalid JSON",
        b"[1, 2]": "Input should be an object",
        json.dumps(
            {**base, "command": "format-disk"}
        ).encode(): "'format-disk' found using 'command'",
        json.dumps(
            {**base, "opId": "../../../etc/passwd"}
        ).encode(): "download.opId: must be a UUID",
        json.dumps({**base, "format": "vmdk"}).encode(): "download.format: Input should be",
        json.dumps({**base, "md5Sum": 12345}).encode(): "download.md5Sum: Input should be",
        json.dumps(
            {**base, "installPath": "/x\u0000y"}
        ).encode(): "installPath: must not contain NUL",
        json.dumps({k: v for k, v in base.items() if k != "url"}).encode(): "url: Field required",
        json.dumps({**base, "command": "delete", "cancelOpIds": ["nope"]}).encode(): (
            "delete.cancelOpIds.0: must be a UUID"
        ),
    }
    queue = stack.names.agent(agent.uuid)
    for body in invalid:
        await publish(queue, body, message_id=uuid.uuid4().hex)
    # Valid, but for another backup storage: not this agent's to run.
    other = {**base, "opId": str(uuid.uuid4()), "backupStorageUuid": uuid.uuid4().hex}
    await publish(queue, json.dumps(other).encode(), message_id=uuid.uuid4().hex)

    async def all_logged() -> bool:
        log = agent.proc.log()
        return log.count("invalid command dropped") == len(invalid) and "dropped: this is" in log

    await wait_for(all_logged, timeout=20)
    log = agent.proc.log()
    for reason in invalid.values():
        assert reason in log, reason
    assert snapshot(agent.root) == before
    assert stack.http.hits.get("bait.raw", 0) == 0
    assert agent.proc.running and "Traceback" not in log

    reply = await stack.add_image(url, [agent], name="after")
    assert reply["success"], reply
    assert stack.http.hits["bait.raw"] == 1


async def slow_add(stack: Stack, agent: Agent) -> tuple[asyncio.Task[dict[str, Any]], str]:
    """An AddImage whose download takes seconds, and the id of its Pending op."""
    stack.http.add("slow.raw", os.urandom(4 * 2**20))
    task = asyncio.create_task(
        stack.add_image(stack.http.url(f"slow/slow.raw?rate={2**19}"), [agent], name="slow")
    )

    async def pending_op() -> str | None:
        op_id = await stack.db.fetchval("SELECT op_id FROM op WHERE status = 'Pending'")
        return str(op_id) if op_id else None

    return task, await wait_for(pending_op, timeout=10)


async def test_a_success_that_names_no_file_fails_its_op_and_answers_the_caller(
    stack: Stack,
) -> None:
    """Such a result would come again at every re-send of the command: the op fails at once
    (OPERATION_ERROR) instead of holding its caller until the backup storage disconnects."""
    agent = await stack.start_agent("bs1")
    task, op_id = await slow_add(stack, agent)
    body = {"opId": op_id, "backupStorageUuid": agent.uuid, "success": True}
    await publish_result(stack.names, agent.uuid, json.dumps(body).encode(), message_id=op_id)
    reply = await asyncio.wait_for(task, 30)
    assert error_of(reply)["code"] == "OPERATION_ERROR", reply
    assert error_of(reply)["details"] == "the agent reported success without the stored file"
    assert await stack.db.fetchval("SELECT count(*) FROM image") == 0
    await wait_no_files(agent)


async def test_the_agent_never_overwrites_or_removes_another_images_file(stack: Stack) -> None:
    """Agent hygiene (contract section 8), even for commands that pass as the service's: a
    command touches only its own image's directory, and a download never replaces the file that
    another finished op stored. Only a delete naming the image removes it."""
    agent = await stack.start_agent("bs1")
    ready = await add_ready(stack, [agent], name="golden")
    path = Path(ready["backupStorageRefs"][0]["installPath"])
    md5 = md5_of(path)
    url, _ = stack.http.add("evil.raw", b"evil bytes" * 1000)
    queue = stack.names.agent(agent.uuid)
    commands = {
        # Another image's id, aiming at the golden image's file.
        "download into another image's directory": {
            "command": "download", "url": url, "format": "raw",
            "imageUuid": uuid.uuid4().hex, "installPath": str(path),
        },
        # The golden image's own id, but a new op: the file is another op's.
        "download over a stored file": {
            "command": "download", "url": url, "format": "raw",
            "imageUuid": ready["uuid"], "installPath": str(path),
        },
        "delete naming another image": {
            "command": "delete", "imageUuid": uuid.uuid4().hex, "installPath": str(path),
        },
    }  # fmt: skip
    ops = {}
    for name, command in commands.items():
        op_id = str(uuid.uuid4())
        ops[name] = op_id
        body = {**command, "opId": op_id, "backupStorageUuid": agent.uuid}
        await publish(queue, json.dumps(body).encode(), message_id=op_id)

    journal = agent.root / ".agent" / "ops"

    def result_of(op_id: str) -> dict[str, object] | None:
        path = journal / f"{op_id}.json"
        result = json.loads(path.read_text())["result"] if path.exists() else None
        return result if isinstance(result, dict) else None

    async def all_answered() -> bool:
        return all(result_of(op) is not None for op in ops.values())

    await wait_for(all_answered, timeout=20)
    results: dict[str, Any] = {name: result_of(op) for name, op in ops.items()}
    assert results["download into another image's directory"]["code"] == "INVALID_ARGUMENT"
    assert (
        "not in the directory of image"
        in results["download into another image's directory"]["details"]
    )
    assert results["download over a stored file"]["code"] == "OPERATION_ERROR"
    assert "already holds a stored image" in results["download over a stored file"]["details"]
    assert path.exists() and md5_of(path) == md5, "the golden image is untouched"
    assert "not in the directory of image" in agent.proc.log()  # the refused delete
    assert stack.http.hits.get("evil.raw", 0) <= 1  # fetched at most once, never stored

    # The image's own delete, through the service, still removes it.
    reply = await stack.call("DeleteImage", {"uuid": ready["uuid"]})
    assert reply["success"], reply
    await wait_no_files(agent)


async def test_a_result_that_names_another_path_fails_its_op_and_records_nothing(
    stack: Stack,
) -> None:
    """A result from the right agent is applied only with the installPath its command named."""
    agent = await stack.start_agent("bs1")
    task, op_id = await slow_add(stack, agent)
    body = {
        "opId": op_id, "backupStorageUuid": agent.uuid, "success": True,
        "installPath": "/etc/passwd", "size": 1, "actualSize": 1, "virtualSize": 2**40,
        "md5Sum": "0" * 32, "format": "raw",
    }  # fmt: skip
    await publish_result(stack.names, agent.uuid, json.dumps(body).encode(), message_id=op_id)
    reply = await asyncio.wait_for(task, 30)
    assert error_of(reply)["code"] == "OPERATION_ERROR", reply
    paths = await stack.db.fetch("SELECT install_path FROM image_backup_storage_ref")
    assert all(row[0] != "/etc/passwd" for row in paths)
    assert await stack.db.fetchval("SELECT count(*) FROM image") == 0
    await wait_no_files(agent)
