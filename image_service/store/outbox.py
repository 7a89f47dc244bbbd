"""The outbox table: messages to publish once their transaction has committed."""

from __future__ import annotations

from typing import Any

from image_service.store.group import QueryGroup
from image_service.store.rows import OutboxRow


class OutboxTable(QueryGroup, sql_file="outbox.sql"):
    __slots__ = ()

    async def put(
        self,
        *,
        exchange: str,
        routing_key: str,
        body: Any,
        correlation_id: str | None = None,
        message_id: str | None = None,
        persistent: bool,
    ) -> None:
        await self._execute(
            "outbox_put",
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            correlation_id=correlation_id,
            message_id=message_id,
            persistent=persistent,
        )

    async def take(self, *, limit: int) -> list[OutboxRow]:
        """The oldest rows no other transaction holds, locked until this one ends."""
        return [OutboxRow(**row) for row in await self._rows("outbox_take", limit=limit)]

    async def rejected(self, row_id: int) -> int:
        """Count one refusal by the broker; returns how many there were."""
        row = await self._row("outbox_rejected", id=row_id)
        return int(row["rejections"]) if row is not None else 0

    async def delete(self, ids: list[int]) -> None:
        if ids:
            await self._execute("outbox_delete", ids=ids)
