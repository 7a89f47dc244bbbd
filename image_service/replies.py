"""Replies: their shape (contract section 2), and delivering the final one of a message."""

from __future__ import annotations

import logging
from typing import Any

from image_service.errors import ApiError
from image_service.metrics import METRICS, outcome_of
from image_service.outbox import Outbox
from image_service.store import Tx

log = logging.getLogger(__name__)


def success_reply(api: str, **fields: Any) -> dict[str, Any]:
    return {"success": True, "api": api, **fields}


def error_reply(api: str | None, error: ApiError) -> dict[str, Any]:
    return {"success": False, "api": api, "error": error.to_error()}


async def finish_message(tx: Tx, outbox: Outbox, message_id: str, body: dict[str, Any]) -> None:
    """Store the final reply of `message_id` and send it to its caller and any waiters."""
    finished = await tx.inbox.finish(message_id=message_id, reply=body)
    if finished is None:
        return  # already finished: a duplicate completion, nothing to send twice
    METRICS.answered(finished.api or None, outcome_of(body), finished.elapsed)
    targets = [finished.caller, *await tx.inbox.waiters(message_id)]
    sent = False
    for target in targets:
        if target.reply_to:
            await outbox.reply(target.reply_to, target.correlation_id, body)
            sent = True
    if not sent:
        log.info("message %s finished without reply_to: %s", message_id, _summary(body))


def _summary(body: dict[str, Any]) -> str:
    if body.get("success"):
        return "success"
    error = body.get("error") or {}
    return f"{error.get('code')}: {error.get('details')}"
