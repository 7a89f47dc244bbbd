"""The APIs that act on one existing image: delete, enable/disable, update, use as a source."""

from __future__ import annotations

from image_service import params
from image_service.api.creation import not_found
from image_service.errors import ApiError, ErrorCode
from image_service.events import emit_deleted, emit_state
from image_service.inventory import image_inventory_of
from image_service.lifecycle import BackupStorageStatus, ImageState, ImageStatus, OpKind, RefStatus
from image_service.operations import cancel_ops, schedule_delete
from image_service.pipeline import AWAIT_OPS, Ctx, Outcome
from image_service.settlement import settle_message
from image_service.store.rows import ImageRow

_CONNECTED = BackupStorageStatus.Connected


async def _image(ctx: Ctx, image_uuid: str) -> ImageRow:
    image = await ctx.tx.images.lock(image_uuid)
    if image is None:
        raise not_found("image", image_uuid)
    return image


async def delete_image(ctx: Ctx, p: params.DeleteImage) -> Outcome:
    image = await ctx.tx.images.lock(p.uuid)
    if image is None:
        return {}  # deletion is idempotent
    await ctx.tx.inbox.set_image(message_id=ctx.message_id, image_uuid=p.uuid)
    wanted = set(p.backupStorageUuids) if p.backupStorageUuids is not None else None
    targets = [
        r
        for r in await ctx.tx.images.refs(p.uuid)
        if wanted is None or r.backup_storage_uuid in wanted
    ]
    pending = [
        op
        for op in await ctx.tx.ops.pending_of_image(p.uuid)
        if op.kind is not OpKind.delete and (wanted is None or op.backup_storage_uuid in wanted)
    ]
    if p.deleteMode is params.DeleteMode.Permissive:
        if pending or image.status is not ImageStatus.Ready:
            raise ApiError(
                ErrorCode.INVALID_STATE,
                f"image {p.uuid} is still {image.status}; use deleteMode=Enforcing to cancel",
            )
        for ref in targets:
            if ref.bs_status is not _CONNECTED:
                raise ApiError(
                    ErrorCode.INVALID_STATE,
                    f"backup storage {ref.backup_storage_uuid} is {ref.bs_status}; "
                    "use deleteMode=Enforcing",
                )
    cancelled_messages = await cancel_ops(
        ctx,
        pending,
        ErrorCode.DOWNLOAD_FAILED,
        f"cancelled by DeleteImage (message {ctx.message_id})",
    )
    cancelled_bs = {op.backup_storage_uuid for op in pending}
    for ref in targets:
        if ref.backup_storage_uuid in cancelled_bs:
            continue  # cancel_ops already removed the ref and scheduled its file's removal
        await ctx.tx.images.delete_ref(
            image_uuid=p.uuid, backup_storage_uuid=ref.backup_storage_uuid
        )
        waits = ref.bs_status is _CONNECTED
        await schedule_delete(
            ctx,
            p.uuid,
            ref.backup_storage_uuid,
            ref.install_path,
            message_id=ctx.message_id if waits else None,
        )
    if not await ctx.tx.images.refs(p.uuid):
        inventory = await image_inventory_of(ctx.tx, p.uuid)
        await ctx.tx.images.delete(p.uuid)
        await emit_deleted(ctx, p.uuid, inventory)
    for message_id in cancelled_messages:
        await settle_message(ctx, message_id)
    return AWAIT_OPS


async def change_image_state(ctx: Ctx, p: params.ChangeImageState) -> Outcome:
    image = await _image(ctx, p.uuid)
    new_state = (
        ImageState.Enabled if p.stateEvent is params.StateEvent.enable else ImageState.Disabled
    )
    changed = await ctx.tx.images.change_state(uuid=p.uuid, state=new_state)
    inventory = await image_inventory_of(ctx.tx, p.uuid)
    if changed:
        await emit_state(ctx, p.uuid, image.state, new_state, inventory)
    return {"inventory": inventory}


async def update_image(ctx: Ctx, p: params.UpdateImage) -> Outcome:
    image = await _image(ctx, p.uuid)
    media_type = p.mediaType.value if p.mediaType is not None else image.media_type
    system = p.system if p.system is not None else image.system
    if (media_type == "ISO") != (image.format == "iso"):
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"mediaType: {media_type} does not fit an image of format {image.format}",
        )
    if media_type == "ISO" and system:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "system: an ISO cannot be a system image")
    await ctx.tx.images.update(
        uuid=p.uuid,
        name=p.name,
        description=p.description,
        guest_os_type=p.guestOsType,
        platform=p.platform.value if p.platform else None,
        media_type=p.mediaType.value if p.mediaType else None,
        system=p.system,
    )
    return {"inventory": await image_inventory_of(ctx.tx, p.uuid)}


PARAVIRTUAL_PLATFORMS = frozenset({"Linux", "Paravirtualization"})


async def get_image_source(ctx: Ctx, p: params.GetImageSource) -> Outcome:
    """Where a volume-creating service fetches an image from, and how the VM should use it."""
    image = await _image(ctx, p.uuid)
    if image.state is not ImageState.Enabled:
        raise ApiError(ErrorCode.INVALID_STATE, f"image {p.uuid} is Disabled")
    if image.status is not ImageStatus.Ready:
        raise ApiError(ErrorCode.INVALID_STATE, f"image {p.uuid} is {image.status}, not Ready")
    if image.system and not p.forSystemVm:
        raise ApiError(
            ErrorCode.INVALID_STATE, f"image {p.uuid} is a system image: appliance VMs only"
        )
    sources = [
        {
            "backupStorageUuid": ref.backup_storage_uuid,
            "hostname": ref.hostname,
            "installPath": ref.install_path,
        }
        for ref in await ctx.tx.images.refs(p.uuid)
        if ref.status is RefStatus.Ready and ref.bs_status is _CONNECTED
    ]
    if not sources:
        raise ApiError(
            ErrorCode.NO_BACKUP_STORAGE, f"no Connected backup storage holds image {p.uuid}"
        )
    return {
        "inventory": await image_inventory_of(ctx.tx, p.uuid),
        "sources": sources,
        "paravirtualization": image.platform in PARAVIRTUAL_PLATFORMS,
        # Volumes of raw images are qcow2 too: they are thin clones of the image (seed doc).
        "volumeFormat": "qcow2",
    }
