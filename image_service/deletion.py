"""Removing files from backup storages: deletes, expunges and the inspections that recover a
Deleted reference (contract section 10).

A Direct delete removes the reference at once and its file through a `delete` op. Under the
Delay and Never policies the reference turns Deleted and keeps its file; an expunge (asked, or
the expunger's after `expungePeriod`) claims it for a `delete` op and removes it only when the
agent has confirmed, and RecoverImage claims it for an `inspect` op that must confirm the
file's size and checksums before it turns Ready again. A claim (`ref_op`) is one guarded
statement: whichever replica sets it first has the reference, so each is expunged once.

Runs inside the caller's transaction, after the image row lock (docs/DESIGN.md section 6).
"""

from __future__ import annotations

import uuid

from image_service.lifecycle import OpKind
from image_service.pipeline import Ctx
from image_service.protocol.agent import DeleteCommand, InspectCommand
from image_service.store.rows import ImageRow, RefRow


async def schedule_delete(
    ctx: Ctx,
    image_uuid: str,
    backup_storage_uuid: str,
    install_path: str,
    *,
    message_id: str | None,
    cancel_op_ids: list[str] | None = None,
    op_id: uuid.UUID | None = None,
) -> None:
    """Record and send a delete of one file; the reconciler re-sends it until it is done."""
    op_id = op_id or uuid.uuid4()
    command = DeleteCommand(
        opId=str(op_id),
        imageUuid=image_uuid,
        backupStorageUuid=backup_storage_uuid,
        installPath=install_path,
        cancelOpIds=cancel_op_ids or [],
    )
    await ctx.tx.ops.insert(
        op_id=op_id,
        kind=OpKind.delete,
        message_id=message_id,
        image_uuid=image_uuid,
        backup_storage_uuid=backup_storage_uuid,
        command=command.model_dump(mode="json"),
    )
    await ctx.outbox.command(command)


async def start_expunge(
    ctx: Ctx,
    image_uuid: str,
    backup_storage_uuid: str,
    *,
    message_id: str | None,
    min_age: float = 0.0,
) -> bool:
    """Claim a Deleted reference (Deleted for at least `min_age` seconds) and send the delete
    of its file; the reference goes when the agent confirms (operations.apply_result). False
    when it is not Deleted, too young, or claimed already."""
    op_id = uuid.uuid4()
    path = await ctx.tx.images.claim_ref(
        image_uuid=image_uuid,
        backup_storage_uuid=backup_storage_uuid,
        op_id=op_id,
        min_age=min_age,
    )
    if path is None:
        return False
    await schedule_delete(
        ctx, image_uuid, backup_storage_uuid, path, message_id=message_id, op_id=op_id
    )
    return True


async def start_inspection(
    ctx: Ctx, image: ImageRow, ref: RefRow, *, message_id: str, recover: bool
) -> bool:
    """Ask the holder of `ref` to measure its file: to recover it (claiming the Deleted
    reference, and hashing the file when its size is the image's), or to re-measure it
    (SyncImageSize). False when a recovery finds the reference claimed already."""
    op_id = uuid.uuid4()
    expected_size: int | None = None
    if recover:
        facts = await ctx.tx.images.stored_facts(image.uuid)
        expected_size = facts.size if facts is not None else None
        claimed = await ctx.tx.images.claim_ref(
            image_uuid=image.uuid,
            backup_storage_uuid=ref.backup_storage_uuid,
            op_id=op_id,
            min_age=0.0,
        )
        if claimed is None:
            return False
    command = InspectCommand(
        opId=str(op_id),
        imageUuid=image.uuid,
        backupStorageUuid=ref.backup_storage_uuid,
        installPath=ref.install_path,
        format=image.format,  # type: ignore[arg-type]  # a CHECK keeps it qcow2, raw or iso
        checksums=recover,
        size=expected_size,
    )
    await ctx.tx.ops.insert(
        op_id=op_id,
        kind=OpKind.inspect,
        message_id=message_id,
        image_uuid=image.uuid,
        backup_storage_uuid=ref.backup_storage_uuid,
        command=command.model_dump(mode="json"),
    )
    await ctx.outbox.command(command)
    return True
