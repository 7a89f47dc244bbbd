"""User tags on images (CreateUserTag, DeleteTag); QueryUserTag is in `queries`."""

from __future__ import annotations

import uuid

from image_service import params
from image_service.api.creation import not_found
from image_service.inventory import user_tag_inventory
from image_service.pipeline import Ctx, Outcome


async def create_user_tag(ctx: Ctx, p: params.CreateUserTag) -> Outcome:
    if await ctx.tx.images.lock(p.resourceUuid) is None:
        raise not_found("image", p.resourceUuid)
    row = await ctx.tx.tags.insert(uuid=uuid.uuid4().hex, resource_uuid=p.resourceUuid, tag=p.tag)
    assert row is not None, "a fresh random uuid collided"
    return {"inventory": user_tag_inventory(row)}


async def delete_tag(ctx: Ctx, p: params.DeleteTag) -> Outcome:
    await ctx.tx.tags.delete(p.uuid)
    return {}
