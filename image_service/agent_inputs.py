"""What agents tell the service: results of their ops (`NS.results`) and heartbeats
(`NS.heartbeats`). Each is validated with the protocol's model; an invalid one is logged and
dropped (acked), since sending it again would not make it valid."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from image_service.events import emit_backup_storage_status
from image_service.lifecycle import BackupStorageStatus
from image_service.operations import apply_result
from image_service.pipeline import Transactions
from image_service.protocol.agent import AgentResult, Heartbeat
from image_service.protocol.errors import validation_details
from image_service.protocol.transport import Bus, Incoming

log = logging.getLogger(__name__)


class AgentInputs:
    def __init__(self, transactions: Transactions, bus: Bus) -> None:
        self.transactions = transactions
        self.bus = bus

    async def on_result(self, msg: Incoming) -> None:
        try:
            result = AgentResult.model_validate_json(msg.body)
        except ValidationError as exc:
            log.warning("malformed agent result dropped: %s", validation_details(exc))
            return
        async with self.transactions.open() as ctx:
            await apply_result(ctx, result)

    async def on_heartbeat(self, msg: Incoming) -> None:
        try:
            beat = Heartbeat.model_validate_json(msg.body)
        except ValidationError as exc:
            log.warning("malformed heartbeat dropped: %s", validation_details(exc))
            return
        async with self.transactions.open() as ctx:
            old_status = await ctx.tx.backup_storages.status_for_update(beat.uuid)
            inserted = await ctx.tx.backup_storages.heartbeat(
                uuid=beat.uuid,
                name=beat.name,
                url=beat.url,
                hostname=beat.hostname,
                total_capacity=beat.totalCapacity,
                available_capacity=beat.availableCapacity,
                heartbeat_interval=beat.heartbeatInterval,
            )
            if inserted is None:
                log.info("heartbeat of deleted backup storage %s ignored", beat.uuid)
                return
            connected = BackupStorageStatus.Connected
            changed = inserted if old_status is None else old_status is not connected
            if changed:
                await self.bus.declare_agent_queue(beat.uuid)
                await ctx.tx.ops.resend_now(beat.uuid)
                await emit_backup_storage_status(ctx, beat.uuid, old_status, connected)
