"""The Create*Template APIs: Creating images made from a volume or a volume snapshot of the
read model, flattened by an agent."""

from __future__ import annotations

import uuid

from image_service import params
from image_service.api.creation import Source, create_image, not_found
from image_service.errors import ApiError, ErrorCode
from image_service.lifecycle import ImageStatus, OpKind
from image_service.pipeline import Ctx, Outcome
from image_service.store.images import NewImageRow
from image_service.store.rows import TemplateSource

TEMPLATE_FORMATS = frozenset({"qcow2", "raw"})


def _template_source(kind: str, row: TemplateSource) -> tuple[str, str]:
    """The source path and format of a volume or snapshot a template is made from."""
    path, fmt = row.install_path, row.format
    if not path:
        raise ApiError(ErrorCode.INVALID_STATE, f"{kind} {row.uuid} has no installPath")
    if fmt not in TEMPLATE_FORMATS:
        raise ApiError(
            ErrorCode.INVALID_STATE, f"{kind} {row.uuid} has format {fmt!r}, not qcow2 or raw"
        )
    return path, fmt


async def _inherited(
    ctx: Ctx,
    kind: str,
    source_uuid: str,
    row: TemplateSource,
    given: params.CreateRootTemplateParams | None,
) -> tuple[str, str | None]:
    """The template's platform and guestOsType: those given, else those of the root image of
    the volume it is made from (contract section 10), else Linux and none. A root image that
    is Deleted refuses the template (INVALID_STATE), as every other use of it."""
    origin = await ctx.tx.images.origin(row.root_image_uuid) if row.root_image_uuid else None
    if origin is not None and origin.status is ImageStatus.Deleted:
        raise ApiError(
            ErrorCode.INVALID_STATE,
            f"the root image {row.root_image_uuid} of {kind} {source_uuid} is Deleted;"
            " RecoverImage brings it back",
        )
    platform = given.platform.value if given and given.platform else None
    guest_os_type = given.guestOsType if given else None
    if origin is not None:
        platform = platform or origin.platform
        guest_os_type = guest_os_type if guest_os_type is not None else origin.guest_os_type
    return platform or params.Platform.Linux.value, guest_os_type


async def _create_template(
    ctx: Ctx,
    p: params.CreateTemplateParams,
    *,
    kind: str,
    source_uuid: str,
    media_type: str,
    root_volume_only: bool = False,
) -> Outcome:
    """A Creating image made from a volume (`kind` "volume") or a volume snapshot."""
    if kind == "volume":
        row = await ctx.tx.volumes.volume(source_uuid)
    else:
        row = await ctx.tx.volumes.snapshot(source_uuid)
    if row is None:
        raise not_found(kind, source_uuid)
    if root_volume_only and row.type != "Root":
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"rootVolumeUuid: volume {source_uuid} is a {row.type} volume, not Root",
        )
    path, fmt = _template_source(kind, row)
    scheme = "volume" if kind == "volume" else "volumeSnapshot"
    root = p if isinstance(p, params.CreateRootTemplateParams) else None
    platform, guest_os_type = await _inherited(ctx, kind, source_uuid, row, root)
    image = NewImageRow(
        uuid=p.resourceUuid or uuid.uuid4().hex,
        name=p.name,
        description=p.description,
        status=ImageStatus.Creating,
        url=f"{scheme}://{source_uuid}",
        media_type=media_type,
        guest_os_type=guest_os_type,
        platform=platform,
        system=root.system if root else False,
        format=fmt,
        expected_md5=None,
        expected_sha256=None,
    )
    source = Source(OpKind.create, source=path, source_format=fmt)
    return await create_image(ctx, image, source, p.backupStorageUuids)


async def create_root_template_from_volume(
    ctx: Ctx, p: params.CreateRootVolumeTemplateFromRootVolume
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
    ctx: Ctx, p: params.CreateRootVolumeTemplateFromVolumeSnapshot
) -> Outcome:
    return await _create_template(
        ctx,
        p,
        kind="volume snapshot",
        source_uuid=p.snapshotUuid,
        media_type="RootVolumeTemplate",
    )


async def create_data_template_from_volume(
    ctx: Ctx, p: params.CreateDataVolumeTemplateFromVolume
) -> Outcome:
    return await _create_template(
        ctx, p, kind="volume", source_uuid=p.volumeUuid, media_type="DataVolumeTemplate"
    )
