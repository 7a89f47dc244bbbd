"""The read-only APIs: QueryImage, QueryBackupStorage and QueryUserTag (contract section 5)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

from image_service import params
from image_service.errors import ApiError, ErrorCode
from image_service.inventory import (
    backup_storage_inventory,
    image_inventories,
    user_tag_inventory,
)
from image_service.pipeline import Ctx, Outcome
from image_service.query import (
    BACKUP_STORAGE,
    IMAGE,
    USER_TAG,
    CompiledQuery,
    Entity,
    compile_query,
)

Loader = Callable[[list[str]], Awaitable[list[dict[str, Any]]]]


def _project(inventories: list[dict[str, Any]], fields: tuple[str, ...] | None) -> list[Any]:
    if fields is None:
        return inventories
    return [{k: inv[k] for k in fields if k in inv} for inv in inventories]


# Queries with many conditions, or several on related inventories, cost the database far more
# than the ordinary ones (a uuid, a name): they take turns, at most HEAVY_AT_ONCE per replica,
# so that a flood of them leaves connections and CPU to everything else (contract section 8).
# The pipeline waits for the turn before it takes a connection (Api.admit).
HEAVY_CONDITIONS = 8
HEAVY_RELATED = 2
HEAVY_AT_ONCE = 2
_heavy_turns = asyncio.Semaphore(HEAVY_AT_ONCE)


def is_heavy(p: params.Query) -> bool:
    related = sum(1 for c in p.conditions if "." in c.name or c.name == "__userTag__")
    return len(p.conditions) > HEAVY_CONDITIONS or related > HEAVY_RELATED


def admit(p: params.Query) -> AbstractAsyncContextManager[None]:
    """The turn a query waits for before it may use the database."""
    return _heavy_turns if is_heavy(p) else nullcontext()


async def _query(ctx: Ctx, entity: Entity, p: params.Query, load: Loader) -> Outcome:
    return await _run(ctx, p, compile_query(entity, p), load)


async def _run(ctx: Ctx, p: params.Query, compiled: CompiledQuery, load: Loader) -> Outcome:
    timeout = ctx.query_timeout
    reply: dict[str, Any] = {}
    try:
        if p.count or p.replyWithCount:
            reply["total"] = await ctx.tx.fetchval_sql(
                compiled.count_sql, compiled.count_args, timeout=timeout
            )
        if not p.count:
            rows = await ctx.tx.fetch_sql(compiled.select_sql, compiled.args, timeout=timeout)
            reply["inventories"] = _project(await load([row[0] for row in rows]), compiled.fields)
        else:
            reply["inventories"] = []
    except TimeoutError:
        raise ApiError(
            ErrorCode.TIMEOUT, f"the query ran longer than {timeout:g} s and was cancelled"
        ) from None
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
