"""The read-only APIs: QueryImage, QueryBackupStorage and QueryUserTag (contract section 5)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from image_service import params
from image_service.inventory import (
    backup_storage_inventory,
    image_inventories,
    user_tag_inventory,
)
from image_service.pipeline import Ctx, Outcome
from image_service.query import BACKUP_STORAGE, IMAGE, USER_TAG, Entity, compile_query

Loader = Callable[[list[str]], Awaitable[list[dict[str, Any]]]]


def _project(inventories: list[dict[str, Any]], fields: tuple[str, ...] | None) -> list[Any]:
    if fields is None:
        return inventories
    return [{k: inv[k] for k in fields if k in inv} for inv in inventories]


async def _query(ctx: Ctx, entity: Entity, p: params.Query, load: Loader) -> Outcome:
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


def _in_order(keys: list[str], inventories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_uuid = {inv["uuid"]: inv for inv in inventories}
    return [by_uuid[k] for k in keys if k in by_uuid]


async def query_image(ctx: Ctx, p: params.Query) -> Outcome:
    return await _query(ctx, IMAGE, p, lambda keys: image_inventories(ctx.tx, keys))


async def query_backup_storage(ctx: Ctx, p: params.Query) -> Outcome:
    async def load(keys: list[str]) -> list[dict[str, Any]]:
        rows = await ctx.tx.backup_storages.inventory_rows(keys)
        return _in_order(keys, [backup_storage_inventory(row) for row in rows])

    return await _query(ctx, BACKUP_STORAGE, p, load)


async def query_user_tag(ctx: Ctx, p: params.Query) -> Outcome:
    async def load(keys: list[str]) -> list[dict[str, Any]]:
        rows = await ctx.tx.tags.inventory_rows(keys)
        return _in_order(keys, [user_tag_inventory(row) for row in rows])

    return await _query(ctx, USER_TAG, p, load)
