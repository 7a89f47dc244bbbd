"""The reconciler: agents that went silent turn Disconnected, and commands whose lease ran out
are sent again (docs/DESIGN.md sections 3 and 6). Every replica runs it; the guarded updates
and SKIP LOCKED give each backup storage and each op to one of them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from image_service.events import emit_backup_storage_status
from image_service.lifecycle import BackupStorageStatus
from image_service.operations import backup_storages_disconnected, release_all_stranded
from image_service.pipeline import Transactions
from image_service.protocol.transport import RetryLater

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    interval: float
    resend_after: float
    missed_heartbeats: int


class Monitor:
    def __init__(self, transactions: Transactions, settings: MonitorSettings) -> None:
        self.transactions = transactions
        self.settings = settings

    async def run(self) -> None:
        while True:
            try:
                await self.check_heartbeats()
                await self.resend_due()
            except RetryLater as exc:
                log.warning("monitor: %s", exc)
            await asyncio.sleep(self.settings.interval)

    async def check_heartbeats(self) -> None:
        async with self.transactions.open() as ctx:
            heard_for = time.monotonic() - self.transactions.heard_since
            lost = await ctx.tx.backup_storages.mark_disconnected(
                missed=self.settings.missed_heartbeats, heard_for=heard_for
            )
            for bs_uuid in lost:
                log.warning("backup storage %s Disconnected (missed heartbeats)", bs_uuid)
                await emit_backup_storage_status(
                    ctx, bs_uuid, BackupStorageStatus.Connected, BackupStorageStatus.Disconnected
                )
            # In the same transaction: only this replica's update returned these backup
            # storages, so only it may fail their downloads, and it must not forget to.
            if lost:
                await backup_storages_disconnected(ctx, lost)
        async with self.transactions.open() as ctx:
            released = await release_all_stranded(ctx)
        if released:
            log.warning("released %d ops stranded on absent backup storages", released)

    async def resend_due(self) -> None:
        async with self.transactions.open() as ctx:
            for op in await ctx.tx.ops.due_for_resend(after=self.settings.resend_after):
                await ctx.outbox.resend(op.backup_storage_uuid, str(op.op_id), op.command)
