"""The APIs that act on one existing image: delete, expunge, recover, re-measure,
enable/disable, update, use as a source."""

from __future__ import annotations

from image_service import params
from image_service.api.creation import not_found
from image_service.deletion import schedule_delete, start_expunge, start_inspection
from image_service.errors import ApiError, ErrorCode
from image_service.events import emit_state
from image_service.globalconfig import DELETED_CHANNEL, DeletionPolicy, deletion_policy
from image_service.inventory import image_inventory_of
from image_service.lifecycle import BackupStorageStatus, ImageState, ImageStatus, OpKind, RefStatus
from image_service.operations import CREATION, cancel_ops
from image_service.pipeline import AWAIT_OPS, Ctx, Outcome
from image_service.settlement import settle_image, settle_message
from image_service.store.rows import ImageRow, RefRow

_CONNECTED = BackupStorageStatus.Connected


async def _image(ctx: Ctx, image_uuid: str) -> ImageRow:
    image = await ctx.tx.images.lock(image_uuid)
    if image is None:
        raise not_found("image", image_uuid)
    return image


def _refuse_deleted(image: ImageRow) -> None:
    if image.status is ImageStatus.Deleted:
        raise ApiError(
            ErrorCode.INVALID_STATE,
            f"image {image.uuid} is Deleted; RecoverImage brings it back",
        )


async def delete_image(ctx: Ctx, p: params.DeleteImage) -> Outcome:
    """Section 4's DeleteImage, under the deletion policy of section 10: Direct removes the
    named references and their files; Delay and Never mark them Deleted and keep the files.
    Either way, downloads still running there are cancelled (Enforcing) and their references
    removed, and a reference that is Deleted already is left as it is."""
    image = await ctx.tx.images.lock(p.uuid)
    if image is None:
        return {}  # deletion is idempotent
    await ctx.tx.inbox.set_image(message_id=ctx.message_id, image_uuid=p.uuid)
    policy = await deletion_policy(ctx.tx)
    wanted = set(p.backupStorageUuids) if p.backupStorageUuids is not None else None
    targets = [
        r
        for r in await ctx.tx.images.refs(p.uuid)
        if (wanted is None or r.backup_storage_uuid in wanted) and r.status is not RefStatus.Deleted
    ]
    pending = [
        op
        for op in await ctx.tx.ops.pending_of_image(p.uuid)
        if op.kind in CREATION and (wanted is None or op.backup_storage_uuid in wanted)
    ]
    if p.deleteMode is params.DeleteMode.Permissive:
        if pending or image.status in (ImageStatus.Downloading, ImageStatus.Creating):
            raise ApiError(
                ErrorCode.INVALID_STATE,
                f"image {p.uuid} is still {image.status}; use deleteMode=Enforcing to cancel",
            )
        for ref in targets:
            # Only a Direct delete needs the holder now: Delay and Never keep the file.
            if policy is DeletionPolicy.Direct and ref.bs_status is not _CONNECTED:
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
        if policy is not DeletionPolicy.Direct:
            await ctx.tx.images.mark_ref_deleted(
                image_uuid=p.uuid,
                backup_storage_uuid=ref.backup_storage_uuid,
                channel=DELETED_CHANNEL,
            )
            continue
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
    await settle_image(ctx, p.uuid)
    for message_id in cancelled_messages:
        await settle_message(ctx, message_id)
    return AWAIT_OPS


def _deleted_targets(image: ImageRow, refs: list[RefRow], named: list[str] | None) -> list[RefRow]:
    """The Deleted references an expunge or a recovery acts on: the named ones (each must
    exist, be Deleted and not be worked on already), or every Deleted one not worked on."""
    if named is None:
        targets = [r for r in refs if r.status is RefStatus.Deleted and r.ref_op is None]
        if not targets:
            busy = any(r.status is RefStatus.Deleted for r in refs)
            raise ApiError(
                ErrorCode.INVALID_STATE,
                f"image {image.uuid} has no Deleted reference"
                + (" that is not being expunged or recovered already" if busy else ""),
            )
        return targets
    by_bs = {r.backup_storage_uuid: r for r in refs}
    targets = []
    for bs_uuid in named:
        ref = by_bs.get(bs_uuid)
        if ref is None:
            raise ApiError(
                ErrorCode.RESOURCE_NOT_FOUND,
                f"image {image.uuid} has no reference on backup storage {bs_uuid}",
            )
        if ref.status is not RefStatus.Deleted:
            raise ApiError(
                ErrorCode.INVALID_STATE,
                f"image {image.uuid} is {ref.status} on backup storage {bs_uuid}, not Deleted",
            )
        if ref.ref_op is not None:
            raise ApiError(
                ErrorCode.INVALID_STATE,
                f"image {image.uuid} is being expunged or recovered on backup storage {bs_uuid}"
                " already",
            )
        targets.append(ref)
    return targets


async def expunge_image(ctx: Ctx, p: params.ExpungeImage) -> Outcome:
    """Remove Deleted references and their files now. A reference goes when its agent has
    confirmed the removal; one whose backup storage is away waits for it (the reply does not)."""
    image = await _image(ctx, p.uuid)
    await ctx.tx.inbox.set_image(message_id=ctx.message_id, image_uuid=p.uuid)
    refs = await ctx.tx.images.refs(p.uuid)
    for ref in _deleted_targets(image, refs, p.backupStorageUuids):
        waits = ref.bs_status is _CONNECTED
        await start_expunge(
            ctx, p.uuid, ref.backup_storage_uuid, message_id=ctx.message_id if waits else None
        )
    return AWAIT_OPS


async def recover_image(ctx: Ctx, p: params.RecoverImage) -> Outcome:
    """Turn Deleted references Ready again once their agents confirm each file is whole."""
    image = await _image(ctx, p.uuid)
    if image.status in (ImageStatus.Downloading, ImageStatus.Creating):
        # Its checksums are recorded when its creation ends: nothing to compare files with yet.
        raise ApiError(ErrorCode.INVALID_STATE, f"image {p.uuid} is still {image.status}")
    await ctx.tx.inbox.set_image(message_id=ctx.message_id, image_uuid=p.uuid)
    refs = await ctx.tx.images.refs(p.uuid)
    for ref in _deleted_targets(image, refs, p.backupStorageUuids):
        if ref.bs_status is not _CONNECTED:
            await ctx.tx.ops.insert_failed(
                kind=OpKind.inspect,
                message_id=ctx.message_id,
                image_uuid=p.uuid,
                backup_storage_uuid=ref.backup_storage_uuid,
                error_code=ErrorCode.INVALID_STATE.value,
                error_details=f"backup storage {ref.backup_storage_uuid} is {ref.bs_status}:"
                " its file cannot be checked now",
            )
            continue
        await start_inspection(ctx, image, ref, message_id=ctx.message_id, recover=True)
    return AWAIT_OPS


async def sync_image_size(ctx: Ctx, p: params.SyncImageSize) -> Outcome:
    """Re-measure the image's file on a Connected holder of a Ready reference. A Deleted file
    is outside every guarantee until RecoverImage has checked it: it is never measured."""
    image = await _image(ctx, p.uuid)
    _refuse_deleted(image)
    if image.status is not ImageStatus.Ready:
        raise ApiError(ErrorCode.INVALID_STATE, f"image {p.uuid} is still {image.status}")
    await ctx.tx.inbox.set_image(message_id=ctx.message_id, image_uuid=p.uuid)
    holders = [
        r
        for r in await ctx.tx.images.refs(p.uuid)
        if r.bs_status is _CONNECTED and r.status is RefStatus.Ready
    ]
    if not holders:
        raise ApiError(
            ErrorCode.NO_BACKUP_STORAGE, f"no Connected backup storage holds image {p.uuid}"
        )
    await start_inspection(ctx, image, holders[0], message_id=ctx.message_id, recover=False)
    return AWAIT_OPS


async def change_image_state(ctx: Ctx, p: params.ChangeImageState) -> Outcome:
    image = await _image(ctx, p.uuid)
    _refuse_deleted(image)
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
    _refuse_deleted(image)
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
    _refuse_deleted(image)
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
