"""The APIs on backup storages (which register themselves by their agents' heartbeats)."""

from __future__ import annotations

from image_service import params
from image_service.api.creation import not_found
from image_service.inventory import backup_storage_inventory
from image_service.lifecycle import BackupStorageState
from image_service.operations import release_stranded
from image_service.pipeline import Ctx, Outcome
from image_service.settlement import settle_image, settle_message


async def change_backup_storage_state(ctx: Ctx, p: params.ChangeBackupStorageState) -> Outcome:
    if await ctx.tx.backup_storages.lock(p.uuid) is None:
        raise not_found("backup storage", p.uuid)
    enable = p.stateEvent is params.StateEvent.enable
    state = BackupStorageState.Enabled if enable else BackupStorageState.Disabled
    await ctx.tx.backup_storages.change_state(uuid=p.uuid, state=state)
    rows = await ctx.tx.backup_storages.inventory_rows([p.uuid])
    return {"inventory": backup_storage_inventory(rows[0])}


async def delete_backup_storage(ctx: Ctx, p: params.DeleteBackupStorage) -> Outcome:
    """Forget a backup storage at once: its downloads and inspections fail, its deletes are
    dropped, its references go (Deleted ones too), and an image left on no backup storage is
    deleted. Every image concerned
    is locked first, in uuid order (two such deletions never wait for each other in a cycle)."""
    if await ctx.tx.backup_storages.lock(p.uuid) is None:
        return {}
    ops = await ctx.tx.ops.pending_of_backup_storage(p.uuid)
    holding = [h.image_uuid for h in await ctx.tx.images.held_by(p.uuid)]
    await ctx.tx.images.lock_many([op.image_uuid for op in ops] + holding)
    # Work in flight there fails; its callers are answered in this transaction. (An op
    # committed after this read is found by the monitor: operations.release_all_stranded.)
    waiting = await release_stranded(ctx, ops, gone=True)
    # Read again: a cancelled download's reference is gone, and its image is settled below.
    for ref in await ctx.tx.images.held_by(p.uuid):
        await ctx.tx.images.delete_ref(image_uuid=ref.image_uuid, backup_storage_uuid=p.uuid)
        await settle_image(ctx, ref.image_uuid)
    await ctx.tx.backup_storages.delete(p.uuid)
    for message_id in waiting:
        await settle_message(ctx, message_id)
    return {}
