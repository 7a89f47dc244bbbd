"""What a transaction decides to publish: written to the outbox table in that transaction,
published by the relay after commit (so a crash never loses or invents a message)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from image_service.protocol.agent import AgentCommand
from image_service.protocol.events import Event
from image_service.protocol.names import Names
from image_service.store import Tx


@dataclass(frozen=True, slots=True)
class Outbox:
    tx: Tx
    names: Names

    async def event(self, event: Event) -> None:
        await self.tx.outbox.put(
            exchange=self.names.events,
            routing_key=event.routing_key,
            body=event.model_dump(mode="json"),
            persistent=True,
        )

    async def command(self, command: AgentCommand) -> None:
        await self.tx.outbox.put(
            exchange="",
            routing_key=self.names.agent(command.backupStorageUuid),
            body=command.model_dump(mode="json"),
            message_id=command.opId,
            persistent=True,
        )

    async def resend(self, backup_storage_uuid: str, op_id: str, command: dict[str, Any]) -> None:
        """A command again, as it was stored with its op."""
        await self.tx.outbox.put(
            exchange="",
            routing_key=self.names.agent(backup_storage_uuid),
            body=command,
            message_id=op_id,
            persistent=True,
        )

    async def reply(self, reply_to: str, correlation_id: str | None, body: Any) -> None:
        await self.tx.outbox.put(
            exchange="",
            routing_key=reply_to,
            body=body,
            correlation_id=correlation_id,
            persistent=True,
        )


def encode(body: Any) -> bytes:
    """JSON bytes of a message body: orjson, several times faster than json on the large
    replies of queries; json only for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, separators=(",", ":")).encode()
