"""The inbox: message ids executed at most once, with their stored replies."""

from __future__ import annotations

from typing import Any

from image_service.store.group import QueryGroup, Record
from image_service.store.rows import Finished, InboxResult, InboxRow, ReplyTarget


def _inbox(row: Record | None) -> InboxRow | None:
    return InboxRow(**row) if row is not None else None


class Inbox(QueryGroup, sql_file="inbox.sql"):
    __slots__ = ()

    async def claim(
        self, *, message_id: str, api: str, reply_to: str | None, correlation_id: str | None
    ) -> bool:
        """Record a message id; False when it was seen before (a duplicate)."""
        row = await self._row(
            "inbox_claim",
            message_id=message_id,
            api=api,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )
        return row is not None

    async def record(
        self,
        *,
        message_id: str,
        api: str,
        reply_to: str | None,
        correlation_id: str | None,
        reply: str,
    ) -> bool:
        """Record a message id with its final reply (encoded JSON); False for a duplicate."""
        row = await self._row(
            "inbox_record",
            message_id=message_id,
            api=api,
            reply_to=reply_to,
            correlation_id=correlation_id,
            reply=reply,
        )
        return row is not None

    async def get(self, message_id: str) -> InboxRow | None:
        return _inbox(await self._row("inbox_get", message_id=message_id))

    async def lock(self, message_id: str) -> InboxRow | None:
        return _inbox(await self._row("inbox_lock", message_id=message_id))

    async def set_image(self, *, message_id: str, image_uuid: str) -> None:
        await self._execute("inbox_set_image", message_id=message_id, image_uuid=image_uuid)

    async def add_waiter(
        self, *, message_id: str, reply_to: str, correlation_id: str | None
    ) -> None:
        await self._execute(
            "inbox_add_waiter",
            message_id=message_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
        )

    async def finish(self, *, message_id: str, reply: dict[str, Any]) -> Finished | None:
        """Store the final reply; None when the message had finished already."""
        row = await self._row("inbox_finish", message_id=message_id, reply=reply)
        if row is None:
            return None
        return Finished(
            ReplyTarget(row["reply_to"], row["correlation_id"]), row["api"], row["elapsed"]
        )

    async def result(self, message_id: str) -> InboxResult | None:
        row = await self._row("inbox_result", message_id=message_id)
        return InboxResult(**row) if row is not None else None

    async def waiters(self, message_id: str) -> list[ReplyTarget]:
        rows = await self._rows("inbox_waiters", message_id=message_id)
        return [ReplyTarget(**row) for row in rows]

    async def prune(self, *, older_than: float) -> None:
        await self._execute("inbox_prune", older_than=older_than)
