"""Agent operations: sending deletes, applying results, cancelling work in progress.

Every function runs inside the caller's transaction and takes the row lock of the image
concerned first (several images: in uuid order), so that concurrent results and cancellations
of one image, in any replica, serialise, and no two transactions wait for each other in a
cycle (docs/DESIGN.md section 6).
"""

from __future__ import annotations

import logging
import uuid

from pydantic import ValidationError

from image_service.deletion import schedule_delete
from image_service.errors import ErrorCode
from image_service.lifecycle import OpKind, OpStatus
from image_service.metrics import METRICS
from image_service.pipeline import Ctx
from image_service.protocol.agent import AgentResult, FileFacts, InspectCommand
from image_service.settlement import settle_image, settle_message
from image_service.store.rows import OpRow, StoredFacts

# The ops that create a reference's file: cancelling one removes its reference.
CREATION = frozenset({OpKind.download, OpKind.create})

log = logging.getLogger(__name__)


async def apply_result(ctx: Ctx, result: AgentResult, *, sender: str) -> None:
    """Apply one agent result, published by broker user `sender`, if it matches its command
    (contract section 8). Zero rows from a guard means it is stale or a duplicate."""
    op_id = uuid.UUID(result.opId)
    op = await ctx.tx.ops.get(op_id)
    if op is None:
        log.warning("result for unknown op %s dropped", op_id)
        return
    if op.backup_storage_uuid != result.backupStorageUuid:
        log.warning("result for op %s from the wrong backup storage dropped", op_id)
        return
    owner = await ctx.tx.backup_storages.agent_user(op.backup_storage_uuid)
    if owner != sender:
        log.warning(
            "result for op %s dropped: sent by broker user %r, backup storage %s belongs to %r",
            op_id,
            sender,
            op.backup_storage_uuid,
            owner,
        )
        return
    capacity = result.capacity
    if capacity is not None:
        # Before the image lock: every transaction that locks both takes the backup storage's
        # row first (DeleteBackupStorage, the monitor), so none waits for another in a cycle.
        await ctx.tx.backup_storages.record_capacity(op.backup_storage_uuid, capacity)
    await ctx.tx.images.lock(op.image_uuid)  # serialise with other work on this image
    if op.kind is OpKind.inspect:
        await _apply_inspection(ctx, op, result)
        await settle_message(ctx, op.message_id)
        return
    stored = result.stored
    expected_path = str(op.command.get("installPath", ""))
    misplaced = False
    if result.success and op.kind is not OpKind.delete and stored is None:
        # The agent would answer the same again at every re-send: fail the op, so that its
        # caller gets a reply instead of waiting for the backup storage to disconnect.
        log.warning("successful %s result for op %s names no stored file", op.kind, op_id)
        result = AgentResult.failed(
            result.opId,
            result.backupStorageUuid,
            ErrorCode.OPERATION_ERROR,
            "the agent reported success without the stored file",
        )
    elif stored is not None and stored.installPath != expected_path:
        # Never record a path the command did not name (it could be any file of the host).
        # The file the command named may exist: remove it.
        log.warning(
            "result for op %s names %r, not the command's installPath: op failed",
            op_id,
            stored.installPath[:300],
        )
        result = AgentResult.failed(
            result.opId,
            result.backupStorageUuid,
            ErrorCode.OPERATION_ERROR,
            "the agent reported a file other than the one the command named",
        )
        stored = None
        misplaced = True
    if op.kind is OpKind.delete and not result.success:
        # Keep the delete Pending so the reconciler retries it; release the waiting caller.
        await ctx.tx.ops.note_failure(
            op_id=op_id, error_code=result.error_code.value, error_details=result.details
        )
        log.warning("delete op %s failed on the agent (%s); will retry", op_id, result.details)
        await settle_message(ctx, op.message_id)
        return
    finished = await _finish_op(ctx, op_id, result)
    if finished is None:
        await _drop_stale(ctx, op, result)
        return
    if op.kind is OpKind.delete:
        # An expunge: its reference goes now that the file is gone (a Direct delete's went
        # when it was asked, and has no claim to remove).
        if await ctx.tx.images.remove_claimed_ref(
            image_uuid=op.image_uuid, backup_storage_uuid=op.backup_storage_uuid, op_id=op_id
        ):
            await settle_image(ctx, op.image_uuid)
    else:
        if stored is not None:
            marked = await ctx.tx.images.mark_ref_ready(
                image_uuid=op.image_uuid,
                backup_storage_uuid=result.backupStorageUuid,
                install_path=stored.installPath,
            )
            if not marked:
                await _drop_stale(ctx, op, result)
            elif op.kind is OpKind.download:
                METRICS.downloaded_bytes.inc(stored.size)
        else:
            await ctx.tx.images.delete_ref(
                image_uuid=op.image_uuid, backup_storage_uuid=result.backupStorageUuid
            )
            if misplaced:
                # The agent believes it stored the image: the named file may exist.
                await schedule_delete(
                    ctx, op.image_uuid, op.backup_storage_uuid, expected_path, message_id=None
                )
    await settle_message(ctx, op.message_id)


async def _finish_op(ctx: Ctx, op_id: uuid.UUID, result: AgentResult) -> OpRow | None:
    """Finish the op as its (checked) result says; None when it was finished already."""
    return await ctx.tx.ops.finish(
        op_id=op_id,
        status=OpStatus.Succeeded if result.success else OpStatus.Failed,
        result=result.model_dump(mode="json", exclude_none=True),
        error_code=None if result.success else result.error_code.value,
        error_details=None if result.success else (result.details or "failed on the agent"),
    )


def _mismatch(expected: StoredFacts | None, found: FileFacts) -> str | None:
    """Why an inspected file is not the image's (None when it is)."""
    if expected is None or expected.md5_sum is None:
        return "the image has no recorded md5 to compare the file with"
    if found.size != expected.size:
        return f"the file has {found.size} bytes; the image has {expected.size}"
    if found.md5Sum != expected.md5_sum:
        return f"the file's md5 is {found.md5Sum}; the image's is {expected.md5_sum}"
    if expected.sha256_sum is not None and found.sha256Sum != expected.sha256_sum:
        return f"the file's sha256 is {found.sha256Sum}; the image's is {expected.sha256_sum}"
    return None


async def _apply_inspection(ctx: Ctx, op: OpRow, result: AgentResult) -> None:
    """An inspect's result. A recovery turns its Deleted reference Ready only when the file's
    size and checksums are the image's; a file that is gone loses its reference (reported in
    the reply's `causes`); any other failure leaves the reference Deleted. SyncImageSize
    records the sizes measured, from a file of the image's size only."""
    op_id = uuid.UUID(result.opId)
    try:
        command = InspectCommand.model_validate(op.command, strict=False)
    except ValidationError:
        # An op recorded as failed before it was sent (a skipped holder) has no command.
        log.warning("result for op %s, which sent no inspect command, dropped", op_id)
        return
    inspected = result.inspected
    problem: str | None = None
    code = ErrorCode.CHECKSUM_MISMATCH
    if result.success and inspected is None:
        problem = "the agent reported an inspection without its findings"
        code = ErrorCode.OPERATION_ERROR
    elif result.success and inspected is not None:
        expected = await ctx.tx.images.stored_facts(op.image_uuid)
        if command.checksums:
            mismatch = _mismatch(expected, inspected)
            if mismatch is not None:
                problem = f"not recovered: {mismatch}; the reference stays Deleted"
        elif expected is None or inspected.size != expected.size:
            size = expected.size if expected is not None else None
            problem = (
                f"the file has {inspected.size} bytes, the image {size}: it is not the image's file"
            )
    if problem is not None:
        result = AgentResult.failed(result.opId, result.backupStorageUuid, code, problem)
    finished = await _finish_op(ctx, op_id, result)
    if finished is None:
        return  # late or duplicate
    key = {"image_uuid": op.image_uuid, "backup_storage_uuid": op.backup_storage_uuid}
    if not command.checksums:
        if result.success and inspected is not None:
            await ctx.tx.images.set_sizes(
                uuid=op.image_uuid,
                actual_size=inspected.actualSize,
                virtual_size=inspected.virtualSize,
            )
        return
    if result.success:
        if await ctx.tx.images.recover_ref(**key, op_id=op_id):
            await settle_image(ctx, op.image_uuid)
    elif result.error_code is ErrorCode.RESOURCE_NOT_FOUND:
        if await ctx.tx.images.remove_claimed_ref(**key, op_id=op_id):
            await settle_image(ctx, op.image_uuid)
    else:
        await ctx.tx.images.release_ref(**key, op_id=op_id)


async def fail_inspections(ctx: Ctx, ops: list[OpRow], code: ErrorCode, details: str) -> list[str]:
    """Fail the Pending inspect ops in `ops` (their backup storage went away): a recovery's
    reference stays Deleted. Returns the message ids waiting on them."""
    messages: list[str] = []
    for op in ops:
        if op.kind is not OpKind.inspect or not await _fail(ctx, op, code, details):
            continue
        await ctx.tx.images.release_ref(
            image_uuid=op.image_uuid, backup_storage_uuid=op.backup_storage_uuid, op_id=op.op_id
        )
        if op.message_id:
            messages.append(op.message_id)
    return messages


async def _fail(ctx: Ctx, op: OpRow, code: ErrorCode, details: str) -> bool:
    """Fail a Pending op from the service's side; False when it had finished already."""
    finished = await ctx.tx.ops.finish(
        op_id=op.op_id,
        status=OpStatus.Failed,
        result=None,
        error_code=code.value,
        error_details=details,
    )
    return finished is not None


async def _drop_stale(ctx: Ctx, op: OpRow, result: AgentResult) -> None:
    """A late success for work that was cancelled: its file must not stay on disk."""
    log.info("stale result for op %s (%s) ignored", op.op_id, op.kind)
    stored = result.stored
    if op.kind is OpKind.delete or stored is None:
        return
    # A reference that turned Deleted since keeps the file as well as a Ready one: a
    # replayed result must not remove what the deletion policy promised to keep.
    kept = await ctx.tx.images.ref_holds(
        backup_storage_uuid=result.backupStorageUuid, install_path=stored.installPath
    )
    if not kept:
        await schedule_delete(
            ctx, op.image_uuid, result.backupStorageUuid, stored.installPath, message_id=None
        )


async def cancel_ops(
    ctx: Ctx, ops: list[OpRow], code: ErrorCode, details: str, *, remove_files: bool = True
) -> list[str]:
    """Fail the Pending download/create ops in `ops` (others are skipped) and remove their refs
    and partial files.

    The caller holds the image locks. Returns the message ids that were waiting on them (to be
    settled by the caller once the rest of its transaction is done)."""
    messages: list[str] = []
    for op in ops:
        if op.kind not in CREATION or not await _fail(ctx, op, code, details):
            continue
        path = await ctx.tx.images.delete_ref(
            image_uuid=op.image_uuid, backup_storage_uuid=op.backup_storage_uuid
        )
        if remove_files:
            await schedule_delete(
                ctx,
                op.image_uuid,
                op.backup_storage_uuid,
                path or str(op.command.get("installPath", "")),
                message_id=None,
                cancel_op_ids=[str(op.op_id)],
            )
        if op.message_id:
            messages.append(op.message_id)
    return messages


async def release_stranded(ctx: Ctx, ops: list[OpRow], *, gone: bool) -> list[str]:
    """Pending ops of a backup storage that went away: Disconnected, or (`gone`) deleted. The
    caller holds their images' locks. Downloads and creations fail and lose their references
    (a Disconnected agent gets the delete of what it may have stored); inspections fail;
    deletes wait for a Disconnected agent without holding their caller, and fail with a
    deleted one. Returns the message ids to settle once the caller's work is done."""
    messages: list[str] = []
    for op in ops:
        bs = op.backup_storage_uuid
        if op.kind is OpKind.delete:
            if not gone:
                await ctx.tx.ops.detach_message(op.op_id)
            elif not await _fail(ctx, op, ErrorCode.OPERATION_ERROR, "backup storage deleted"):
                continue
            if op.message_id:
                messages.append(op.message_id)
        elif op.kind is OpKind.inspect:
            code = ErrorCode.OPERATION_ERROR if gone else ErrorCode.INVALID_STATE
            went = "was deleted" if gone else "disconnected before it answered"
            messages += await fail_inspections(ctx, [op], code, f"backup storage {bs} {went}")
        elif gone:
            details = f"backup storage {bs} was deleted"
            messages += await cancel_ops(
                ctx, [op], ErrorCode.OPERATION_ERROR, details, remove_files=False
            )
        else:
            details = "the backup storage disconnected before the image was stored"
            messages += await cancel_ops(ctx, [op], ErrorCode.DOWNLOAD_FAILED, details)
    return messages


async def backup_storages_disconnected(ctx: Ctx, backup_storage_uuids: list[str]) -> None:
    """Agents missed their heartbeats: fail their downloads and inspections (their callers get
    a reply now) and let their deletes wait for them without holding their callers."""
    ops = [
        op
        for bs_uuid in backup_storage_uuids
        for op in await ctx.tx.ops.pending_of_backup_storage(bs_uuid)
    ]
    if ops:
        await ctx.tx.images.lock_many([op.image_uuid for op in ops])
    for message_id in await release_stranded(ctx, ops, gone=False):
        await settle_message(ctx, message_id)


async def release_all_stranded(ctx: Ctx) -> int:
    """Ops committed just after their backup storage was handled as Disconnected or deleted
    (their request saw it Connected, or there, a moment before) would wait for good: release
    them as that handling would have. Returns how many were found."""
    stranded = await ctx.tx.ops.stranded()
    if not stranded:
        return 0
    await ctx.tx.images.lock_many([s.op.image_uuid for s in stranded])
    messages: list[str] = []
    for gone in (True, False):
        ops = [s.op for s in stranded if s.gone is gone]
        messages += await release_stranded(ctx, ops, gone=gone)
    for message_id in messages:
        await settle_message(ctx, message_id)
    return len(stranded)
