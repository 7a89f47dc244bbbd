"""Images and their references on backup storages."""

from __future__ import annotations

import uuid as uuid_
from dataclasses import dataclass

from image_service.lifecycle import (
    IMAGE_STATE,
    IMAGE_STATUS,
    REF_STATUS,
    BackupStorageStatus,
    ImageState,
    ImageStatus,
    RefStatus,
)
from image_service.store.group import QueryGroup, Record
from image_service.store.rows import (
    HeldImage,
    ImageRow,
    InventoryRow,
    Origin,
    RefRow,
    StoredFacts,
)


@dataclass(frozen=True, slots=True)
class NewImageRow:
    uuid: str
    name: str
    description: str | None
    status: ImageStatus
    url: str
    media_type: str
    guest_os_type: str | None
    platform: str
    system: bool
    format: str
    expected_md5: str | None
    expected_sha256: str | None
    type: str = "zstack"


def _image(row: Record) -> ImageRow:
    return ImageRow(
        uuid=row["uuid"],
        name=row["name"],
        state=ImageState(row["state"]),
        status=ImageStatus(row["status"]),
        media_type=row["media_type"],
        platform=row["platform"],
        system=row["system"],
        format=row["format"],
    )


class Images(QueryGroup, sql_file="images.sql"):
    __slots__ = ()

    async def insert(self, image: NewImageRow) -> bool:
        """False when an image with that uuid exists already."""
        row = await self._row(
            "image_insert",
            uuid=image.uuid,
            name=image.name,
            description=image.description,
            status=image.status,
            url=image.url,
            media_type=image.media_type,
            guest_os_type=image.guest_os_type,
            platform=image.platform,
            system=image.system,
            format=image.format,
            expected_md5=image.expected_md5,
            expected_sha256=image.expected_sha256,
            type=image.type,
        )
        return row is not None

    async def lock(self, uuid: str) -> ImageRow | None:
        """Lock one image row: every change to an image, its references or its ops takes it
        first, so that concurrent work on one image (in any replica) is serialised."""
        row = await self._row("image_lock", uuid=uuid)
        return _image(row) if row is not None else None

    async def lock_many(self, uuids: list[str]) -> dict[str, ImageRow]:
        """Lock several image rows in uuid order (the one order every transaction uses)."""
        rows = await self._rows("images_lock", uuids=sorted(set(uuids)))
        return {row["uuid"]: _image(row) for row in rows}

    async def mark_stored(
        self,
        *,
        uuid: str,
        status: ImageStatus,
        size: int,
        actual_size: int,
        virtual_size: int,
        md5_sum: str,
        sha256_sum: str | None,
    ) -> bool:
        """The image's creation has finished with a stored file: record what it is, and turn
        `status` (Ready; Deleted when its references were deleted meanwhile). `sha256_sum` is
        None when the agent that stored it reports md5 only (one from before section 9)."""
        row = await self._row(
            "image_mark_stored",
            uuid=uuid,
            size=size,
            actual_size=actual_size,
            virtual_size=virtual_size,
            md5_sum=md5_sum,
            sha256_sum=sha256_sum,
            status=status,
            allowed=IMAGE_STATUS.allowed_from(status),
        )
        return row is not None

    async def set_status(self, *, uuid: str, status: ImageStatus) -> bool:
        """Ready <-> Deleted as its references come and go; False when the table forbids it."""
        row = await self._row(
            "image_set_status", uuid=uuid, status=status, allowed=IMAGE_STATUS.allowed_from(status)
        )
        return row is not None

    async def stored_facts(self, uuid: str) -> StoredFacts | None:
        row = await self._row("image_stored_facts", uuid=uuid)
        return StoredFacts(**row) if row is not None else None

    async def origin(self, uuid: str) -> Origin | None:
        row = await self._row("image_origin", uuid=uuid)
        if row is None:
            return None
        return Origin(ImageStatus(row["status"]), row["platform"], row["guest_os_type"])

    async def set_sizes(self, *, uuid: str, actual_size: int, virtual_size: int) -> bool:
        """SyncImageSize: record what was measured (a Ready image only)."""
        row = await self._row(
            "image_set_sizes",
            uuid=uuid,
            actual_size=actual_size,
            virtual_size=virtual_size,
            ready=ImageStatus.Ready,
        )
        return row is not None

    async def try_lock_many(self, uuids: list[str]) -> list[str]:
        """Lock those of `uuids` no other transaction holds, in uuid order, without waiting."""
        rows = await self._rows("images_try_lock", uuids=sorted(set(uuids)))
        return [row["uuid"] for row in rows]

    async def due_for_expunge(self, *, period: float, limit: int) -> list[str]:
        """Images with a Deleted reference, not being worked on, Deleted for `period` s."""
        rows = await self._rows(
            "images_due_for_expunge", period=period, deleted=RefStatus.Deleted, limit=limit
        )
        return [row["image_uuid"] for row in rows]

    async def next_expunge_in(self, *, period: float) -> float | None:
        """Seconds until the next Deleted reference is due (<= 0: now); None when none is."""
        value: float | None = await self._value(
            "expunge_next_due", period=period, deleted=RefStatus.Deleted
        )
        return value

    async def change_state(self, *, uuid: str, state: ImageState) -> bool:
        """False when the image is in `state` already."""
        row = await self._row(
            "image_change_state", uuid=uuid, state=state, allowed=IMAGE_STATE.allowed_from(state)
        )
        return row is not None

    async def update(
        self,
        *,
        uuid: str,
        name: str | None,
        description: str | None,
        guest_os_type: str | None,
        platform: str | None,
        media_type: str | None,
        system: bool | None,
    ) -> None:
        """Change the fields given (None leaves a field as it is)."""
        await self._execute(
            "image_update",
            uuid=uuid,
            name=name,
            description=description,
            guest_os_type=guest_os_type,
            platform=platform,
            media_type=media_type,
            system=system,
        )

    async def delete(self, uuid: str) -> None:
        """Remove the image; its references and tags go with it (ON DELETE CASCADE)."""
        await self._execute("image_delete", uuid=uuid)

    async def inventory_rows(self, uuids: list[str]) -> list[InventoryRow]:
        return await self._inventory_rows("image_inventories", uuids=uuids)

    # --- references -----------------------------------------------------------------------

    async def add_ref(
        self, *, image_uuid: str, backup_storage_uuid: str, install_path: str, status: RefStatus
    ) -> None:
        await self._execute(
            "ref_insert",
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            install_path=install_path,
            status=status,
        )

    async def mark_ref_ready(
        self, *, image_uuid: str, backup_storage_uuid: str, install_path: str
    ) -> bool:
        ready = RefStatus.Ready
        row = await self._row(
            "ref_mark_ready",
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            install_path=install_path,
            ready=ready,
            # A stored file makes a reference Ready only from its birth status: a Deleted one
            # comes back through RecoverImage alone (recover_ref).
            allowed=[s for s in REF_STATUS.allowed_from(ready) if s != RefStatus.Deleted],
        )
        return row is not None

    async def mark_ref_deleted(
        self, *, image_uuid: str, backup_storage_uuid: str, channel: str
    ) -> bool:
        """Delay and Never: the reference turns Deleted and keeps its file; NOTIFY `channel`
        at commit. False when it was not Ready."""
        deleted = RefStatus.Deleted
        row = await self._row(
            "ref_mark_deleted",
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            deleted=deleted,
            allowed=REF_STATUS.allowed_from(deleted),
            channel=channel,
        )
        return row is not None

    async def claim_ref(
        self, *, image_uuid: str, backup_storage_uuid: str, op_id: uuid_.UUID, min_age: float
    ) -> str | None:
        """Give a Deleted reference (Deleted for `min_age` s) to op `op_id`; its install path,
        or None when it is not Deleted, too young, or another op has it."""
        path: str | None = await self._value(
            "ref_claim",
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            op_id=op_id,
            deleted=RefStatus.Deleted,
            min_age=min_age,
        )
        return path

    async def release_ref(
        self, *, image_uuid: str, backup_storage_uuid: str, op_id: uuid_.UUID
    ) -> bool:
        row = await self._row(
            "ref_release",
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            op_id=op_id,
        )
        return row is not None

    async def recover_ref(
        self, *, image_uuid: str, backup_storage_uuid: str, op_id: uuid_.UUID
    ) -> bool:
        """The claimed Deleted reference turns Ready again (its file was confirmed)."""
        ready = RefStatus.Ready
        row = await self._row(
            "ref_recover",
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            op_id=op_id,
            ready=ready,
            allowed=[RefStatus.Deleted.value],
        )
        return row is not None

    async def remove_claimed_ref(
        self, *, image_uuid: str, backup_storage_uuid: str, op_id: uuid_.UUID
    ) -> bool:
        """Remove the reference op `op_id` claimed; False when it has no such claim."""
        path = await self._value(
            "ref_remove_claimed",
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            op_id=op_id,
        )
        return path is not None

    async def delete_ref(self, *, image_uuid: str, backup_storage_uuid: str) -> str | None:
        """Remove a reference; returns its install path, None when there was none."""
        path: str | None = await self._value(
            "ref_delete", image_uuid=image_uuid, backup_storage_uuid=backup_storage_uuid
        )
        return path

    async def refs(self, image_uuid: str) -> list[RefRow]:
        return [
            RefRow(
                backup_storage_uuid=row["backup_storage_uuid"],
                install_path=row["install_path"],
                status=RefStatus(row["status"]),
                bs_status=BackupStorageStatus(row["bs_status"]),
                hostname=row["hostname"],
                ref_op=row["ref_op"],
            )
            for row in await self._rows("refs_of_image", image_uuid=image_uuid)
        ]

    async def held_by(self, backup_storage_uuid: str) -> list[HeldImage]:
        rows = await self._rows("refs_of_bs", backup_storage_uuid=backup_storage_uuid)
        return [HeldImage(**row) for row in rows]

    async def ref_holds(self, *, backup_storage_uuid: str, install_path: str) -> bool:
        """Whether a reference keeps the file at `install_path` (Ready, or Deleted and not
        expunged yet)."""
        found = await self._value(
            "ref_holding_path",
            backup_storage_uuid=backup_storage_uuid,
            install_path=install_path,
            holding=[RefStatus.Ready, RefStatus.Deleted],
        )
        return found is not None
