"""Fault tolerance through real processes: SIGKILL and SIGTERM of the service and of agents,
two service replicas on the same queues, duplicate message ids, re-sent agent commands and
garbage on the service's internal queues.

Replies are received on a reply queue of the test's own (`Replies`) that records every
message, so that a second reply to one correlation id is seen rather than silently dropped.
No test sleeps: each waits for the condition it then checks, or (to show that something does
not happen) for a positive marker that the system has moved on past it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue

from image_service.protocol.client import ApiClient
from tests.conftest import AMQP_URL, Agent, EventRecorder, Stack, wait_for
from tests.helpers import (
    assert_serving,
    heartbeats_handled,
    install_path,
    md5_of,
    outbox_empty,
    pending_ops,
    publish,
    queue_counts,
    wait_disconnected,
    wait_no_files,
    wait_no_pending_ops,
)

MIB = 1 << 20
# A download of this many bytes at this rate takes ~4 s: long enough to break things mid-way.
SLOW_SIZE = 8 * MIB
SLOW_RATE = 2_000_000


# --- helpers -----------------------------------------------------------------------------


class Replies:
    """A reply queue of our own that records every reply it receives, in order."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.received: list[tuple[str | None, dict[str, Any]]] = []
        self.connection: AbstractConnection | None = None
        self.queue: AbstractQueue | None = None

    async def open(self) -> None:
        self.connection = await aio_pika.connect(AMQP_URL)
        channel = await self.connection.channel()
        self.queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self.queue.consume(self._on_message, no_ack=True)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.received.append((message.correlation_id, json.loads(message.body)))

    @property
    def name(self) -> str:
        assert self.queue is not None
        return self.queue.name

    async def send(self, api: str, params: dict[str, Any], *, message_id: str | None = None) -> str:
        """Publish one API call; returns its message id (= its correlation id)."""
        message_id = message_id or uuid.uuid4().hex
        await self.stack.client.publish_raw(
            json.dumps({"api": api, "params": params}).encode(),
            message_id=message_id,
            reply_to=self.name,
        )
        return message_id

    def of(self, correlation_id: str) -> list[dict[str, Any]]:
        return [body for cid, body in self.received if cid == correlation_id]

    async def reply(self, correlation_id: str, timeout: float = 30.0) -> dict[str, Any]:
        async def first() -> dict[str, Any] | None:
            found = self.of(correlation_id)
            return found[0] if found else None

        result: dict[str, Any] = await wait_for(first, timeout, interval=0.05)
        return result

    async def call(self, api: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return await self.reply(await self.send(api, params), timeout)

    async def settled(self) -> None:
        """Until every reply the service has decided so far has reached this queue. Once the
        outbox is empty the relay has published what was committed (in order, confirmed); a
        marker call answered through the outbox after that (an error reply of a write API,
        like the calls under test) is queued behind all of them, and behind the replies to any
        message the broker redelivered before it."""
        await wait_for(lambda: outbox_empty(self.stack), timeout=30)
        marker = await self.call(
            "ChangeImageState", {"uuid": uuid.uuid4().hex, "stateEvent": "disable"}
        )
        assert marker["error"]["code"] == "RESOURCE_NOT_FOUND", marker

    async def assert_each_once(self, correlation_ids: list[str]) -> None:
        """Every id has exactly one reply, counted once every reply is in (`settled`)."""
        await self.settled()
        counts = {cid: len(self.of(cid)) for cid in correlation_ids}
        assert all(n == 1 for n in counts.values()), {c: n for c, n in counts.items() if n != 1}


@pytest_asyncio.fixture
async def replies(stack: Stack) -> AsyncIterator[Replies]:
    recorder = Replies(stack)
    await recorder.open()
    try:
        yield recorder
    finally:
        await recorder.close()


def add_image_params(
    url: str, agents: list[Agent], name: str = "image", **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "url": url,
        "format": "raw",
        "backupStorageUuids": [a.uuid for a in agents],
        **extra,
    }


def slow_url(stack: Stack, name: str, data: bytes, rate: int = SLOW_RATE) -> str:
    stack.http.add(name, data)
    return stack.http.url(f"slow/{name}?rate={rate}")


async def image_status(stack: Stack, image_uuid: str) -> str | None:
    row = await stack.image_row(image_uuid)
    return None if row is None else str(row["status"])


async def wait_downloading(stack: Stack, agent: Agent, image_uuid: str) -> None:
    """Until the image is Downloading and the agent has opened its partial file (it writes in
    chunks of several MiB, so the file may stay empty for a while)."""

    async def started() -> bool:
        if await image_status(stack, image_uuid) != "Downloading":
            return False
        partial = agent.root / ".agent" / "partial"
        return any(partial.glob("*"))

    await wait_for(started, timeout=10, interval=0.05)


async def refs(stack: Stack, image_uuid: str) -> list[tuple[str, str, str]]:
    rows = await stack.db.fetch(
        "SELECT backup_storage_uuid, status::text, install_path FROM image_backup_storage_ref"
        " WHERE image_uuid = $1 ORDER BY backup_storage_uuid",
        image_uuid,
    )
    return [(r["backup_storage_uuid"], r["status"], r["install_path"]) for r in rows]


async def assert_consumers_attached(stack: Stack, replicas: int = 1) -> None:
    names = stack.names
    for queue in (names.api, names.results, names.heartbeats):
        _, consumers = await queue_counts(queue)
        assert consumers >= replicas, f"{queue} has {consumers} consumers"


def assert_ready_reply(
    reply: dict[str, Any], image_uuid: str, md5: str, agents: list[Agent]
) -> None:
    assert reply["success"], reply
    inv = reply["inventory"]
    assert (inv["uuid"], inv["status"], inv["md5Sum"]) == (image_uuid, "Ready", md5)
    assert sorted(r["backupStorageUuid"] for r in inv["backupStorageRefs"]) == sorted(
        a.uuid for a in agents
    )
    assert all(r["status"] == "Ready" for r in inv["backupStorageRefs"])


async def assert_ready_in_db(
    stack: Stack, image_uuid: str, name: str, md5: str, agents: list[Agent]
) -> None:
    row = await stack.image_row(image_uuid)
    assert row is not None
    assert (row["status"], row["md5_sum"]) == ("Ready", md5)
    expected = sorted((a.uuid, "Ready", str(install_path(a, image_uuid, name))) for a in agents)
    assert await refs(stack, image_uuid) == expected
    for agent in agents:
        assert md5_of(install_path(agent, image_uuid, name)) == md5
        assert agent.files() == [install_path(agent, image_uuid, name)]


# --- 1. the service is SIGKILLed during a download -----------------------------------------


@pytest.mark.parametrize("restart", ["after_download", "during_download"])
async def test_service_killed_during_download_replies_to_original_caller(
    stack: Stack, replies: Replies, restart: str
) -> None:
    """`after_download`: the agent's result waits in the durable queue while the service is
    dead. `during_download`: the service is away for longer than three heartbeat intervals
    and comes back while the agent is still downloading."""
    agent = await stack.start_agent("bs1")
    data = os.urandom(SLOW_SIZE)
    md5 = hashlib.md5(data).hexdigest()
    image_uuid = uuid.uuid4().hex
    url = slow_url(stack, "big.raw", data)
    progress = EventRecorder()  # the agent reports progress straight to NS.events, once a second
    await stack.client.subscribe([f"image.progress.{image_uuid}"], progress)
    message_id = await replies.send(
        "AddImage", add_image_params(url, [agent], "big", resourceUuid=image_uuid)
    )
    await wait_downloading(stack, agent, image_uuid)

    stack.services[0].kill()
    reports_before = len(progress.events)
    final = install_path(agent, image_uuid, "big")
    if restart == "after_download":
        # The agent stores the file, then publishes its result: it waits in the durable queue.
        async def result_queued() -> bool:
            return final.exists() and (await queue_counts(stack.names.results))[0] >= 1

        await wait_for(result_queued, timeout=15)
    else:
        # Away for longer than three heartbeat intervals (1.5 s): three more progress reports,
        # at least a second apart, span two seconds of the agent's download.
        async def reported_three_times() -> bool:
            return len(progress.events) >= reports_before + 3

        await wait_for(reported_three_times, timeout=10)
        assert not final.exists(), "the download should still be running"
    assert replies.of(message_id) == []

    stack.restart(stack.services[0])
    reply = await replies.reply(message_id, timeout=20)
    assert_ready_reply(reply, image_uuid, md5, [agent])
    await replies.assert_each_once([message_id])
    assert await stack.db.fetchval("SELECT count(*) FROM image") == 1
    await assert_ready_in_db(stack, image_uuid, "big", md5, [agent])
    assert await pending_ops(stack) == 0
    assert stack.http.hits["big.raw"] == 1


# --- 2. an agent is SIGKILLed during a download and restarted at once ---------------------


async def test_agent_killed_and_restarted_during_download_is_consistent(
    stack: Stack, replies: Replies
) -> None:
    agent = await stack.start_agent("bs1")
    data = os.urandom(SLOW_SIZE)
    md5 = hashlib.md5(data).hexdigest()
    image_uuid = uuid.uuid4().hex
    url = slow_url(stack, "big.raw", data)
    message_id = await replies.send(
        "AddImage", add_image_params(url, [agent], "big", resourceUuid=image_uuid)
    )
    await wait_downloading(stack, agent, image_uuid)

    agent.proc.kill()
    stack.restart(agent.proc)
    reply = await replies.reply(message_id, timeout=20)
    await stack.wait_connected(agent)

    if reply["success"]:
        # Resumed from the journal: Ready, with the right bytes and nothing partial left.
        assert_ready_reply(reply, image_uuid, md5, [agent])
        await assert_ready_in_db(stack, image_uuid, "big", md5, [agent])
    else:
        # Declared Disconnected first: a clean failure, and the agent removes what it wrote.
        error = reply["error"]
        assert error["code"] == "DOWNLOAD_FAILED", reply
        assert [c["backupStorageUuid"] for c in error["causes"]] == [agent.uuid], reply
        assert await stack.image_row(image_uuid) is None
        assert await refs(stack, image_uuid) == []
        await wait_no_files(agent, timeout=15)
    await wait_no_pending_ops(stack)
    await replies.assert_each_once([message_id])
    # Whatever happened, the outcome is final: nothing changes afterwards.
    assert await image_status(stack, image_uuid) == ("Ready" if reply["success"] else None)
    if not reply["success"]:
        assert agent.files() == []


# --- 3. an agent is killed for good during a download -------------------------------------


async def test_agent_killed_for_good_fails_the_download_and_cleans_up_on_return(
    stack: Stack, replies: Replies
) -> None:
    agent = await stack.start_agent("bs1")
    data = os.urandom(SLOW_SIZE)
    image_uuid = uuid.uuid4().hex
    url = slow_url(stack, "big.raw", data)
    message_id = await replies.send(
        "AddImage", add_image_params(url, [agent], "big", resourceUuid=image_uuid)
    )
    await wait_downloading(stack, agent, image_uuid)

    agent.proc.kill()
    killed_at = time.monotonic()
    assert agent.files(), "the partial download should be on disk"

    await wait_disconnected(stack, agent, timeout=6)
    assert time.monotonic() - killed_at < 5
    reply = await replies.reply(message_id, timeout=5)
    assert not reply["success"], reply
    error = reply["error"]
    assert error["code"] == "DOWNLOAD_FAILED", reply
    assert [c["backupStorageUuid"] for c in error["causes"]] == [agent.uuid], reply
    assert await stack.image_row(image_uuid) is None
    assert await refs(stack, image_uuid) == []
    assert agent.files(), "nobody may have removed the dead agent's partial file yet"

    stack.restart(agent.proc)
    await stack.wait_connected(agent)
    await wait_no_files(agent, timeout=15)
    await wait_no_pending_ops(stack)
    await replies.assert_each_once([message_id])
    assert await stack.image_row(image_uuid) is None


# --- 4. two replicas on the same queues -------------------------------------------------


async def test_two_replicas_concurrent_adds_and_changes_keep_invariants(
    stack: Stack, replies: Replies
) -> None:
    stack.start_service()
    bs1 = await stack.start_agent("bs1")
    bs2 = await stack.start_agent("bs2")

    async def both_consuming() -> bool:
        return (await queue_counts(stack.names.api))[1] == 2

    await wait_for(both_consuming, timeout=20)

    images: list[tuple[str, str, str]] = []  # (uuid, file name, md5)
    add_ids: list[str] = []
    for i in range(20):
        data = os.urandom(512 * 1024 + i)
        name = f"img{i}.raw"
        url = slow_url(stack, name, data, rate=1_000_000)
        image_uuid = uuid.uuid4().hex
        images.append((image_uuid, name, hashlib.md5(data).hexdigest()))
        add_ids.append(
            await replies.send(
                "AddImage", add_image_params(url, [bs1, bs2], f"img{i}", resourceUuid=image_uuid)
            )
        )

    async def all_inserted() -> bool:
        uuids = [u for u, _, _ in images]
        return await stack.db.fetchval(
            "SELECT count(*) FROM image WHERE uuid = ANY($1::text[])", uuids
        ) == len(uuids)

    await wait_for(all_inserted, timeout=15, interval=0.05)
    # While the downloads run: 5 images disabled and renamed concurrently (10 calls).
    change_ids: list[str] = []
    for i in range(5):
        image_uuid = images[i][0]
        change_ids.append(
            await replies.send("ChangeImageState", {"uuid": image_uuid, "stateEvent": "disable"})
        )
        change_ids.append(
            await replies.send(
                "UpdateImage", {"uuid": image_uuid, "name": f"renamed{i}", "description": "d"}
            )
        )

    for message_id in change_ids:
        reply = await replies.reply(message_id, timeout=20)
        assert reply["success"], reply
    for message_id, (image_uuid, _, md5) in zip(add_ids, images, strict=True):
        reply = await replies.reply(message_id, timeout=30)
        assert_ready_reply(reply, image_uuid, md5, [bs1, bs2])
    await replies.assert_each_once(add_ids + change_ids)

    rows = await stack.db.fetch("SELECT uuid, status::text, state::text, name FROM image")
    assert len(rows) == 20
    by_uuid = {r["uuid"]: r for r in rows}
    for i, (image_uuid, name, md5) in enumerate(images):
        row = by_uuid[image_uuid]
        assert row["status"] == "Ready"
        if i < 5:
            assert (row["state"], row["name"]) == ("Disabled", f"renamed{i}")
        else:
            assert (row["state"], row["name"]) == ("Enabled", f"img{i}")
        image_refs = await refs(stack, image_uuid)
        assert [(bs, status) for bs, status, _ in image_refs] == sorted(
            [(bs1.uuid, "Ready"), (bs2.uuid, "Ready")]
        )
        for agent in (bs1, bs2):
            assert md5_of(install_path(agent, image_uuid, f"img{i}")) == md5
        assert stack.http.hits[name] == 2, (name, stack.http.hits[name])
    duplicates = await stack.db.fetchval(
        "SELECT count(*) FROM (SELECT image_uuid, backup_storage_uuid"
        " FROM image_backup_storage_ref GROUP BY 1, 2 HAVING count(*) > 1) d"
    )
    assert duplicates == 0
    assert await pending_ops(stack) == 0
    assert len(bs1.files()) == len(bs2.files()) == 20

    await wait_for(lambda: outbox_empty(stack), timeout=10)
    assert all(proc.running for proc in stack.services)
    await assert_consumers_attached(stack, replicas=2)


# --- 5. the same message id twice --------------------------------------------------------


async def test_duplicate_message_id_runs_once_and_every_caller_gets_the_reply(
    stack: Stack,
) -> None:
    agent = await stack.start_agent("bs1")
    data = os.urandom(4 * MIB)
    md5 = hashlib.md5(data).hexdigest()
    image_uuid = uuid.uuid4().hex
    url = slow_url(stack, "dup.raw", data)
    params = add_image_params(url, [agent], "dup", resourceUuid=image_uuid)
    message_id = uuid.uuid4().hex
    second = ApiClient(AMQP_URL, stack.names)
    await second.connect()
    try:
        first_call = asyncio.create_task(
            stack.client.call("AddImage", params, message_id=message_id, timeout=30)
        )
        await wait_downloading(stack, agent, image_uuid)
        second_call = asyncio.create_task(
            second.call("AddImage", params, message_id=message_id, timeout=30)
        )
        first_reply, second_reply = await asyncio.gather(first_call, second_call)
        assert_ready_reply(first_reply, image_uuid, md5, [agent])
        assert second_reply == first_reply

        # After completion: the stored reply, no second execution.
        third_reply = await second.call("AddImage", params, message_id=message_id, timeout=15)
        assert third_reply == first_reply
    finally:
        await second.close()
    assert await stack.db.fetchval("SELECT count(*) FROM image") == 1
    assert await stack.db.fetchval("SELECT count(*) FROM op WHERE kind = 'download'") == 1
    assert stack.http.hits["dup.raw"] == 1
    await assert_ready_in_db(stack, image_uuid, "dup", md5, [agent])


# --- 6. SIGTERM -------------------------------------------------------------------------


async def test_sigterm_idle_exits_promptly_and_during_download_resumes(
    stack: Stack, replies: Replies
) -> None:
    agent = await stack.start_agent("bs1")
    service = stack.services[0]
    started = time.monotonic()
    code = await asyncio.to_thread(service.terminate, 10)
    assert code == 0, service.log()[-2000:]
    assert time.monotonic() - started < 10

    stack.restart(service)
    await assert_serving(stack)
    await stack.wait_connected(agent)

    data = os.urandom(SLOW_SIZE)
    md5 = hashlib.md5(data).hexdigest()
    image_uuid = uuid.uuid4().hex
    url = slow_url(stack, "big.raw", data)
    message_id = await replies.send(
        "AddImage", add_image_params(url, [agent], "big", resourceUuid=image_uuid)
    )
    await wait_downloading(stack, agent, image_uuid)
    started = time.monotonic()
    code = await asyncio.to_thread(service.terminate, 10)
    assert code == 0, service.log()[-2000:]
    assert time.monotonic() - started < 10
    assert replies.of(message_id) == []

    stack.restart(service)
    reply = await replies.reply(message_id, timeout=20)
    assert_ready_reply(reply, image_uuid, md5, [agent])
    await replies.assert_each_once([message_id])
    await assert_ready_in_db(stack, image_uuid, "big", md5, [agent])
    assert await pending_ops(stack) == 0
    await assert_consumers_attached(stack)


# --- 7. agents are idempotent per op id ---------------------------------------------------


async def test_resent_download_command_is_not_run_again(stack: Stack) -> None:
    agent = await stack.start_agent("bs1")
    url, md5 = stack.http.add("small.raw", os.urandom(256 * 1024))
    reply = await stack.add_image(url, [agent], name="small")
    assert reply["success"], reply
    image_uuid = reply["inventory"]["uuid"]
    before = await refs(stack, image_uuid)
    hits = stack.http.hits["small.raw"]
    assert hits == 1

    row = await stack.db.fetchrow("SELECT op_id, command FROM op WHERE kind = 'download'")
    command = row["command"]
    body = command.encode() if isinstance(command, str) else json.dumps(command).encode()
    op_id = str(row["op_id"])
    await publish(
        stack.names.agent(agent.uuid),
        body,
        message_id=op_id,
        content_type="application/json",
    )

    # The agent answers from its journal: the service sees a second result for a finished op.
    async def answered() -> bool:
        return f"stale result for op {op_id}" in stack.services[0].log()

    await wait_for(answered, timeout=10)
    # Nothing more comes of it: let the agent and the service go on for a few heartbeats.
    await heartbeats_handled(stack, agent, 2)
    assert stack.http.hits["small.raw"] == hits
    assert await image_status(stack, image_uuid) == "Ready"
    assert await refs(stack, image_uuid) == before
    await assert_ready_in_db(stack, image_uuid, "small", md5, [agent])
    assert await pending_ops(stack) == 0


# --- 8. garbage on the internal queues ---------------------------------------------------


async def test_malformed_results_and_heartbeats_are_dropped(stack: Stack) -> None:
    agent = await stack.start_agent("bs1")
    names = stack.names
    hex32 = uuid.uuid4().hex
    garbage = [
        b"not json at all",
        b"\xff\xfe\x00\x01",
        b"[1, 2, 3]",
        b"{}",
        json.dumps({"opId": "not-a-uuid", "backupStorageUuid": hex32, "success": True}).encode(),
        json.dumps(
            {"opId": str(uuid.uuid4()), "backupStorageUuid": agent.uuid, "success": True}
        ).encode(),
        json.dumps({"opId": str(uuid.uuid4()), "backupStorageUuid": "xyz", "success": 1}).encode(),
    ]
    bad_beats = [
        b"not json at all",
        b"\xff\xfe\x00\x01",
        b"null",
        json.dumps({"uuid": "not-hex", "name": "x", "url": "/", "hostname": "h"}).encode(),
        json.dumps(
            {
                "uuid": agent.uuid,
                "name": "bs1",
                "url": "/",
                "hostname": "h",
                "totalCapacity": -1,
                "availableCapacity": -1,
            }
        ).encode(),
    ]
    for body in garbage:
        await publish(names.results, body, message_id=uuid.uuid4().hex)
    for body in bad_beats:
        await publish(names.heartbeats, body)

    # Each one is logged as dropped once handled (or, were it retried, as requeued).
    async def handled() -> bool:
        lines = stack.services[0].log().splitlines()
        results = sum("result" in line and "dropped" in line for line in lines)
        beats = sum("malformed heartbeat dropped" in line for line in lines)
        requeued = any("requeueing" in line for line in lines)
        return requeued or (results >= len(garbage) and beats >= len(bad_beats))

    await wait_for(handled, timeout=10)
    # Dropped, not retried until dead-lettered, and the real agent is still Connected.
    assert (await queue_counts(names.dead_letters))[0] == 0
    assert "requeueing" not in stack.services[0].log()
    assert stack.services[0].running
    assert await stack.bs_status(agent.uuid, "Connected") is not None
    row = await stack.db.fetchrow("SELECT * FROM backup_storage WHERE uuid = $1", agent.uuid)
    assert row["total_capacity"] >= 0 and row["name"] == "bs1"

    url, md5 = stack.http.add("after.raw", os.urandom(128 * 1024))
    reply = await stack.add_image(url, [agent], name="after")
    assert reply["success"], reply
    assert reply["inventory"]["md5Sum"] == md5
    await assert_consumers_attached(stack)


# --- 9. the consumers survive everything above ---------------------------------------------


async def test_consumers_stay_attached_after_bad_messages_and_a_crash(
    stack: Stack, replies: Replies
) -> None:
    names = stack.names
    # Bad API messages of every kind, one without reply_to and one without message_id.
    bad_ids = []
    for body in (b"not json", b"[]", b'{"api": 5}', b'{"api": "NoSuchApi", "params": {}}'):
        message_id = uuid.uuid4().hex
        await stack.client.publish_raw(body, message_id=message_id, reply_to=replies.name)
        bad_ids.append(message_id)
    await stack.client.publish_raw(b"garbage", message_id=uuid.uuid4().hex, reply_to=None)
    await stack.client.publish_raw(
        b"garbage", message_id=None, reply_to=replies.name, correlation_id="no-message-id"
    )
    await publish(names.results, b"garbage")
    await publish(names.heartbeats, b"garbage")
    for message_id in bad_ids:
        reply = await replies.reply(message_id, timeout=10)
        assert not reply["success"], reply
        assert reply["error"]["code"] in ("MALFORMED_MESSAGE", "UNKNOWN_API"), reply
    reply = await replies.reply("no-message-id", timeout=10)
    assert reply["error"]["code"] == "MALFORMED_MESSAGE", reply
    await assert_consumers_attached(stack)

    # A crash and a restart: the new process attaches again, the old consumers are gone.
    stack.services[0].kill()
    stack.restart(stack.services[0])

    async def attached_once() -> bool:
        counts = [(await queue_counts(q))[1] for q in (names.api, names.results, names.heartbeats)]
        return counts == [1, 1, 1]

    await wait_for(attached_once, timeout=20)
    await assert_serving(stack)
    # The restart replays nothing: each bad message got exactly one reply.
    await replies.assert_each_once([*bad_ids, "no-message-id"])
    _, consumers = await queue_counts(names.api)
    assert consumers >= 1
