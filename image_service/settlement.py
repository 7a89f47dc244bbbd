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
from image_service.lifecycle import ImageStatus, RefStatus
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


async def _finalize_creation(ctx: Ctx, inbox: InboxRow) -> dict[str, Any]:
    """AddImage (and templates): Ready on the refs that succeeded, or gone when none did."""
    api, image_uuid = inbox.api, inbox.image_uuid
    causes = [c.to_reply() for c in await ctx.tx.ops.failures_for_message(inbox.message_id)]
    image = await ctx.tx.images.lock(image_uuid) if image_uuid else None
    if image is None or image_uuid is None:
        return error_reply(
            api,
            ApiError(
                ErrorCode.DOWNLOAD_FAILED, "the image was deleted before it was ready", causes
            ),
        )
    refs = await ctx.tx.images.refs(image_uuid)
    if any(ref.status is RefStatus.Ready for ref in refs):
        if image.status is not ImageStatus.Ready:
            # The first stored file describes the image, md5 and sha256 alike; the other
            # backup storages' results are not compared with it. An agent from before
            # contract section 9 reports no sha256Sum: the image then has none (NULL).
            first = (await ctx.tx.ops.successes_for_message(inbox.message_id))[0].result
            await ctx.tx.images.mark_ready(
                uuid=image_uuid,
                size=first["size"],
                actual_size=first["actualSize"],
                virtual_size=first["virtualSize"],
                md5_sum=first["md5Sum"],
                sha256_sum=first.get("sha256Sum"),
            )
        inventory = await image_inventory_of(ctx.tx, image_uuid)
        if image.status is not ImageStatus.Ready:
            await emit_status(ctx, image_uuid, image.status, ImageStatus.Ready, inventory)
        reply = success_reply(api, inventory=inventory)
        if causes:
            reply["causes"] = causes
        return reply
    # Nothing succeeded: no image record is left behind (refs cascade).
    inventory = await image_inventory_of(ctx.tx, image_uuid)
    await ctx.tx.images.delete(image_uuid)
    await emit_deleted(ctx, image_uuid, inventory)
    codes = {c["code"] for c in causes}
    if len(causes) == 1 and len(codes) == 1:
        error = ApiError(ErrorCode(causes[0]["code"]), causes[0]["details"] or "", causes)
    else:
        error = ApiError(
            ErrorCode.OPERATION_ERROR, "the image could not be added to any backup storage", causes
        )
    return error_reply(api, error)


async def _finalize_deletion(ctx: Ctx, inbox: InboxRow) -> dict[str, Any]:
    inventory = await image_inventory_of(ctx.tx, inbox.image_uuid) if inbox.image_uuid else None
    reply = success_reply(inbox.api)
    if inventory is not None:
        reply["inventory"] = inventory
    return reply


Finalizer = Callable[[Ctx, InboxRow], Awaitable[dict[str, Any]]]
FINALIZERS: dict[str, Finalizer] = {
    "AddImage": _finalize_creation,
    "CreateRootVolumeTemplateFromRootVolume": _finalize_creation,
    "CreateRootVolumeTemplateFromVolumeSnapshot": _finalize_creation,
    "CreateDataVolumeTemplateFromVolume": _finalize_creation,
    "DeleteImage": _finalize_deletion,
}
