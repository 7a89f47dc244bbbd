"""Hostile messages must not wedge the service."""

from __future__ import annotations

import json
import uuid

from tests.conftest import Stack, wait_for

FORGED_REPLY_TO = "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMjM0NTY3ODkwAAAAAAAAAAA=.abc"


async def test_forged_direct_reply_to_does_not_wedge_the_service(stack: Stack) -> None:
    # RabbitMQ closes the publishing connection when a reply goes to a forged direct
    # reply-to; the service must drop that reply and keep serving everyone else.
    for _ in range(3):
        await stack.client.publish_raw(
            json.dumps({"api": "QueryImage", "params": {}}).encode(),
            message_id=uuid.uuid4().hex,
            reply_to=FORGED_REPLY_TO,
        )
    reply = await stack.call("QueryImage", {"conditions": []}, timeout=30)
    assert reply["success"], reply
    assert stack.services[0].running

    async def outbox_empty() -> bool:
        return await stack.db.fetchval("SELECT count(*) FROM outbox") == 0

    await wait_for(outbox_empty, timeout=30)
    reply = await stack.call("QueryBackupStorage", {"conditions": []}, timeout=10)
    assert reply["success"], reply
