"""QueryGlobalConfig and UpdateGlobalConfig (contract section 10)."""

from __future__ import annotations

from typing import Any

from image_service import params
from image_service.api.queries import query_entity
from image_service.errors import ApiError, ErrorCode
from image_service.globalconfig import CONFIG_CHANNEL, OPTIONS, option
from image_service.pipeline import Ctx, Outcome
from image_service.query import GLOBAL_CONFIG
from image_service.store import Tx
from image_service.store.rows import InventoryRow


def config_inventory(row: InventoryRow) -> dict[str, Any]:
    return {
        "category": row["category"],
        "name": row["name"],
        "value": row["value"],
        "defaultValue": row["default_value"],
        "description": row["description"],
    }


async def _load(tx: Tx, ids: list[str]) -> list[dict[str, Any]]:
    by_id = {row["id"]: config_inventory(row) for row in await tx.config.inventory_rows(ids)}
    return [by_id[i] for i in ids if i in by_id]


async def query_global_config(ctx: Ctx, p: params.Query) -> Outcome:
    return await query_entity(ctx, GLOBAL_CONFIG, p, lambda ids: _load(ctx.tx, ids))


async def update_global_config(ctx: Ctx, p: params.UpdateGlobalConfig) -> Outcome:
    found = option(p.category, p.name)
    if found is None:
        known = ", ".join(sorted(OPTIONS))
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"name: {p.category}.{p.name} is not a global configuration option ({known})",
        )
    try:
        value = found.parse(p.text)
    except ValueError as exc:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"value: {exc}") from None
    if not await ctx.tx.config.update(option_id=found.id, value=value, channel=CONFIG_CHANNEL):
        raise ApiError(
            ErrorCode.INTERNAL_ERROR, f"{found.id} is missing from the database (migration 5)"
        )
    return {"inventory": (await _load(ctx.tx, [found.id]))[0]}
