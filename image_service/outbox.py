"""What a transaction decides to publish: written to the outbox table in that transaction,
published by the relay after commit (so a crash never loses or invents a message)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from image_service.names import Names
from image_service.store import Tx


@dataclass(frozen=True, slots=True)
class Outbox:
    tx: Tx
    names: Names

    async def event(self, routing_key: str, body: dict[str, Any]) -> None:
        await self.tx.execute("outbox_put", self.names.events, routing_key, body, None, None, False)

    async def command(self, backup_storage_uuid: str, command: dict[str, Any]) -> None:
        await self.tx.execute(
            "outbox_put",
            "",
            self.names.agent(backup_storage_uuid),
            command,
            None,
            command["opId"],
            True,
        )

    async def reply(self, reply_to: str, correlation_id: str | None, body: dict[str, Any]) -> None:
        await self.tx.execute("outbox_put", "", reply_to, body, correlation_id, None, False)


def encode(body: Any) -> bytes:
    """JSON bytes of a message body: orjson, several times faster than json on the large
    replies of queries; json only for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, separators=(",", ":")).encode()
