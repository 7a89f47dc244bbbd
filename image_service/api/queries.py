"""The read-only APIs: QueryImage, QueryBackupStorage and QueryUserTag (contract section 5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
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


# Queries with many conditions, several on related inventories or several LIKE patterns cost the
# database far more than the ordinary ones (a uuid, a name): they take turns, at most
# HEAVY_AT_ONCE per replica, so that a flood of them leaves connections and CPU to everything
# else (contract section 8). The pipeline waits for the turn before it takes a connection
# (Api.admit); a query waits at most its timeout for it, and past HEAVY_WAITING waiting ones the
# next is answered at once: waiting ones hold deliveries of the API queue, which other
# requests need too.
HEAVY_CONDITIONS = 8
HEAVY_RELATED = 2
HEAVY_PATTERNS = 2
HEAVY_AT_ONCE = 2
HEAVY_WAITING = 16
# More inventories than this in one reply would not fit a broker message: page with start.
MAX_PAGE = 100_000


def is_heavy(p: params.Query) -> bool:
    """Whether a query must take its turn: by its shape, before it runs."""
    related = sum(1 for c in p.conditions if "." in c.name or c.name == "__userTag__")
    patterns = sum(1 for c in p.conditions if c.op in ("~=", "!~="))
    return (
        len(p.conditions) > HEAVY_CONDITIONS or related > HEAVY_RELATED or patterns > HEAVY_PATTERNS
    )


class _Turns:
    def __init__(self, at_once: int, waiting: int) -> None:
        self._semaphore = asyncio.Semaphore(at_once)
        self._waiting = 0
        self._max_waiting = waiting

    @asynccontextmanager
    async def turn(self, wait: float) -> AsyncIterator[None]:
        if self._waiting >= self._max_waiting:
            raise ApiError(
                ErrorCode.TIMEOUT,
                f"{self._waiting} costly queries are waiting already; try again later",
            )
        self._waiting += 1
        try:
            async with asyncio.timeout(wait):
                await self._semaphore.acquire()
        except TimeoutError:
            raise ApiError(
                ErrorCode.TIMEOUT, f"no turn for a costly query within {wait:g} s; try again"
            ) from None
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()


_heavy = _Turns(HEAVY_AT_ONCE, HEAVY_WAITING)


def admit(p: params.Query, wait: float) -> AbstractAsyncContextManager[None]:
    """The turn a query waits for (at most `wait` seconds) before it may use the database;
    raises ApiError (TIMEOUT) when it gets none."""
    return _heavy.turn(wait) if is_heavy(p) else nullcontext()


async def query_entity(ctx: Ctx, entity: Entity, p: params.Query, load: Loader) -> Outcome:
    """Run a query of the contract's language on `entity`; `load` turns a page of keys into
    inventories in that order."""
    # Never more rows than a reply can carry, plus one to tell that there were more.
    compiled = compile_query(entity, p.model_copy(update={"limit": min(p.limit, MAX_PAGE + 1)}))
    timeout = ctx.query_timeout
    try:
        # One deadline for the whole query: count, page and inventories. Cancelling cancels
        # the statement on the server too.
        async with asyncio.timeout(timeout):
            return await _run(ctx, p, compiled, load)
    except TimeoutError:
        raise ApiError(
            ErrorCode.TIMEOUT, f"the query ran longer than {timeout:g} s and was cancelled"
        ) from None


async def _run(ctx: Ctx, p: params.Query, compiled: CompiledQuery, load: Loader) -> Outcome:
    reply: dict[str, Any] = {}
    if p.count or p.replyWithCount:
        reply["total"] = await ctx.tx.fetchval_sql(compiled.count_sql, compiled.count_args)
    if p.count:
        reply["inventories"] = []
        return reply
    keys = [row[0] for row in await ctx.tx.fetch_sql(compiled.select_sql, compiled.args)]
    if len(keys) > MAX_PAGE:
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"limit: the page holds more than {MAX_PAGE:,} inventories, more than one reply"
            " can carry; ask for fewer and page with start",
        )
    reply["inventories"] = _project(await load(keys), compiled.fields)
    return reply


def _in_order(keys: list[str], inventories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_uuid = {inv["uuid"]: inv for inv in inventories}
    return [by_uuid[k] for k in keys if k in by_uuid]


async def query_image(ctx: Ctx, p: params.Query) -> Outcome:
    return await query_entity(ctx, IMAGE, p, lambda keys: image_inventories(ctx.tx, keys))


async def query_backup_storage(ctx: Ctx, p: params.Query) -> Outcome:
    async def load(keys: list[str]) -> list[dict[str, Any]]:
        rows = await ctx.tx.backup_storages.inventory_rows(keys)
        return _in_order(keys, [backup_storage_inventory(row) for row in rows])

    return await query_entity(ctx, BACKUP_STORAGE, p, load)


async def query_user_tag(ctx: Ctx, p: params.Query) -> Outcome:
    async def load(keys: list[str]) -> list[dict[str, Any]]:
        rows = await ctx.tx.tags.inventory_rows(keys)
        return _in_order(keys, [user_tag_inventory(row) for row in rows])

    return await query_entity(ctx, USER_TAG, p, load)
