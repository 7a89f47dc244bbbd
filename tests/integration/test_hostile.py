"""Hostile messages must not wedge the service."""

from __future__ import annotations

import asyncio
import json
import uuid

from tests.conftest import Stack, wait_for
from tests.helpers import outbox_empty

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
    await wait_for(lambda: outbox_empty(stack), timeout=30)
    reply = await stack.call("QueryBackupStorage", {"conditions": []}, timeout=10)
    assert reply["success"], reply


async def test_forged_reply_to_queries_do_not_cost_other_callers_their_replies(
    stack: Stack,
) -> None:
    """Forged direct reply-tos arriving among ordinary calls (queries answered directly and
    write APIs answered through the outbox): every ordinary caller still gets its reply."""

    async def forge() -> None:
        await stack.client.publish_raw(
            json.dumps({"api": "QueryImage", "params": {}}).encode(),
            message_id=uuid.uuid4().hex,
            reply_to=FORGED_REPLY_TO,
        )

    calls = []
    for _ in range(6):
        await forge()
        calls.append(stack.call("QueryImage", {"conditions": []}, timeout=30))
        calls.append(
            stack.call(
                "ChangeImageState", {"uuid": uuid.uuid4().hex, "stateEvent": "disable"}, timeout=30
            )
        )
    replies = await asyncio.gather(*calls)
    for reply in replies:
        if reply["api"] == "QueryImage":
            assert reply["success"], reply
        else:
            assert reply["error"]["code"] == "RESOURCE_NOT_FOUND", reply
    assert stack.services[0].running
