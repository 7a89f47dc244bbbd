"""Replies reach their callers (contract section 8).

- Replies and events are published persistent: a caller that reads its replies from a durable
  queue loses none of them when the broker restarts. Shown with 100 concurrent AddImage and a
  restart of the broker in the middle; the broker is a private node of the test's own
  (tests/integration/tls_broker.py, plain port), so the machine's broker is never restarted.
- A reply whose reply_to cannot be delivered costs only that reply: 100 forged direct reply-to
  names (RabbitMQ closes the publishing connection for each) sent among 100 ordinary calls delay
  those calls by under 1 s at p99.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage

from image_service.protocol.client import ApiClient
from image_service.protocol.names import Names
from tests.conftest import AMQP_URL, FileServer, Stack, _drop_database, clone_database, wait_for
from tests.helpers import publish
from tests.integration.tls_broker import TlsBroker, tls_broker_fixture  # noqa: F401 (fixture)

CALLS = 100


@pytest_asyncio.fixture(loop_scope="session")
async def private_stack(
    tls_broker: TlsBroker, tmp_path: Path, template_database: str
) -> AsyncIterator[Stack]:
    """The service and one agent on the private node's plain port, as guest."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    url = tls_broker.amqp_url()
    dbname = f"images_{namespace}"
    database_url = await clone_database(template_database, dbname)
    http = FileServer(tmp_path / "www")
    http.directory.mkdir()
    await http.start()
    client = ApiClient(url, Names(namespace))
    stack = Stack(namespace, database_url, tmp_path, http, client, None)  # type: ignore[arg-type]
    try:
        stack.start_service("--amqp-url", url)
        stack.db = await asyncpg.connect(database_url)
        await client.connect()
        await wait_for(lambda: _consumed(url, stack.names.api), timeout=30)
        yield stack
    finally:
        await stack.stop_processes()
        with contextlib.suppress(Exception):
            await client.close()
        await http.stop()
        await _drop_database(dbname)


async def _consumed(url: str, queue_name: str) -> bool:
    with contextlib.suppress(Exception):
        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, passive=True)
            return bool(queue.declaration_result.consumer_count)
    return False


async def test_no_reply_is_lost_in_a_broker_restart_during_100_concurrent_add_image(
    private_stack: Stack, tls_broker: TlsBroker
) -> None:
    stack = private_stack
    url = tls_broker.amqp_url()
    # Heartbeats far enough apart that the restart does not make the agent Disconnected.
    agent = await stack.start_agent("bs0", "--amqp-url", url, "--heartbeat-interval", "5")
    sources = [stack.http.add(f"i{i}.raw", f"image {i} ".encode() * 2000) for i in range(CALLS)]

    # The caller's durable (classic) reply queue; the caller reads it only after the restart
    # (it was away, or slow): transient messages in it would die with the restart.
    caller = await aio_pika.connect_robust(url, reconnect_interval=0.5)
    try:
        channel = await caller.channel(publisher_confirms=True)
        reply_queue = await channel.declare_queue(f"{stack.namespace}.my-replies", durable=True)
        ids = [uuid.uuid4().hex for _ in range(CALLS)]
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        json.dumps(
                            {
                                "api": "AddImage",
                                "params": {
                                    "name": f"i{i}",
                                    "url": src,
                                    "format": "raw",
                                    "backupStorageUuids": [agent.uuid],
                                },
                            }
                        ).encode(),
                        message_id=ids[i],
                        reply_to=reply_queue.name,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=stack.names.api,
                    timeout=10,
                )
                for i, (src, _) in enumerate(sources)
            )
        )

        async def waiting(count: int) -> bool:
            return await _queued(url, reply_queue.name) >= count

        # Restart once some replies wait in the queue: those, and the ones published while
        # the broker is away (the outbox keeps them), must all be there afterwards.
        await wait_for(lambda: waiting(10), timeout=60, interval=0.02)
        await asyncio.to_thread(tls_broker.rabbitmqctl, "stop_app", timeout=60)
        await asyncio.sleep(1)
        await asyncio.to_thread(tls_broker.rabbitmqctl, "start_app", timeout=60)
        await wait_for(lambda: waiting(CALLS), timeout=120)

        replies: dict[str, dict[str, Any]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            replies[message.correlation_id or ""] = json.loads(message.body)
            await message.ack()

        channel = await caller.channel()
        queue = await channel.declare_queue(reply_queue.name, durable=True)
        await queue.consume(on_reply, no_ack=False)
        await wait_for(lambda: _async(len(replies) >= CALLS), timeout=30)
    finally:
        await caller.close()
    assert set(replies) == set(ids)
    failed = {k: v for k, v in replies.items() if not v.get("success")}
    assert not failed, failed
    assert await stack.db.fetchval("SELECT count(*) FROM image WHERE status = 'Ready'") == CALLS


async def _queued(url: str, queue_name: str) -> int:
    with contextlib.suppress(Exception):
        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, durable=True, passive=True)
            return int(queue.declaration_result.message_count or 0)
    return 0


async def _async(value: bool) -> bool:
    return value


def unknown_node_name() -> str:
    """A direct reply-to name that reads as one (an Erlang pid term) but names a node alias the
    broker does not know: only a publish can tell, and RabbitMQ 3.10 answers it by closing the
    connection."""
    node = f"reply@{uuid.uuid4().int % 10**9}".encode()
    term = bytes([131, 88, 119, len(node)]) + node + bytes(12)
    return f"amq.rabbitmq.reply-to.{base64.b64encode(term).decode()}.{uuid.uuid4().hex}"


async def test_a_caller_on_direct_reply_to_gets_every_reply(stack: Stack) -> None:
    """The checks on direct reply-to names never cost a genuine caller its replies: the first
    to a node goes alone, the next ones on the shared reply connection; queries and writes."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        direct = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)

        async def on_reply(message: AbstractIncomingMessage) -> None:
            replies.put_nowait(json.loads(message.body))

        await direct.consume(on_reply, no_ack=True)
        sent = []
        for i in range(10):
            api, params = (
                ("QueryImage", {"limit": 1}) if i % 2 else ("DeleteTag", {"uuid": "0" * 32})
            )
            sent.append(api)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    json.dumps({"api": api, "params": params}).encode(),
                    message_id=uuid.uuid4().hex,
                    reply_to="amq.rabbitmq.reply-to",
                ),
                routing_key=stack.names.api,
            )
            reply = await asyncio.wait_for(replies.get(), 15)
            assert reply["api"] == api, reply
    finally:
        await connection.close()
    assert "dropped" not in stack.services[0].log()


async def test_forged_direct_reply_names_delay_ordinary_calls_under_1s_at_p99(
    stack: Stack,
) -> None:
    forged = [
        f"amq.rabbitmq.reply-to.{uuid.uuid4().hex}.{uuid.uuid4().hex}",  # malformed: fatal
        "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAADXQAAAABrAAA=.x",  # cut short: fatal
        unknown_node_name(),  # a well-formed pid on a node the broker does not know: fatal
    ]
    image = uuid.uuid4().hex
    await stack.db.execute(
        "INSERT INTO image (uuid, name, url, status, format, media_type, platform, system, type)"
        " VALUES ($1, 'tagged', 'http://127.0.0.1/x', 'Downloading', 'raw',"
        " 'RootVolumeTemplate', 'Linux', false, 'zstack')",
        image,
    )
    tag = {"resourceType": "ImageVO", "resourceUuid": image}

    async def forge(i: int) -> None:
        # Half read-only (direct reply), half through the outbox relay.
        if i % 2:
            body = {"api": "QueryImage", "params": {}}
        else:
            body = {"api": "CreateUserTag", "params": {**tag, "tag": f"forged-{i}"}}
        await publish(
            stack.names.api,
            json.dumps(body).encode(),
            message_id=uuid.uuid4().hex,
            reply_to=forged[i % len(forged)],
            correlation_id="forged",
        )

    async def ordinary(i: int) -> float:
        start = time.monotonic()
        if i % 2:
            reply = await stack.call("QueryImage", {"limit": 1}, timeout=30)
        else:
            reply = await stack.call("CreateUserTag", {**tag, "tag": f"ordinary-{i}"}, timeout=30)
        assert reply["success"], reply
        return time.monotonic() - start

    def p99(latencies: list[float]) -> float:
        return sorted(latencies)[int(len(latencies) * 0.99) - 1]

    # The same 100 calls at once, without and then with the forgeries among them.
    baseline = p99(await asyncio.gather(*(ordinary(i) for i in range(CALLS))))
    forgeries = [asyncio.create_task(forge(i)) for i in range(CALLS)]
    attacked = p99(await asyncio.gather(*(ordinary(i) for i in range(CALLS))))
    await asyncio.gather(*forgeries)
    print(f"ordinary calls p99: {baseline * 1000:.1f} ms; among forgeries {attacked * 1000:.1f} ms")
    assert attacked - baseline < 1.0

    # Every forged CreateUserTag ran (only its reply was lost), and the service still serves.
    async def forged_tags() -> bool:
        query = "SELECT count(*) FROM user_tag WHERE tag LIKE 'forged-%'"
        return bool(await stack.db.fetchval(query) == CALLS // 2)

    await wait_for(forged_tags, timeout=30)
    assert (await stack.call("QueryImage", {"limit": 1}))["success"]
    assert all(proc.running for proc in stack.services)
