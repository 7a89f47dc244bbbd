"""The global configuration table (`image_service.globalconfig` defines the options)."""

from __future__ import annotations

from image_service.store.group import QueryGroup
from image_service.store.rows import InventoryRow


class GlobalConfig(QueryGroup, sql_file="global_config.sql"):
    __slots__ = ()

    async def value(self, option_id: str) -> str | None:
        """The option's value as stored; None for an option the database does not have."""
        value: str | None = await self._value("config_value", id=option_id)
        return value

    async def update(self, *, option_id: str, value: str, channel: str) -> bool:
        """Set the option and NOTIFY `channel` at commit; False when there is no such row."""
        row = await self._row("config_update", id=option_id, value=value, channel=channel)
        return row is not None

    async def inventory_rows(self, ids: list[str]) -> list[InventoryRow]:
        return await self._inventory_rows("config_inventories", ids=ids)
