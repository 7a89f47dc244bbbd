"""Agent operations and the callers waiting for them.

An API that needs agents (AddImage, DeleteImage) records one `op` row per backup storage
and leaves its inbox row without a reply. Each agent result finishes its op with a guarded
update; when a message has no Pending op left, `settle_message` builds its reply. Every
function here runs inside the caller's transaction and takes the image row lock first, so
that concurrent results of one image (possibly in two service replicas) serialise.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from image_service.errors import ApiError, ErrorCode
from image_service.lifecycle import Status, allowed_from, image_inventory
from image_service.models import AgentResult
from image_service.outbox import Outbox
from image_service.store import Record, Tx

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ctx:
    """What a handler works with: one transaction, its outbox, and the message being run."""

    tx: Tx
    outbox: Outbox
    message_id: str


async def image_inventories(tx: Tx, uuids: list[str]) -> list[dict[str, Any]]:
    """Inventories of `uuids`, in that order (missing ones are skipped)."""
    rows = await tx.fetch("image_inventories", uuids)
    by_uuid = {row["uuid"]: image_inventory(row) for row in rows}
    return [by_uuid[u] for u in uuids if u in by_uuid]


async def image_inventory_of(tx: Tx, image_uuid: str) -> dict[str, Any] | None:
    found = await image_inventories(tx, [image_uuid])
    return found[0] if found else None


async def emit_status(
    ctx: Ctx, image_uuid: str, old: str | None, new: str, inventory: dict[str, Any] | None
) -> None:
    await ctx.outbox.event(
        f"image.status.{image_uuid}",
        {"uuid": image_uuid, "oldStatus": old, "newStatus": new, "inventory": inventory},
    )


async def emit_deleted(ctx: Ctx, image_uuid: str, inventory: dict[str, Any] | None) -> None:
    await ctx.outbox.event(
        f"image.deleted.{image_uuid}", {"uuid": image_uuid, "inventory": inventory}
    )


async def finish_message(ctx: Ctx, message_id: str, body: dict[str, Any]) -> None:
    """Store the final reply of `message_id` and send it to its caller and any waiters."""
    row = await ctx.tx.fetchrow("inbox_finish", message_id, body)
    if row is None:
        return  # already finished: a duplicate completion, nothing to send twice
    targets: list[tuple[str, str | None]] = []
    if row["reply_to"]:
        targets.append((row["reply_to"], row["correlation_id"]))
    for waiter in await ctx.tx.fetch("inbox_waiters", message_id):
        targets.append((waiter["reply_to"], waiter["correlation_id"]))
    if not targets:
        log.info("message %s finished without reply_to: %s", message_id, _summary(body))
    for reply_to, correlation_id in targets:
        await ctx.outbox.reply(reply_to, correlation_id, body)


def _summary(body: dict[str, Any]) -> str:
    if body.get("success"):
        return "success"
    error = body.get("error") or {}
    return f"{error.get('code')}: {error.get('details')}"


def success_reply(api: str, **fields: Any) -> dict[str, Any]:
    return {"success": True, "api": api, **fields}


def error_reply(api: str | None, error: ApiError) -> dict[str, Any]:
    return {"success": False, "api": api, "error": error.to_error()}


# --- settling a message once its operations are done -------------------------------------


async def _causes(tx: Tx, message_id: str) -> list[dict[str, Any]]:
    return [
        {
            "backupStorageUuid": row["backup_storage_uuid"],
            "code": row["error_code"],
            "details": row["error_details"],
        }
        for row in await tx.fetch("ops_failed_for_message", message_id)
    ]


async def _finalize_creation(ctx: Ctx, inbox: Record) -> dict[str, Any]:
    """AddImage (and templates): Ready on the refs that succeeded, or gone when none did."""
    api, image_uuid = inbox["api"], inbox["image_uuid"]
    causes = await _causes(ctx.tx, inbox["message_id"])
    image = await ctx.tx.fetchrow("image_lock", image_uuid) if image_uuid else None
    if image is None:
        return error_reply(
            api,
            ApiError(
                ErrorCode.DOWNLOAD_FAILED, "the image was deleted before it was ready", causes
            ),
        )
    refs = await ctx.tx.fetch("refs_of_image", image_uuid)
    if any(ref["status"] == Status.Ready for ref in refs):
        if image["status"] != Status.Ready:
            successes = await ctx.tx.fetch("ops_succeeded_for_message", inbox["message_id"])
            result = successes[0]["result"]
            await ctx.tx.fetchrow(
                "image_mark_ready",
                image_uuid,
                result["size"],
                result["actualSize"],
                result["virtualSize"],
                result["md5Sum"],
                allowed_from(Status.Ready),
            )
        inventory = await image_inventory_of(ctx.tx, image_uuid)
        if image["status"] != Status.Ready:
            await emit_status(ctx, image_uuid, image["status"], Status.Ready, inventory)
        reply = success_reply(api, inventory=inventory)
        if causes:
            reply["causes"] = causes
        return reply
    # Nothing succeeded: no image record is left behind (refs cascade).
    inventory = await image_inventory_of(ctx.tx, image_uuid)
    await ctx.tx.fetchrow("image_delete", image_uuid)
    await emit_deleted(ctx, image_uuid, inventory)
    codes = {c["code"] for c in causes}
    if len(causes) == 1 and len(codes) == 1:
        error = ApiError(ErrorCode(causes[0]["code"]), causes[0]["details"] or "", causes)
    else:
        error = ApiError(
            ErrorCode.OPERATION_ERROR, "the image could not be added to any backup storage", causes
        )
    return error_reply(api, error)


async def _finalize_deletion(ctx: Ctx, inbox: Record) -> dict[str, Any]:
    inventory = (
        await image_inventory_of(ctx.tx, inbox["image_uuid"]) if inbox["image_uuid"] else None
    )
    reply = success_reply(inbox["api"])
    if inventory is not None:
        reply["inventory"] = inventory
    return reply


Finalizer = Callable[[Ctx, Record], Awaitable[dict[str, Any]]]
FINALIZERS: dict[str, Finalizer] = {
    "AddImage": _finalize_creation,
    "CreateRootVolumeTemplateFromRootVolume": _finalize_creation,
    "CreateRootVolumeTemplateFromVolumeSnapshot": _finalize_creation,
    "CreateDataVolumeTemplateFromVolume": _finalize_creation,
    "DeleteImage": _finalize_deletion,
}


async def settle_message(ctx: Ctx, message_id: str | None) -> None:
    """Reply to `message_id` if none of its operations is still Pending."""
    if message_id is None:
        return
    inbox = await ctx.tx.fetchrow("inbox_lock", message_id)
    if inbox is None or inbox["reply"] is not None:
        return
    if await ctx.tx.fetchval("ops_count_pending_for_message", message_id) > 0:
        return
    finalizer = FINALIZERS.get(inbox["api"])
    if finalizer is None:
        log.error("no finalizer for %s (message %s)", inbox["api"], message_id)
        return
    await finish_message(ctx, message_id, await finalizer(ctx, inbox))


# --- agent results ----------------------------------------------------------------------


async def schedule_delete(
    ctx: Ctx,
    image_uuid: str,
    backup_storage_uuid: str,
    install_path: str,
    *,
    message_id: str | None,
    cancel_op_ids: list[str] | None = None,
) -> None:
    """Record and send a delete of one file; the reconciler re-sends it until it is done."""
    op_id = str(uuid.uuid4())
    command = {
        "command": "delete",
        "opId": op_id,
        "imageUuid": image_uuid,
        "backupStorageUuid": backup_storage_uuid,
        "installPath": install_path,
        "cancelOpIds": cancel_op_ids or [],
    }
    await ctx.tx.execute(
        "op_insert",
        uuid.UUID(op_id),
        "delete",
        message_id,
        image_uuid,
        backup_storage_uuid,
        command,
    )
    await ctx.outbox.command(backup_storage_uuid, command)


async def apply_result(ctx: Ctx, result: AgentResult) -> None:
    """Apply one agent result. Zero rows from a guard means it is stale or a duplicate."""
    try:
        op_id = uuid.UUID(result.opId)
    except ValueError:
        log.warning("result with a malformed op id %r dropped", result.opId)
        return
    op = await ctx.tx.fetchrow("op_get", op_id)
    if op is None:
        log.warning("result for unknown op %s dropped", op_id)
        return
    if op["backup_storage_uuid"] != result.backupStorageUuid:
        log.warning("result for op %s from the wrong backup storage dropped", op_id)
        return
    image_uuid = op["image_uuid"]
    await ctx.tx.fetchrow("image_lock", image_uuid)  # serialise with other work on this image
    if op["kind"] == "delete" and not result.success:
        # Keep the delete Pending so the reconciler retries it; release the waiting caller.
        await ctx.tx.fetchrow("op_note_failure", op_id, result.code, result.details)
        log.warning("delete op %s failed on the agent (%s); will retry", op_id, result.details)
        await settle_message(ctx, op["message_id"])
        return
    finished = await ctx.tx.fetchrow(
        "op_finish",
        op_id,
        "Succeeded" if result.success else "Failed",
        result.model_dump(),
        None if result.success else _result_code(result),
        None if result.success else (result.details or "failed on the agent"),
    )
    if finished is None:
        await _drop_stale(ctx, op, result)
        return
    if op["kind"] in ("download", "create"):
        if result.success:
            ref = await ctx.tx.fetchrow(
                "ref_mark_ready",
                image_uuid,
                result.backupStorageUuid,
                result.installPath,
                allowed_from(Status.Ready),
            )
            if ref is None:
                await _drop_stale(ctx, op, result)
        else:
            await ctx.tx.fetchrow("ref_delete", image_uuid, result.backupStorageUuid)
    await settle_message(ctx, op["message_id"])


def _result_code(result: AgentResult) -> str:
    try:
        return ErrorCode(result.code or "").value
    except ValueError:
        return ErrorCode.OPERATION_ERROR.value


async def _drop_stale(ctx: Ctx, op: Record, result: AgentResult) -> None:
    """A late success for work that was cancelled: its file must not stay on disk."""
    log.info("stale result for op %s (%s) ignored", op["op_id"], op["kind"])
    if op["kind"] == "delete" or not result.success or not result.installPath:
        return
    kept = await ctx.tx.fetchrow("ref_of_path_exists", result.backupStorageUuid, result.installPath)
    if kept is None:
        await schedule_delete(
            ctx, op["image_uuid"], result.backupStorageUuid, result.installPath, message_id=None
        )


async def cancel_ops(
    ctx: Ctx, ops: list[Record], code: ErrorCode, details: str, *, remove_files: bool = True
) -> list[str]:
    """Fail the Pending download/create ops in `ops` and remove their refs and partial files.

    Returns the message ids that were waiting on them (to be settled by the caller once the
    rest of its transaction is done)."""
    messages: list[str] = []
    for op in ops:
        if op["kind"] == "delete":
            continue
        finished = await ctx.tx.fetchrow(
            "op_finish", op["op_id"], "Failed", None, code.value, details
        )
        if finished is None:
            continue
        ref = await ctx.tx.fetchrow("ref_delete", op["image_uuid"], op["backup_storage_uuid"])
        if remove_files:
            path = ref["install_path"] if ref else op["command"].get("installPath", "")
            await schedule_delete(
                ctx,
                op["image_uuid"],
                op["backup_storage_uuid"],
                path,
                message_id=None,
                cancel_op_ids=[str(op["op_id"])],
            )
        if op["message_id"]:
            messages.append(op["message_id"])
    return messages


async def backup_storage_disconnected(ctx: Ctx, backup_storage_uuid: str) -> None:
    """An agent missed its heartbeats: fail its downloads (their callers get a reply now) and
    let its deletes wait for it without holding their callers."""
    for op in await ctx.tx.fetch("ops_pending_of_bs", backup_storage_uuid):
        await ctx.tx.fetchrow("image_lock", op["image_uuid"])
        if op["kind"] == "delete":
            await ctx.tx.execute("op_detach_message", op["op_id"])
            await settle_message(ctx, op["message_id"])
            continue
        for message_id in await cancel_ops(
            ctx,
            [op],
            ErrorCode.DOWNLOAD_FAILED,
            "the backup storage disconnected before the image was stored",
        ):
            await settle_message(ctx, message_id)
