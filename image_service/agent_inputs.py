"""What agents tell the service: results of their ops (`NS.results`) and heartbeats
(`NS.heartbeats`). Each is validated with the protocol's model; an invalid one is logged and
dropped (acked), since sending it again would not make it valid.

Who sent it is proven by the broker (contract section 8): agents publish to the topic exchange
`NS.agents` under `result.<uuid>` / `heartbeat.<uuid>`, keys that topic permissions reserve to
that backup storage's broker user, with the broker-validated `user_id`. A backup storage belongs
to the broker user of its first heartbeat (one the `--agent-user-pattern` admits), and only that
user's heartbeats and results count for it. Anything else is dropped with a log line and
changes nothing.
"""

from __future__ import annotations

import logging
import re
from typing import TypeVar

from pydantic import ValidationError

from image_service.events import emit_backup_storage_status
from image_service.lifecycle import BackupStorageStatus
from image_service.operations import apply_result
from image_service.pipeline import Transactions
from image_service.protocol.agent import AgentResult, Heartbeat
from image_service.protocol.errors import validation_details
from image_service.protocol.transport import Bus, Incoming

log = logging.getLogger(__name__)

M = TypeVar("M", AgentResult, Heartbeat)
_KINDS: dict[type[AgentResult] | type[Heartbeat], str] = {
    AgentResult: "agent result",
    Heartbeat: "heartbeat",
}


def _sender(msg: Incoming, what: str, exchange: str, key: str) -> str | None:
    """The broker user that sent an agent's message, or None (logged) when the message cannot
    be an agent's: not published to the agents' exchange under the key of the backup storage
    it speaks for (which the broker's topic permissions reserve to that backup storage's
    user), or without `user_id`."""
    if msg.exchange != exchange or msg.routing_key != key:
        log.warning(
            "%s dropped: published to %r with key %r, not to %r with key %r",
            what,
            msg.exchange[:255],
            (msg.routing_key or "")[:255],
            exchange,
            key,
        )
        return None
    if not msg.user_id:
        log.warning("%s dropped: it has no user_id, so its sender is unknown", what)
        return None
    return msg.user_id


class AgentInputs:
    def __init__(self, transactions: Transactions, bus: Bus, agent_users: re.Pattern[str]) -> None:
        self.transactions = transactions
        self.bus = bus
        self.agent_users = agent_users

    def _read(self, msg: Incoming, model: type[M]) -> tuple[M, str] | None:
        """The message as `model` and the broker user that sent it, or None (logged) when it is
        malformed or cannot be an agent's."""
        try:
            item = model.model_validate_json(msg.body)
        except ValidationError as exc:
            log.warning("malformed %s dropped: %s", _KINDS[model], validation_details(exc))
            return None
        names = self.transactions.names
        if isinstance(item, AgentResult):
            what, key = f"result of op {item.opId}", names.result_key(item.backupStorageUuid)
        else:
            what, key = f"heartbeat of backup storage {item.uuid}", names.heartbeat_key(item.uuid)
        user = _sender(msg, what, names.agent_messages, key)
        return None if user is None else (item, user)

    async def on_result(self, msg: Incoming) -> None:
        read = self._read(msg, AgentResult)
        if read is None:
            return
        result, user = read
        async with self.transactions.open() as ctx:
            await apply_result(ctx, result, sender=user)

    async def on_heartbeat(self, msg: Incoming) -> None:
        read = self._read(msg, Heartbeat)
        if read is None:
            return
        beat, user = read
        async with self.transactions.open() as ctx:
            owner = await ctx.tx.backup_storages.owner_for_update(beat.uuid)
            owned_by = owner.agent_user if owner is not None else None
            if owned_by is None and not self.agent_users.fullmatch(user):
                log.warning(
                    "heartbeat of backup storage %s dropped: broker user %r may not register"
                    " backup storages (--agent-user-pattern)",
                    beat.uuid,
                    user,
                )
                return
            if owned_by is not None and owned_by != user:
                log.warning(
                    "heartbeat of backup storage %s from broker user %r dropped: it belongs to %r",
                    beat.uuid,
                    user,
                    owned_by,
                )
                return
            inserted = await ctx.tx.backup_storages.heartbeat(
                uuid=beat.uuid,
                name=beat.name,
                url=beat.url,
                hostname=beat.hostname,
                total_capacity=beat.totalCapacity,
                available_capacity=beat.availableCapacity,
                heartbeat_interval=beat.heartbeatInterval,
                agent_user=user,
                capacity_seq=beat.capacitySeq,
            )
            if inserted is None:
                log.info(
                    "heartbeat of deleted (or another user's) backup storage %s ignored", beat.uuid
                )
                return
            if inserted:
                log.info("backup storage %s registered by broker user %r", beat.uuid, user)
            old_status = owner.status if owner is not None else None
            connected = BackupStorageStatus.Connected
            changed = inserted if old_status is None else old_status is not connected
            if changed:
                await self.bus.declare_agent_queue(beat.uuid)
                await ctx.tx.ops.resend_now(beat.uuid)
                await emit_backup_storage_status(ctx, beat.uuid, old_status, connected)
