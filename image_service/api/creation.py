"""Creating an image: AddImage, and what the template APIs share with it.

A new image gets one reference and one op per usable backup storage (the others are recorded
as failed ops, so they appear in the reply's `causes`); the reply waits for the agents.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

from image_service import params
from image_service.errors import ApiError, ErrorCode
from image_service.events import emit_status
from image_service.inventory import image_inventory_of
from image_service.lifecycle import (
    BackupStorageState,
    BackupStorageStatus,
    ImageStatus,
    OpKind,
)
from image_service.pipeline import AWAIT_OPS, Ctx, Outcome
from image_service.protocol.agent import CreateCommand, DownloadCommand
from image_service.store.images import NewImageRow
from image_service.store.rows import BackupStorageRow

FILE_NAME_BYTES = 200


def not_found(kind: str, uuid_: str) -> ApiError:
    return ApiError(ErrorCode.RESOURCE_NOT_FOUND, f"{kind} {uuid_} does not exist")


def install_path(bs_url: str, image_uuid: str, name: str) -> str:
    """Where an image lives on a backup storage: `<root>/templates/<imageUuid>/<name>.template`
    (the seed's layout). `name` was validated to hold no path separator; it is cut to
    FILE_NAME_BYTES of UTF-8 so that the file name fits every Linux file system's 255-byte
    limit (the directory is the image's own, so a cut name cannot collide)."""
    stem = name.encode()[:FILE_NAME_BYTES].decode(errors="ignore")
    return f"{bs_url.rstrip('/')}/templates/{image_uuid}/{stem}.template"


def unusable_reason(bs: BackupStorageRow) -> tuple[ErrorCode, str] | None:
    """Why a backup storage cannot take a new image, or None when it can."""
    if bs.state is not BackupStorageState.Enabled:
        return ErrorCode.INVALID_STATE, f"backup storage {bs.uuid} is {bs.state}"
    if bs.status is not BackupStorageStatus.Connected:
        return ErrorCode.INVALID_STATE, f"backup storage {bs.uuid} is {bs.status}"
    if bs.available_capacity <= 0:
        return ErrorCode.CAPACITY_EXCEEDED, f"backup storage {bs.uuid} has no available capacity"
    return None


@dataclass(frozen=True, slots=True)
class Source:
    """How each backup storage produces the new image's file."""

    op_kind: OpKind
    url: str | None = None  # download
    md5_sum: str | None = None
    sha256_sum: str | None = None
    source: str | None = None  # create: the volume or snapshot's path
    source_format: str | None = None


Skipped = tuple[str, ErrorCode, str]


async def choose_backup_storages(
    ctx: Ctx, uuids: list[str] | None
) -> tuple[list[BackupStorageRow], list[Skipped]]:
    """The usable backup storages among `uuids` (with the reasons the others are skipped), or,
    with `uuids` omitted, one usable backup storage chosen at random."""
    if uuids is None:
        candidates = [
            bs for bs in await ctx.tx.backup_storages.all() if unusable_reason(bs) is None
        ]
        if not candidates:
            raise ApiError(ErrorCode.NO_BACKUP_STORAGE, "no backup storage can take the image")
        return [random.choice(candidates)], []
    found = {bs.uuid: bs for bs in await ctx.tx.backup_storages.get_many(uuids)}
    for bs_uuid in uuids:
        if bs_uuid not in found:
            raise not_found("backup storage", bs_uuid)
    usable: list[BackupStorageRow] = []
    skipped: list[Skipped] = []
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


def _command(
    image: NewImageRow, source: Source, op_id: uuid.UUID, bs_uuid: str, path: str
) -> DownloadCommand | CreateCommand:
    common = {
        "opId": str(op_id),
        "imageUuid": image.uuid,
        "backupStorageUuid": bs_uuid,
        "installPath": path,
        "format": image.format,
    }
    if source.op_kind is OpKind.download:
        return DownloadCommand.model_validate(
            {
                **common,
                "url": source.url,
                "md5Sum": source.md5_sum,
                "sha256Sum": source.sha256_sum,
            }
        )
    return CreateCommand.model_validate(
        {**common, "source": source.source, "sourceFormat": source.source_format}
    )


async def create_image(
    ctx: Ctx, image: NewImageRow, source: Source, backup_storage_uuids: list[str] | None
) -> Outcome:
    """Record a new image and one op per backup storage; the reply waits for the agents."""
    usable, skipped = await choose_backup_storages(ctx, backup_storage_uuids)
    if not await ctx.tx.images.insert(image):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"resourceUuid: {image.uuid} already exists")
    await ctx.tx.inbox.set_image(message_id=ctx.message_id, image_uuid=image.uuid)
    for bs_uuid, code, details in skipped:
        await ctx.tx.ops.insert_failed(
            kind=source.op_kind,
            message_id=ctx.message_id,
            image_uuid=image.uuid,
            backup_storage_uuid=bs_uuid,
            error_code=code.value,
            error_details=details,
        )
    for bs in usable:
        path = install_path(bs.url, image.uuid, image.name)
        await ctx.tx.images.add_ref(
            image_uuid=image.uuid,
            backup_storage_uuid=bs.uuid,
            install_path=path,
            status=image.status,
        )
        op_id = uuid.uuid4()
        command = _command(image, source, op_id, bs.uuid, path)
        await ctx.tx.ops.insert(
            op_id=op_id,
            kind=source.op_kind,
            message_id=ctx.message_id,
            image_uuid=image.uuid,
            backup_storage_uuid=bs.uuid,
            command=command.model_dump(mode="json"),
        )
        await ctx.outbox.command(command)
    inventory = await image_inventory_of(ctx.tx, image.uuid)
    await emit_status(ctx, image.uuid, None, image.status, inventory)
    return AWAIT_OPS


async def add_image(ctx: Ctx, p: params.AddImage) -> Outcome:
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
    image = NewImageRow(
        uuid=p.resourceUuid or uuid.uuid4().hex,
        name=p.name,
        description=p.description,
        status=ImageStatus.Downloading,
        url=p.url,
        media_type=p.mediaType.value,
        guest_os_type=p.guestOsType,
        platform=p.platform.value,
        system=p.system,
        format=p.effective_format.value,
        expected_md5=p.md5Sum,
        expected_sha256=p.sha256Sum,
    )
    source = Source(OpKind.download, url=p.url, md5_sum=p.md5Sum, sha256_sum=p.sha256Sum)
    return await create_image(ctx, image, source, p.backupStorageUuids)
