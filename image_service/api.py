"""API handlers: validated parameters in, a reply (or "wait for the agents") out.

A handler runs inside the message's transaction (`Ctx`), raises `ApiError` for every failure
a caller may see, and never touches the broker: what it wants published goes to the outbox.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from image_service import models
from image_service.errors import ApiError, ErrorCode
from image_service.lifecycle import (
    Status,
    backup_storage_inventory,
    user_tag_inventory,
)
from image_service.operations import (
    Ctx,
    cancel_ops,
    emit_deleted,
    emit_status,
    image_inventories,
    image_inventory_of,
    schedule_delete,
    settle_message,
)
from image_service.query import BACKUP_STORAGE, IMAGE, USER_TAG, Entity, compile_query


class AwaitOps:
    """Returned by a handler whose reply comes when its agent operations have finished."""


AWAIT_OPS = AwaitOps()
Outcome = dict[str, Any] | AwaitOps


def _not_found(kind: str, uuid_: str) -> ApiError:
    return ApiError(ErrorCode.RESOURCE_NOT_FOUND, f"{kind} {uuid_} does not exist")


def install_path(bs_url: str, image_uuid: str, name: str) -> str:
    """Where an image lives on a backup storage: `<root>/templates/<imageUuid>/<name>.template`
    (the seed's layout). `name` was validated to hold no path separator; it is cut to
    FILE_NAME_BYTES of UTF-8 so that the file name fits every Linux file system's 255-byte
    limit (the directory is the image's own, so a cut name cannot collide)."""
    stem = name.encode()[:FILE_NAME_BYTES].decode(errors="ignore")
    return f"{bs_url.rstrip('/')}/templates/{image_uuid}/{stem}.template"


FILE_NAME_BYTES = 200


def unusable_reason(bs: Any) -> tuple[ErrorCode, str] | None:
    """Why a backup storage cannot take a new image, or None when it can."""
    if bs["state"] != "Enabled":
        return ErrorCode.INVALID_STATE, f"backup storage {bs['uuid']} is Disabled"
    if bs["status"] != "Connected":
        return ErrorCode.INVALID_STATE, f"backup storage {bs['uuid']} is {bs['status']}"
    if bs["available_capacity"] <= 0:
        return ErrorCode.CAPACITY_EXCEEDED, f"backup storage {bs['uuid']} has no available capacity"
    return None


@dataclass(frozen=True, slots=True)
class NewImage:
    """An image record to create, and how each backup storage should produce its file."""

    uuid: str
    name: str
    description: str | None
    status: Status
    url: str
    media_type: str
    guest_os_type: str | None
    platform: str
    system: bool
    format: str
    expected_md5: str | None
    op_kind: str
    command: dict[str, Any]  # the agent command, less opId/backupStorageUuid/installPath


async def choose_backup_storages(
    ctx: Ctx, uuids: list[str] | None
) -> tuple[list[Any], list[tuple[str, ErrorCode, str]]]:
    """The usable backup storages among `uuids` (with the reasons the others are skipped), or,
    with `uuids` omitted, one usable backup storage chosen at random."""
    if uuids is None:
        candidates = [bs for bs in await ctx.tx.fetch("bs_all") if unusable_reason(bs) is None]
        if not candidates:
            raise ApiError(ErrorCode.NO_BACKUP_STORAGE, "no backup storage can take the image")
        return [random.choice(candidates)], []
    found = {row["uuid"]: row for row in await ctx.tx.fetch("bs_get_many", uuids)}
    for bs_uuid in uuids:
        if bs_uuid not in found:
            raise _not_found("backup storage", bs_uuid)
    usable: list[Any] = []
    skipped: list[tuple[str, ErrorCode, str]] = []
    for bs_uuid in uuids:
        reason = unusable_reason(found[bs_uuid])
        if reason is None:
            usable.append(found[bs_uuid])
        else:
            skipped.append((bs_uuid, *reason))
    if not usable:
        raise ApiError(
            ErrorCode.NO_BACKUP_STORAGE,
            "none of the backup storages can take the image",
            [{"backupStorageUuid": u, "code": c.value, "details": d} for u, c, d in skipped],
        )
    return usable, skipped


async def create_image(
    ctx: Ctx, image: NewImage, backup_storage_uuids: list[str] | None
) -> Outcome:
    """Record a new image and one op per backup storage; the reply waits for the agents."""
    usable, skipped = await choose_backup_storages(ctx, backup_storage_uuids)
    inserted = await ctx.tx.fetchrow(
        "image_insert",
        image.uuid,
        image.name,
        image.description,
        image.status.value,
        image.url,
        image.media_type,
        image.guest_os_type,
        image.platform,
        image.system,
        image.format,
        image.expected_md5,
        "zstack",
    )
    if inserted is None:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"resourceUuid: {image.uuid} already exists")
    await ctx.tx.execute("inbox_set_image", ctx.message_id, image.uuid)
    for bs_uuid, code, details in skipped:
        await ctx.tx.execute(
            "op_insert_failed",
            uuid.uuid4(),
            image.op_kind,
            ctx.message_id,
            image.uuid,
            bs_uuid,
            code.value,
            details,
        )
    for bs in usable:
        path = install_path(bs["url"], image.uuid, image.name)
        await ctx.tx.execute("ref_insert", image.uuid, bs["uuid"], path, image.status.value)
        op_id = uuid.uuid4()
        command = {
            **image.command,
            "opId": str(op_id),
            "imageUuid": image.uuid,
            "backupStorageUuid": bs["uuid"],
            "format": image.format,
            "installPath": path,
        }
        await ctx.tx.execute(
            "op_insert", op_id, image.op_kind, ctx.message_id, image.uuid, bs["uuid"], command
        )
        await ctx.outbox.command(bs["uuid"], command)
    inventory = await image_inventory_of(ctx.tx, image.uuid)
    await emit_status(ctx, image.uuid, None, image.status, inventory)
    return AWAIT_OPS


async def add_image(ctx: Ctx, p: models.AddImage) -> Outcome:
    scheme = p.url.split("://", 1)[0].lower()
    if scheme not in ("http", "https", "sftp"):
        raise ApiError(ErrorCode.URL_NOT_ALLOWED, f"url: scheme {scheme!r} is not supported")
    try:
        password = urlsplit(p.url).password
    except ValueError:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "url: not a valid URL") from None
    if password is not None:
        # The url is stored and shown in every inventory and event: a password in it would leak.
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            "url: a password in the URL is refused; sftp uses the agent's key, "
            "http(s) a URL that needs no credentials",
        )
    image = NewImage(
        uuid=p.resourceUuid or uuid.uuid4().hex,
        name=p.name,
        description=p.description,
        status=Status.Downloading,
        url=p.url,
        media_type=p.mediaType.value,
        guest_os_type=p.guestOsType,
        platform=p.platform.value,
        system=p.system,
        format=p.effective_format.value,
        expected_md5=p.md5Sum,
        op_kind="download",
        command={"command": "download", "url": p.url, "md5Sum": p.md5Sum},
    )
    return await create_image(ctx, image, p.backupStorageUuids)


TEMPLATE_FORMATS = frozenset({"qcow2", "raw"})


def _template_source(kind: str, row: Any) -> tuple[str, str]:
    """The source path and format of a volume or snapshot a template is made from."""
    path, fmt = row["install_path"], row["format"]
    if not path:
        raise ApiError(ErrorCode.INVALID_STATE, f"{kind} {row['uuid']} has no installPath")
    if fmt not in TEMPLATE_FORMATS:
        raise ApiError(
            ErrorCode.INVALID_STATE, f"{kind} {row['uuid']} has format {fmt!r}, not qcow2 or raw"
        )
    return str(path), str(fmt)


async def _create_template(
    ctx: Ctx,
    p: models.CreateTemplateParams,
    *,
    kind: str,
    source_uuid: str,
    media_type: str,
    root_volume_only: bool = False,
) -> Outcome:
    """A Creating image made from a volume (`kind` "volume") or a volume snapshot."""
    row = await ctx.tx.fetchrow("volume_get" if kind == "volume" else "snapshot_get", source_uuid)
    if row is None:
        raise _not_found(kind, source_uuid)
    if root_volume_only and row["type"] != "Root":
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"rootVolumeUuid: volume {source_uuid} is a {row['type']} volume, not Root",
        )
    path, fmt = _template_source(kind, row)
    scheme = "volume" if kind == "volume" else "volumeSnapshot"
    root = p if isinstance(p, models.CreateRootTemplateParams) else None
    image = NewImage(
        uuid=p.resourceUuid or uuid.uuid4().hex,
        name=p.name,
        description=p.description,
        status=Status.Creating,
        url=f"{scheme}://{source_uuid}",
        media_type=media_type,
        guest_os_type=root.guestOsType if root else None,
        platform=root.platform.value if root else models.Platform.Linux.value,
        system=root.system if root else False,
        format=fmt,
        expected_md5=None,
        op_kind="create",
        command={"command": "create", "source": path, "sourceFormat": fmt},
    )
    return await create_image(ctx, image, p.backupStorageUuids)


async def create_root_template_from_volume(
    ctx: Ctx, p: models.CreateRootVolumeTemplateFromRootVolume
) -> Outcome:
    return await _create_template(
        ctx,
        p,
        kind="volume",
        source_uuid=p.rootVolumeUuid,
        media_type="RootVolumeTemplate",
        root_volume_only=True,
    )


async def create_root_template_from_snapshot(
    ctx: Ctx, p: models.CreateRootVolumeTemplateFromVolumeSnapshot
) -> Outcome:
    return await _create_template(
        ctx,
        p,
        kind="volume snapshot",
        source_uuid=p.snapshotUuid,
        media_type="RootVolumeTemplate",
    )


async def create_data_template_from_volume(
    ctx: Ctx, p: models.CreateDataVolumeTemplateFromVolume
) -> Outcome:
    return await _create_template(
        ctx, p, kind="volume", source_uuid=p.volumeUuid, media_type="DataVolumeTemplate"
    )


async def delete_image(ctx: Ctx, p: models.DeleteImage) -> Outcome:
    image = await ctx.tx.fetchrow("image_lock", p.uuid)
    if image is None:
        return {}  # deletion is idempotent
    await ctx.tx.execute("inbox_set_image", ctx.message_id, p.uuid)
    refs = await ctx.tx.fetch("refs_of_image", p.uuid)
    wanted = set(p.backupStorageUuids) if p.backupStorageUuids is not None else None
    targets = [r for r in refs if wanted is None or r["backup_storage_uuid"] in wanted]
    pending = await ctx.tx.fetch("ops_pending_of_image", p.uuid)
    pending_on_targets = [
        op
        for op in pending
        if op["kind"] != "delete" and (wanted is None or op["backup_storage_uuid"] in wanted)
    ]
    if p.deleteMode is models.DeleteMode.Permissive:
        if pending_on_targets or image["status"] != Status.Ready:
            raise ApiError(
                ErrorCode.INVALID_STATE,
                f"image {p.uuid} is still {image['status']}; use deleteMode=Enforcing to cancel",
            )
        for ref in targets:
            if ref["bs_status"] != "Connected":
                raise ApiError(
                    ErrorCode.INVALID_STATE,
                    f"backup storage {ref['backup_storage_uuid']} is {ref['bs_status']}; "
                    "use deleteMode=Enforcing",
                )
    cancelled_messages = await cancel_ops(
        ctx,
        pending_on_targets,
        ErrorCode.DOWNLOAD_FAILED,
        f"cancelled by DeleteImage (message {ctx.message_id})",
    )
    cancelled_bs = {op["backup_storage_uuid"] for op in pending_on_targets}
    for ref in targets:
        if ref["backup_storage_uuid"] in cancelled_bs:
            continue  # cancel_ops already removed the ref and scheduled its file's removal
        await ctx.tx.fetchrow("ref_delete", p.uuid, ref["backup_storage_uuid"])
        waits = ref["bs_status"] == "Connected"
        await schedule_delete(
            ctx,
            p.uuid,
            ref["backup_storage_uuid"],
            ref["install_path"],
            message_id=ctx.message_id if waits else None,
        )
    remaining = await ctx.tx.fetch("refs_of_image", p.uuid)
    if not remaining:
        inventory = await image_inventory_of(ctx.tx, p.uuid)
        await ctx.tx.fetchrow("image_delete", p.uuid)
        await emit_deleted(ctx, p.uuid, inventory)
    for message_id in cancelled_messages:
        await settle_message(ctx, message_id)
    return AWAIT_OPS


async def change_image_state(ctx: Ctx, p: models.ChangeImageState) -> Outcome:
    image = await ctx.tx.fetchrow("image_lock", p.uuid)
    if image is None:
        raise _not_found("image", p.uuid)
    new_state = "Enabled" if p.stateEvent is models.StateEvent.enable else "Disabled"
    changed = await ctx.tx.fetchrow("image_change_state", p.uuid, new_state)
    inventory = await image_inventory_of(ctx.tx, p.uuid)
    if changed is not None:
        await ctx.outbox.event(
            f"image.state.{p.uuid}",
            {
                "uuid": p.uuid,
                "oldState": image["state"],
                "newState": new_state,
                "inventory": inventory,
            },
        )
    return {"inventory": inventory}


async def update_image(ctx: Ctx, p: models.UpdateImage) -> Outcome:
    image = await ctx.tx.fetchrow("image_lock", p.uuid)
    if image is None:
        raise _not_found("image", p.uuid)
    media_type = p.mediaType.value if p.mediaType is not None else image["media_type"]
    system = p.system if p.system is not None else image["system"]
    if (media_type == "ISO") != (image["format"] == "iso"):
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"mediaType: {media_type} does not fit an image of format {image['format']}",
        )
    if media_type == "ISO" and system:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "system: an ISO cannot be a system image")
    await ctx.tx.fetchrow(
        "image_update",
        p.uuid,
        p.name,
        p.description,
        p.guestOsType,
        p.platform.value if p.platform else None,
        p.mediaType.value if p.mediaType else None,
        p.system,
    )
    return {"inventory": await image_inventory_of(ctx.tx, p.uuid)}


PARAVIRTUAL_PLATFORMS = frozenset({"Linux", "Paravirtualization"})


async def get_image_source(ctx: Ctx, p: models.GetImageSource) -> Outcome:
    """Where a volume-creating service fetches an image from, and how the VM should use it."""
    image = await ctx.tx.fetchrow("image_lock", p.uuid)
    if image is None:
        raise _not_found("image", p.uuid)
    if image["state"] != "Enabled":
        raise ApiError(ErrorCode.INVALID_STATE, f"image {p.uuid} is Disabled")
    if image["status"] != Status.Ready:
        raise ApiError(ErrorCode.INVALID_STATE, f"image {p.uuid} is {image['status']}, not Ready")
    if image["system"] and not p.forSystemVm:
        raise ApiError(
            ErrorCode.INVALID_STATE, f"image {p.uuid} is a system image: appliance VMs only"
        )
    sources = [
        {
            "backupStorageUuid": ref["backup_storage_uuid"],
            "hostname": ref["hostname"],
            "installPath": ref["install_path"],
        }
        for ref in await ctx.tx.fetch("refs_of_image", p.uuid)
        if ref["status"] == Status.Ready and ref["bs_status"] == "Connected"
    ]
    if not sources:
        raise ApiError(
            ErrorCode.NO_BACKUP_STORAGE, f"no Connected backup storage holds image {p.uuid}"
        )
    return {
        "inventory": await image_inventory_of(ctx.tx, p.uuid),
        "sources": sources,
        "paravirtualization": image["platform"] in PARAVIRTUAL_PLATFORMS,
        # Volumes of raw images are qcow2 too: they are thin clones of the image (seed doc).
        "volumeFormat": "qcow2",
    }


def _project(inventories: list[dict[str, Any]], fields: tuple[str, ...] | None) -> list[Any]:
    if fields is None:
        return inventories
    return [{k: inv[k] for k in fields if k in inv} for inv in inventories]


async def _query(
    ctx: Ctx,
    entity: Entity,
    p: models.Query,
    load: Callable[[list[str]], Awaitable[list[dict[str, Any]]]],
) -> Outcome:
    compiled = compile_query(entity, p)
    reply: dict[str, Any] = {}
    if p.count or p.replyWithCount:
        reply["total"] = await ctx.tx.fetchval_sql(compiled.count_sql, compiled.count_args)
    if not p.count:
        keys = [row[0] for row in await ctx.tx.fetch_sql(compiled.select_sql, compiled.args)]
        reply["inventories"] = _project(await load(keys), compiled.fields)
    else:
        reply["inventories"] = []
    return reply


async def query_image(ctx: Ctx, p: models.Query) -> Outcome:
    return await _query(ctx, IMAGE, p, lambda keys: image_inventories(ctx.tx, keys))


async def _load_rows(
    ctx: Ctx, query_name: str, keys: list[str], convert: Callable[[Any], dict[str, Any]]
) -> list[dict[str, Any]]:
    rows = {row["uuid"]: convert(row) for row in await ctx.tx.fetch(query_name, keys)}
    return [rows[k] for k in keys if k in rows]


async def query_backup_storage(ctx: Ctx, p: models.Query) -> Outcome:
    return await _query(
        ctx,
        BACKUP_STORAGE,
        p,
        lambda keys: _load_rows(ctx, "bs_inventories", keys, backup_storage_inventory),
    )


async def query_user_tag(ctx: Ctx, p: models.Query) -> Outcome:
    return await _query(
        ctx, USER_TAG, p, lambda keys: _load_rows(ctx, "tag_inventories", keys, user_tag_inventory)
    )


async def change_backup_storage_state(ctx: Ctx, p: models.ChangeBackupStorageState) -> Outcome:
    bs = await ctx.tx.fetchrow("bs_lock", p.uuid)
    if bs is None:
        raise _not_found("backup storage", p.uuid)
    new_state = "Enabled" if p.stateEvent is models.StateEvent.enable else "Disabled"
    await ctx.tx.fetchrow("bs_change_state", p.uuid, new_state)
    rows = await ctx.tx.fetch("bs_inventories", [p.uuid])
    return {"inventory": backup_storage_inventory(rows[0])}


async def delete_backup_storage(ctx: Ctx, p: models.DeleteBackupStorage) -> Outcome:
    bs = await ctx.tx.fetchrow("bs_lock", p.uuid)
    if bs is None:
        return {}
    # Downloads in flight there fail; their callers are answered in this transaction.
    waiting: list[str] = []
    for op in await ctx.tx.fetch("ops_pending_of_bs", p.uuid):
        await ctx.tx.fetchrow("image_lock", op["image_uuid"])
        waiting += await cancel_ops(
            ctx,
            [op],
            ErrorCode.OPERATION_ERROR,
            f"backup storage {p.uuid} was deleted",
            remove_files=False,
        )
        if op["kind"] == "delete":
            await ctx.tx.fetchrow(
                "op_finish",
                op["op_id"],
                "Failed",
                None,
                "OPERATION_ERROR",
                "backup storage deleted",
            )
            if op["message_id"]:
                waiting.append(op["message_id"])
    for ref in await ctx.tx.fetch("refs_of_bs", p.uuid):
        await ctx.tx.fetchrow("image_lock", ref["image_uuid"])
        await ctx.tx.fetchrow("ref_delete", ref["image_uuid"], p.uuid)
        if not await ctx.tx.fetch("refs_of_image", ref["image_uuid"]):
            inventory = await image_inventory_of(ctx.tx, ref["image_uuid"])
            await ctx.tx.fetchrow("image_delete", ref["image_uuid"])
            await emit_deleted(ctx, ref["image_uuid"], inventory)
    await ctx.tx.execute("bs_tombstone", p.uuid)
    await ctx.tx.fetchrow("bs_delete", p.uuid)
    for message_id in waiting:
        await settle_message(ctx, message_id)
    return {}


async def create_user_tag(ctx: Ctx, p: models.CreateUserTag) -> Outcome:
    if await ctx.tx.fetchrow("image_lock", p.resourceUuid) is None:
        raise _not_found("image", p.resourceUuid)
    row = await ctx.tx.fetchrow("tag_insert", uuid.uuid4().hex, p.resourceUuid, p.tag)
    return {"inventory": user_tag_inventory(row)}


async def delete_tag(ctx: Ctx, p: models.DeleteTag) -> Outcome:
    await ctx.tx.fetchrow("tag_delete", p.uuid)
    return {}


@dataclass(frozen=True, slots=True)
class Api:
    model: type[BaseModel]
    handler: Callable[[Ctx, Any], Awaitable[Outcome]]
    # Reads only: its reply is stored with the message id and published directly after the
    # commit (no outbox, no durable flush), see ImageService.on_read_only.
    read_only: bool = False


APIS: dict[str, Api] = {
    "AddImage": Api(models.AddImage, add_image),
    "DeleteImage": Api(models.DeleteImage, delete_image),
    "ChangeImageState": Api(models.ChangeImageState, change_image_state),
    "UpdateImage": Api(models.UpdateImage, update_image),
    "QueryImage": Api(models.Query, query_image, read_only=True),
    "GetImageSource": Api(models.GetImageSource, get_image_source),
    "CreateRootVolumeTemplateFromRootVolume": Api(
        models.CreateRootVolumeTemplateFromRootVolume, create_root_template_from_volume
    ),
    "CreateRootVolumeTemplateFromVolumeSnapshot": Api(
        models.CreateRootVolumeTemplateFromVolumeSnapshot, create_root_template_from_snapshot
    ),
    "CreateDataVolumeTemplateFromVolume": Api(
        models.CreateDataVolumeTemplateFromVolume, create_data_template_from_volume
    ),
    "QueryBackupStorage": Api(models.Query, query_backup_storage, read_only=True),
    "ChangeBackupStorageState": Api(models.ChangeBackupStorageState, change_backup_storage_state),
    "DeleteBackupStorage": Api(models.DeleteBackupStorage, delete_backup_storage),
    "CreateUserTag": Api(models.CreateUserTag, create_user_tag),
    "DeleteTag": Api(models.DeleteTag, delete_tag),
    "QueryUserTag": Api(models.Query, query_user_tag, read_only=True),
}
