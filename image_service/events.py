"""The events the service publishes (contract section 7), put in the outbox of a transaction."""

from __future__ import annotations

from typing import Any

from image_service.inventory import backup_storage_inventory
from image_service.pipeline import Ctx
from image_service.protocol.events import (
    BackupStorageStatusChanged,
    ImageDeleted,
    ImageStateChanged,
    ImageStatusChanged,
)


async def emit_status(
    ctx: Ctx, image_uuid: str, old: str | None, new: str, inventory: dict[str, Any] | None
) -> None:
    await ctx.outbox.event(
        ImageStatusChanged(uuid=image_uuid, oldStatus=old, newStatus=new, inventory=inventory)
    )


async def emit_state(
    ctx: Ctx, image_uuid: str, old: str, new: str, inventory: dict[str, Any] | None
) -> None:
    await ctx.outbox.event(
        ImageStateChanged(uuid=image_uuid, oldState=old, newState=new, inventory=inventory)
    )


async def emit_deleted(ctx: Ctx, image_uuid: str, inventory: dict[str, Any] | None) -> None:
    await ctx.outbox.event(ImageDeleted(uuid=image_uuid, inventory=inventory))


async def emit_backup_storage_status(ctx: Ctx, bs_uuid: str, old: str | None, new: str) -> None:
    rows = await ctx.tx.backup_storages.inventory_rows([bs_uuid])
    inventory = backup_storage_inventory(rows[0]) if rows else None
    await ctx.outbox.event(
        BackupStorageStatusChanged(uuid=bs_uuid, oldStatus=old, newStatus=new, inventory=inventory)
    )
