"""User tags on images."""

from __future__ import annotations

from typing import cast

from image_service.store.group import QueryGroup
from image_service.store.rows import InventoryRow


class Tags(QueryGroup, sql_file="tags.sql"):
    __slots__ = ()

    async def insert(self, *, uuid: str, resource_uuid: str, tag: str) -> InventoryRow | None:
        row = await self._row("tag_insert", uuid=uuid, resource_uuid=resource_uuid, tag=tag)
        return cast(InventoryRow, row) if row is not None else None

    async def delete(self, uuid: str) -> None:
        await self._execute("tag_delete", uuid=uuid)

    async def inventory_rows(self, uuids: list[str]) -> list[InventoryRow]:
        return await self._inventory_rows("tag_inventories", uuids=uuids)
