"""The base of the store's query groups: one class per `.sql` file, one method per query."""

from __future__ import annotations

from typing import Any, ClassVar, cast

import asyncpg
import asyncpg.pool

from image_service.store.rows import InventoryRow
from image_service.store.sqlfile import Query, load_queries

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Record = asyncpg.Record


class QueryGroup:
    """Runs the named queries of one file on one connection (usually inside a transaction)."""

    queries: ClassVar[dict[str, Query]] = {}
    __slots__ = ("_conn",)

    def __init_subclass__(cls, *, sql_file: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.queries = load_queries(sql_file)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _query(self, name: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
        query = self.queries[name]
        return query.sql, query.args(params)

    async def _rows(self, name: str, /, **params: Any) -> list[Record]:
        sql, args = self._query(name, params)
        return list(await self._conn.fetch(sql, *args))

    async def _row(self, name: str, /, **params: Any) -> Record | None:
        sql, args = self._query(name, params)
        row: Record | None = await self._conn.fetchrow(sql, *args)
        return row

    async def _value(self, name: str, /, **params: Any) -> Any:
        sql, args = self._query(name, params)
        return await self._conn.fetchval(sql, *args)

    async def _execute(self, name: str, /, **params: Any) -> None:
        sql, args = self._query(name, params)
        await self._conn.execute(sql, *args)

    async def _inventory_rows(self, name: str, /, **params: Any) -> list[InventoryRow]:
        # A Record reads like a mapping (`row["name"]`), which is all inventories need.
        return cast(list[InventoryRow], await self._rows(name, **params))
