"""Replying to a message whose agent operations have all finished.

An API that needs agents (AddImage, the templates, DeleteImage) records one op per backup
storage and leaves its inbox row without a reply. Whenever an op finishes, `settle_message`
checks whether any is still Pending; when none is, the message's finalizer builds the reply.
Runs inside the caller's transaction, after the image row lock (docs/DESIGN.md section 6).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from image_service.errors import ApiError, ErrorCode
from image_service.events import emit_deleted, emit_status
from image_service.inventory import image_inventory_of
from image_service.lifecycle import BackupStorageStatus, ImageStatus, RefStatus
from image_service.pipeline import Ctx
from image_service.replies import error_reply, finish_message, success_reply
from image_service.store.rows import InboxRow

log = logging.getLogger(__name__)


async def settle_message(ctx: Ctx, message_id: str | None) -> None:
    """Reply to `message_id` if none of its operations is still Pending."""
    if message_id is None:
        return
    inbox = await ctx.tx.inbox.lock(message_id)
    if inbox is None or inbox.reply is not None:
        return
    if await ctx.tx.ops.count_pending_for_message(message_id) > 0:
        return
    finalizer = FINALIZERS.get(inbox.api)
    if finalizer is None:
        log.error("no finalizer for %s (message %s)", inbox.api, message_id)
        return
    await finish_message(ctx.tx, ctx.outbox, message_id, await finalizer(ctx, inbox))


async def settle_image(ctx: Ctx, image_uuid: str) -> None:
    """Bring an image's status in line with its references once they have changed: on no
    backup storage it is gone (`image.deleted`), with every reference Deleted it is Deleted,
    with a Ready one again it is Ready. An image still being created (Downloading, Creating)
    is left to its creation's finalizer, unless it lost every reference."""
    image = await ctx.tx.images.lock(image_uuid)
    if image is None:
        return
    refs = await ctx.tx.images.refs(image_uuid)
    if not refs:
        inventory = await image_inventory_of(ctx.tx, image_uuid)
        await ctx.tx.images.delete(image_uuid)
        await emit_deleted(ctx, image_uuid, inventory)
        return
    if image.status not in (ImageStatus.Ready, ImageStatus.Deleted):
        return
    if any(ref.status is RefStatus.Ready for ref in refs):
        target = ImageStatus.Ready
    elif all(ref.status is RefStatus.Deleted for ref in refs):
        target = ImageStatus.Deleted
    else:
        return
    if target is not image.status and await ctx.tx.images.set_status(
        uuid=image_uuid, status=target
    ):
        inventory = await image_inventory_of(ctx.tx, image_uuid)
        await emit_status(ctx, image_uuid, image.status, target, inventory)


def error_of(causes: list[dict[str, Any]], details: str) -> ApiError:
    """The error of an operation on several backup storages that failed on all of them: one
    cause keeps its own code, several are OPERATION_ERROR (PROTOCOL.md A.6)."""
    if len(causes) == 1:
        return ApiError(ErrorCode(causes[0]["code"]), causes[0]["details"] or "", causes)
    return ApiError(ErrorCode.OPERATION_ERROR, details, causes)


async def _causes(ctx: Ctx, message_id: str) -> list[dict[str, Any]]:
    return [c.to_reply() for c in await ctx.tx.ops.failures_for_message(message_id)]


async def _finalize_creation(ctx: Ctx, inbox: InboxRow) -> dict[str, Any]:
    """AddImage (and templates): Ready on the refs that succeeded, or gone when none did; a
    reference stored and then deleted under the Delay or Never policy keeps the image, Deleted."""
    api, image_uuid = inbox.api, inbox.image_uuid
    causes = await _causes(ctx, inbox.message_id)
    image = await ctx.tx.images.lock(image_uuid) if image_uuid else None
    if image is None or image_uuid is None:
        return error_reply(
            api,
            ApiError(
                ErrorCode.DOWNLOAD_FAILED, "the image was deleted before it was ready", causes
            ),
        )
    refs = await ctx.tx.images.refs(image_uuid)
    ready = any(ref.status is RefStatus.Ready for ref in refs)
    deleted = any(ref.status is RefStatus.Deleted for ref in refs)
    if ready or deleted:
        target = ImageStatus.Ready if ready else ImageStatus.Deleted
        if image.status not in (ImageStatus.Ready, ImageStatus.Deleted):
            # The first stored file describes the image, md5 and sha256 alike; the other
            # backup storages' results are not compared with it. An agent from before
            # contract section 9 reports no sha256Sum: the image then has none (NULL).
            first = (await ctx.tx.ops.successes_for_message(inbox.message_id))[0].result
            await ctx.tx.images.mark_stored(
                uuid=image_uuid,
                status=target,
                size=first["size"],
                actual_size=first["actualSize"],
                virtual_size=first["virtualSize"],
                md5_sum=first["md5Sum"],
                sha256_sum=first.get("sha256Sum"),
            )
            inventory = await image_inventory_of(ctx.tx, image_uuid)
            await emit_status(ctx, image_uuid, image.status, target, inventory)
        if not ready:
            return error_reply(
                api,
                ApiError(
                    ErrorCode.DOWNLOAD_FAILED,
                    "the image was deleted before it was ready; it is kept as Deleted"
                    " (RecoverImage, ExpungeImage)",
                    causes,
                ),
            )
        reply = success_reply(api, inventory=await image_inventory_of(ctx.tx, image_uuid))
        if causes:
            reply["causes"] = causes
        return reply
    # Nothing succeeded: no image record is left behind (refs cascade).
    inventory = await image_inventory_of(ctx.tx, image_uuid)
    await ctx.tx.images.delete(image_uuid)
    await emit_deleted(ctx, image_uuid, inventory)
    return error_reply(api, error_of(causes, "the image could not be added to any backup storage"))


async def _finalize_deletion(ctx: Ctx, inbox: InboxRow) -> dict[str, Any]:
    """DeleteImage: the image as left (Deleted under Delay and Never), or none when gone."""
    inventory = await image_inventory_of(ctx.tx, inbox.image_uuid) if inbox.image_uuid else None
    reply = success_reply(inbox.api)
    if inventory is not None:
        reply["inventory"] = inventory
    return reply


async def _finalize_expunge(ctx: Ctx, inbox: InboxRow) -> dict[str, Any]:
    """ExpungeImage: the image as left, or none once its last reference is gone. References
    that stay (Deleted, until their file is gone) are listed in `causes`: those whose backup
    storage is away, and those whose agent failed to remove the file (retried)."""
    reply = await _finalize_deletion(ctx, inbox)
    if inbox.image_uuid is None:
        return reply
    waiting: list[dict[str, Any]] = []
    for ref in await ctx.tx.images.refs(inbox.image_uuid):
        if ref.ref_op is None:
            continue
        bs = ref.backup_storage_uuid
        if ref.bs_status is not BackupStorageStatus.Connected:
            code = ErrorCode.INVALID_STATE
            details = (
                f"backup storage {bs} is {ref.bs_status}: its file is removed, and the"
                " reference with it, when it is Connected again"
            )
        else:
            failure = await ctx.tx.ops.pending_error(ref.ref_op)
            if failure is None:
                continue  # an expunge under way (another caller's, or the expunger's)
            code = ErrorCode.OPERATION_ERROR
            details = (
                f"backup storage {bs} could not remove the file ({failure[1] or failure[0]});"
                " it tries again, and the reference goes when the file is gone"
            )
        waiting.append({"backupStorageUuid": bs, "code": code.value, "details": details})
    if waiting:
        reply["causes"] = waiting
    return reply


async def _finalize_inspection(ctx: Ctx, inbox: InboxRow) -> dict[str, Any]:
    """RecoverImage and SyncImageSize: the image when at least one backup storage did it (with
    `causes` for the others), else the error."""
    causes = await _causes(ctx, inbox.message_id)
    done = await ctx.tx.ops.successes_for_message(inbox.message_id)
    inventory = await image_inventory_of(ctx.tx, inbox.image_uuid) if inbox.image_uuid else None
    if done and inventory is not None:
        reply = success_reply(inbox.api, inventory=inventory)
        if causes:
            reply["causes"] = causes
        return reply
    if not causes:
        return error_reply(
            inbox.api, ApiError(ErrorCode.RESOURCE_NOT_FOUND, "the image was expunged meanwhile")
        )
    what = "recovered" if inbox.api == "RecoverImage" else "measured"
    return error_reply(
        inbox.api, error_of(causes, f"the image could not be {what} on any backup storage")
    )


Finalizer = Callable[[Ctx, InboxRow], Awaitable[dict[str, Any]]]
FINALIZERS: dict[str, Finalizer] = {
    "AddImage": _finalize_creation,
    "CreateRootVolumeTemplateFromRootVolume": _finalize_creation,
    "CreateRootVolumeTemplateFromVolumeSnapshot": _finalize_creation,
    "CreateDataVolumeTemplateFromVolume": _finalize_creation,
    "DeleteImage": _finalize_deletion,
    "ExpungeImage": _finalize_expunge,
    "RecoverImage": _finalize_inspection,
    "SyncImageSize": _finalize_inspection,
}
