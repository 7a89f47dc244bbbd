"""The query language end to end (contract §5-7): QueryImage, QueryBackupStorage and QueryUserTag
on a real database: every operator on every field type, nested conditions, the volume read model
kept from `volume.*` events, user tags, sorting and paging, errors, injection attempts, a property
test against a plain-Python model, and the command line.

Most tests insert rows straight into the database (many images, fast). Those that only query
them use the `pg` fixture: a freshly migrated database and the read-only APIs run in-process
through the service's own envelope parsing, validation, handlers and reply shape, without broker
or service processes. The tests that need the rest go through the whole deployment (`stack`):
the volume events, user tags (CreateUserTag, DeleteTag), the injection attempts (which tag an
image), AddImage with a real agent (queries see real images too), and the command line.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import PgStack, Stack, wait_for
from tests.helpers import Service, cli, image_cli

BASE = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
NO_VALUE = object()


# --- rows ---------------------------------------------------------------------------------


@dataclass
class Img:
    """An image row as the service would have written it (consistent with its status)."""

    name: str
    description: str | None = None
    size: int | None = 1024
    virtual_size: int | None = 4096
    system: bool = False
    create_date: datetime = BASE
    status: str = "Ready"
    state: str = "Enabled"
    media_type: str = "RootVolumeTemplate"
    platform: str = "Linux"
    format: str = "qcow2"
    bs_names: list[str] = field(default_factory=list)
    uuid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if self.status != "Ready":
            self.size = self.virtual_size = None
        if self.media_type == "ISO":
            self.format, self.system = "iso", False


async def insert_backup_storage(
    db: asyncpg.Connection,
    name: str,
    *,
    status: str = "Connected",
    state: str = "Enabled",
    total: int = 10 * 2**30,
    available: int = 5 * 2**30,
    description: str | None = None,
) -> str:
    bs_uuid = uuid.uuid4().hex
    await db.execute(
        "INSERT INTO backup_storage (uuid, name, description, url, hostname, status, state,"
        " total_capacity, available_capacity) VALUES ($1, $2, $3, $4, '127.0.0.1', $5, $6, $7, $8)",
        bs_uuid,
        name,
        description,
        f"/srv/{name}",
        status,
        state,
        total,
        available,
    )
    return bs_uuid


async def insert_images(
    db: asyncpg.Connection, images: Sequence[Img], bs_uuids: dict[str, str] | None = None
) -> None:
    """Insert image rows and their Ready references to the backup storages named in `bs_names`."""
    await db.executemany(
        "INSERT INTO image (uuid, name, description, state, status, size, actual_size,"
        " virtual_size, url, media_type, platform, system, format, md5_sum, create_date,"
        " last_op_date)"
        " VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)",
        [
            (
                img.uuid,
                img.name,
                img.description,
                img.state,
                img.status,
                img.size,
                img.virtual_size,
                f"http://example.invalid/{img.uuid}.{img.format}",
                img.media_type,
                img.platform,
                img.system,
                img.format,
                img.uuid if img.status == "Ready" else None,
                img.create_date,
            )
            for img in images
        ],
    )
    refs = [
        (img.uuid, (bs_uuids or {})[bs], f"/srv/{bs}/templates/{img.uuid}/{img.name}.template")
        for img in images
        for bs in img.bs_names
    ]
    if refs:
        await db.executemany(
            "INSERT INTO image_backup_storage_ref (image_uuid, backup_storage_uuid, install_path,"
            " status) VALUES ($1, $2, $3, 'Ready')",
            refs,
        )


# --- calling ------------------------------------------------------------------------------


def as_condition(item: tuple[Any, ...] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if len(item) == 2:
        return {"name": item[0], "op": item[1]}
    return {"name": item[0], "op": item[1], "value": item[2]}


async def query(
    service: Service,
    *conditions: tuple[Any, ...] | dict[str, Any],
    api: str = "QueryImage",
    **params,
) -> dict[str, Any]:
    return await service.call(api, {"conditions": [as_condition(c) for c in conditions], **params})


async def found(
    service: Service,
    *conditions: tuple[Any, ...] | dict[str, Any],
    api: str = "QueryImage",
    **params,
) -> list[dict[str, Any]]:
    reply = await query(service, *conditions, api=api, **params)
    assert reply["success"], (conditions, reply)
    assert "inventories" in reply, reply
    return list(reply["inventories"])


async def names(
    service: Service, *conditions: tuple[Any, ...] | dict[str, Any], **params
) -> set[str]:
    inventories = await found(service, *conditions, **params)
    result = {inv["name"] for inv in inventories}
    assert len(result) == len(inventories), f"duplicates in {[i['name'] for i in inventories]}"
    return result


async def invalid(
    service: Service,
    *conditions: tuple[Any, ...] | dict[str, Any],
    api: str = "QueryImage",
    **params,
) -> str:
    """The call fails with INVALID_ARGUMENT; returns its details."""
    reply = await query(service, *conditions, api=api, **params)
    assert reply["success"] is False, (conditions, params, reply)
    assert reply["error"]["code"] == "INVALID_ARGUMENT", reply
    return str(reply["error"].get("details") or "")


def volume_body(vol_uuid: str, vm: str | None, image: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "uuid": vol_uuid,
        "name": f"vol-{vol_uuid[:6]}",
        "type": "Root",
        "vmInstanceUuid": vm,
        "rootImageUuid": image,
        "primaryStorageUuid": "0" * 32,
        "installPath": "file:///x",
        "format": "qcow2",
        "size": 1,
        **extra,
    }


def hexid() -> str:
    return uuid.uuid4().hex


# --- every operator on every field type --------------------------------------------------

H = timedelta(hours=1)

OPERATOR_IMAGES = [
    Img("alpha", "first image", 100, 1000, False, BASE, "Ready", "Enabled",
        "RootVolumeTemplate", "Linux", "qcow2"),
    Img("beta", None, 200, 2000, True, BASE + H, "Ready", "Disabled",
        "DataVolumeTemplate", "Windows", "raw"),
    Img("gamma", "golden", 300, 3000, False, BASE + 2 * H, "Ready", "Enabled",
        "ISO", "Other", "iso"),
    Img("delta", "", None, None, False, BASE + 3 * H, "Downloading", "Enabled",
        "RootVolumeTemplate", "Paravirtualization", "qcow2"),
    Img("epsilon", "first copy", 300, 5000, True, BASE + 4 * H, "Ready", "Disabled",
        "DataVolumeTemplate", "Windows", "raw"),
    Img("centos7", "CentOS 7", 2**30, 8 * 2**30, False, BASE + 5 * H, "Ready", "Enabled",
        "RootVolumeTemplate", "Linux", "qcow2"),
    Img("zeta", None, None, None, False, BASE + 6 * H, "Creating", "Enabled",
        "RootVolumeTemplate", "Linux", "qcow2"),
]  # fmt: skip
ALL = {img.name for img in OPERATOR_IMAGES}
TRUE_ONES = {"beta", "epsilon"}
READY = {"alpha", "beta", "gamma", "epsilon", "centos7"}
ROOTS = {"alpha", "delta", "centos7", "zeta"}


def at(hours: float, fmt: str = "Z") -> str:
    moment = BASE + timedelta(hours=hours)
    if fmt == "Z":
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if fmt == "+02:00":
        return moment.astimezone(timezone(timedelta(hours=2))).isoformat()
    return moment.isoformat()


OPERATOR_CASES: list[tuple[tuple[Any, ...], set[str]]] = [
    # text: name
    (("name", "=", "beta"), {"beta"}),
    (("name", "!=", "beta"), ALL - {"beta"}),
    (("name", ">", "delta"), {"gamma", "epsilon", "zeta"}),
    (("name", ">=", "delta"), {"delta", "gamma", "epsilon", "zeta"}),
    (("name", "<", "beta"), {"alpha"}),
    (("name", "<=", "beta"), {"alpha", "beta"}),
    (("name", "?=", ["alpha", "zeta", "nope"]), {"alpha", "zeta"}),
    (("name", "!?=", ["alpha", "zeta"]), ALL - {"alpha", "zeta"}),
    (("name", "~=", "%eta"), {"beta", "zeta"}),
    (("name", "~=", "_eta"), {"beta", "zeta"}),
    (("name", "~=", "cent%"), {"centos7"}),
    (("name", "!~=", "%a"), {"epsilon", "centos7"}),
    (("name", "is null"), set()),
    (("name", "not null"), ALL),
    # text: description (NULL compares false with everything)
    (("description", "=", "golden"), {"gamma"}),
    (("description", "!=", "golden"), {"alpha", "delta", "epsilon", "centos7"}),
    (("description", ">", "f"), {"alpha", "gamma", "epsilon"}),
    (("description", ">=", "golden"), {"gamma"}),
    (("description", "<", "f"), {"delta", "centos7"}),
    (("description", "<=", ""), {"delta"}),
    (("description", "?=", ["", "golden"]), {"delta", "gamma"}),
    (("description", "!?=", ["", "golden"]), {"alpha", "epsilon", "centos7"}),
    (("description", "~=", "first%"), {"alpha", "epsilon"}),
    (("description", "~=", "%"), ALL - {"beta", "zeta"}),
    (("description", "!~=", "first%"), {"gamma", "delta", "centos7"}),
    (("description", "is null"), {"beta", "zeta"}),
    (("description", "not null"), ALL - {"beta", "zeta"}),
    # int: size
    (("size", "=", 300), {"gamma", "epsilon"}),
    (("size", "=", "300"), {"gamma", "epsilon"}),
    (("size", "!=", 300), {"alpha", "beta", "centos7"}),
    (("size", ">", 200), {"gamma", "epsilon", "centos7"}),
    (("size", ">=", "200"), {"beta", "gamma", "epsilon", "centos7"}),
    (("size", "<", 200), {"alpha"}),
    (("size", "<=", 200), {"alpha", "beta"}),
    (("size", "?=", [100, "200"]), {"alpha", "beta"}),
    (("size", "?=", "100,300"), {"alpha", "gamma", "epsilon"}),
    (("size", "!?=", [100, 200]), {"gamma", "epsilon", "centos7"}),
    (("size", "~=", "%00"), {"alpha", "beta", "gamma", "epsilon"}),
    (("size", "!~=", "1%"), {"beta", "gamma", "epsilon"}),
    (("size", "is null"), {"delta", "zeta"}),
    (("size", "not null"), READY),
    # int: virtualSize (bigint beyond 32 bits)
    (("virtualSize", "=", 5000), {"epsilon"}),
    (("virtualSize", "!=", 5000), {"alpha", "beta", "gamma", "centos7"}),
    (("virtualSize", ">", 2**32), {"centos7"}),
    (("virtualSize", ">=", 3000), {"gamma", "epsilon", "centos7"}),
    (("virtualSize", "<", 2000), {"alpha"}),
    (("virtualSize", "<=", 2000), {"alpha", "beta"}),
    (("virtualSize", "?=", [1000, 3000, 8 * 2**30]), {"alpha", "gamma", "centos7"}),
    (("virtualSize", "!?=", [1000, 3000]), {"beta", "epsilon", "centos7"}),
    (("virtualSize", "~=", "%000"), {"alpha", "beta", "gamma", "epsilon"}),
    (("virtualSize", "!~=", "%000"), {"centos7"}),
    (("virtualSize", "is null"), {"delta", "zeta"}),
    (("virtualSize", "not null"), READY),
    # bool: system
    (("system", "=", True), TRUE_ONES),
    (("system", "=", "true"), TRUE_ONES),
    (("system", "=", "false"), ALL - TRUE_ONES),
    (("system", "!=", True), ALL - TRUE_ONES),
    (("system", ">", False), TRUE_ONES),
    (("system", ">=", False), ALL),
    (("system", "<", True), ALL - TRUE_ONES),
    (("system", "<=", "false"), ALL - TRUE_ONES),
    (("system", "?=", [True]), TRUE_ONES),
    (("system", "!?=", [True]), ALL - TRUE_ONES),
    (("system", "~=", "t%"), TRUE_ONES),
    (("system", "!~=", "t%"), ALL - TRUE_ONES),
    (("system", "is null"), set()),
    (("system", "not null"), ALL),
    # date: createDate, ISO 8601 in several spellings
    (("createDate", "=", at(2)), {"gamma"}),
    (("createDate", "=", at(2, "+02:00")), {"gamma"}),
    (("createDate", "=", at(2, "iso")), {"gamma"}),
    (("createDate", "=", "2024-03-01T14:00:00.000000Z"), {"gamma"}),
    (("createDate", "=", "2024-03-01T14:00:00"), {"gamma"}),  # no offset: UTC
    (("createDate", "!=", at(2)), ALL - {"gamma"}),
    (("createDate", ">", at(4)), {"centos7", "zeta"}),
    (("createDate", ">=", at(4, "+02:00")), {"epsilon", "centos7", "zeta"}),
    (("createDate", "<", at(1)), {"alpha"}),
    (("createDate", "<=", at(1)), {"alpha", "beta"}),
    (
        ("createDate", ">", "2024-03-01T13:30:00.5Z"),
        {"gamma", "delta", "epsilon", "centos7", "zeta"},
    ),
    (("createDate", ">", "2024-03-01"), ALL),
    (("createDate", ">", "2024-03-02"), set()),
    (("createDate", "?=", [at(0), at(6, "+02:00")]), {"alpha", "zeta"}),
    (("createDate", "!?=", [at(0), at(6)]), ALL - {"alpha", "zeta"}),
    (("createDate", "~=", "2024%"), ALL),
    (("createDate", "!~=", "2024%"), set()),
    (("createDate", "is null"), set()),
    (("createDate", "not null"), ALL),
    # enum: status (Creating < Downloading < Ready)
    (("status", "=", "Ready"), READY),
    (("status", "!=", "Ready"), {"delta", "zeta"}),
    (("status", ">", "Creating"), ALL - {"zeta"}),
    (("status", ">=", "Downloading"), READY | {"delta"}),
    (("status", "<", "Downloading"), {"zeta"}),
    (("status", "<=", "Downloading"), {"delta", "zeta"}),
    (("status", "?=", ["Creating", "Downloading"]), {"delta", "zeta"}),
    (("status", "?=", "Creating,Downloading"), {"delta", "zeta"}),
    (("status", "!?=", ["Ready"]), {"delta", "zeta"}),
    (("status", "~=", "%ing"), {"delta", "zeta"}),
    (("status", "!~=", "%ing"), READY),
    (("status", "is null"), set()),
    (("status", "not null"), ALL),
    # enum: state
    (("state", "=", "Disabled"), {"beta", "epsilon"}),
    (("state", "!=", "Disabled"), ALL - {"beta", "epsilon"}),
    (("state", "?=", ["Enabled"]), ALL - {"beta", "epsilon"}),
    (("state", "!?=", ["Enabled"]), {"beta", "epsilon"}),
    (("state", "~=", "Dis%"), {"beta", "epsilon"}),
    (("state", "!~=", "Dis%"), ALL - {"beta", "epsilon"}),
    (("state", "is null"), set()),
    (("state", "not null"), ALL),
    # enum: mediaType
    (("mediaType", "=", "ISO"), {"gamma"}),
    (("mediaType", "!=", "RootVolumeTemplate"), {"beta", "gamma", "epsilon"}),
    (("mediaType", ">", "DataVolumeTemplate"), ROOTS | {"gamma"}),
    (("mediaType", ">=", "RootVolumeTemplate"), ROOTS),
    (("mediaType", "<", "ISO"), {"beta", "epsilon"}),
    (("mediaType", "<=", "ISO"), {"beta", "gamma", "epsilon"}),
    (("mediaType", "?=", ["ISO", "DataVolumeTemplate"]), {"beta", "gamma", "epsilon"}),
    (("mediaType", "!?=", ["ISO", "DataVolumeTemplate"]), ROOTS),
    (("mediaType", "~=", "%Template"), ALL - {"gamma"}),
    (("mediaType", "!~=", "%Volume%"), {"gamma"}),
    (("mediaType", "is null"), set()),
    (("mediaType", "not null"), ALL),
    # enum: platform
    (("platform", "=", "Windows"), {"beta", "epsilon"}),
    (("platform", "!=", "Linux"), {"beta", "gamma", "delta", "epsilon"}),
    (("platform", ">", "Other"), {"beta", "delta", "epsilon"}),
    (("platform", ">=", "Paravirtualization"), {"beta", "delta", "epsilon"}),
    (("platform", "<", "Other"), {"alpha", "centos7", "zeta"}),
    (("platform", "<=", "Linux"), {"alpha", "centos7", "zeta"}),
    (("platform", "?=", ["Other", "Paravirtualization"]), {"gamma", "delta"}),
    (("platform", "!?=", ["Linux"]), {"beta", "gamma", "delta", "epsilon"}),
    (("platform", "~=", "Win%"), {"beta", "epsilon"}),
    (("platform", "!~=", "%i%"), {"gamma"}),
    (("platform", "is null"), set()),
    (("platform", "not null"), ALL),
    # enum: format
    (("format", "=", "raw"), {"beta", "epsilon"}),
    (("format", "!=", "qcow2"), {"beta", "gamma", "epsilon"}),
    (("format", ">", "qcow2"), {"beta", "epsilon"}),
    (("format", ">=", "qcow2"), ALL - {"gamma"}),
    (("format", "<", "qcow2"), {"gamma"}),
    (("format", "<=", "iso"), {"gamma"}),
    (("format", "?=", ["iso", "raw"]), {"beta", "gamma", "epsilon"}),
    (("format", "!?=", ["qcow2"]), {"beta", "gamma", "epsilon"}),
    (("format", "~=", "q%"), ROOTS),
    (("format", "!~=", "q%"), {"beta", "gamma", "epsilon"}),
    (("format", "is null"), set()),
    (("format", "not null"), ALL),
]


async def test_every_operator_on_every_field_type(pg: PgStack) -> None:
    await insert_images(pg.db, OPERATOR_IMAGES)
    ops_by_field: dict[str, set[str]] = {}
    failures = []
    replies = await asyncio.gather(*(query(pg, c) for c, _ in OPERATOR_CASES))
    for (condition, expected), reply in zip(OPERATOR_CASES, replies, strict=True):
        ops_by_field.setdefault(condition[0], set()).add(condition[1])
        if not reply.get("success"):
            failures.append(f"{condition}: {reply.get('error')}")
            continue
        got = [inv["name"] for inv in reply["inventories"]]
        if sorted(got) != sorted(expected):
            failures.append(f"{condition}: expected {sorted(expected)}, got {sorted(got)}")
    assert not failures, "\n".join(failures)
    every_op = {"=", "!=", ">", ">=", "<", "<=", "?=", "!?=", "~=", "!~=", "is null", "not null"}
    for name in ("name", "description", "size", "virtualSize", "system", "createDate"):
        assert ops_by_field[name] == every_op, name
    for name in ("status", "mediaType", "platform", "format"):
        assert ops_by_field[name] == every_op, name


async def test_conditions_are_anded(pg: PgStack) -> None:
    await insert_images(pg.db, OPERATOR_IMAGES)
    assert await names(pg) == ALL
    assert await names(pg, ("status", "=", "Ready"), ("system", "=", False)) == {
        "alpha",
        "gamma",
        "centos7",
    }
    assert await names(
        pg, ("status", "=", "Ready"), ("system", "=", False), ("size", ">=", 200)
    ) == {"gamma", "centos7"}
    assert await names(pg, ("platform", "=", "Linux"), ("name", "~=", "c%")) == {"centos7"}
    assert await names(pg, ("name", "=", "alpha"), ("name", "=", "beta")) == set()
    assert await names(pg, ("size", ">", 100), ("size", "<", 300)) == {"beta"}
    reply = await query(
        pg, ("platform", "=", "Windows"), ("state", "=", "Disabled"), replyWithCount=True
    )
    assert reply["total"] == 2 and len(reply["inventories"]) == 2


# --- nested conditions --------------------------------------------------------------------


async def test_nested_backup_storage_and_refs(pg: PgStack) -> None:
    bs = {
        "bs1": await insert_backup_storage(pg.db, "bs1"),
        "bs2": await insert_backup_storage(pg.db, "bs2", status="Disconnected"),
        "bs3": await insert_backup_storage(pg.db, "bs3", state="Disabled"),
    }
    images = [
        Img("centos-a", bs_names=["bs1", "bs2", "bs3"]),  # three refs, all matching %centos%
        Img("centos-b", bs_names=["bs1"]),
        Img("ubuntu", bs_names=["bs2", "bs3"]),
        Img("nowhere", status="Downloading"),
    ]
    await insert_images(pg.db, images, bs)
    assert await names(pg, ("backupStorage.name", "=", "bs1")) == {"centos-a", "centos-b"}
    assert await names(pg, ("backupStorage.name", "=", "bs3")) == {"centos-a", "ubuntu"}
    assert await names(pg, ("backupStorage.name", "!=", "bs1")) == {"centos-a", "ubuntu"}
    assert await names(pg, ("backupStorage.status", "=", "Disconnected")) == {
        "centos-a",
        "ubuntu",
    }
    assert await names(pg, ("backupStorage.state", "=", "Disabled")) == {"centos-a", "ubuntu"}
    assert await names(pg, ("backupStorage.uuid", "=", bs["bs1"])) == {"centos-a", "centos-b"}
    assert await names(pg, ("backupStorage.totalCapacity", ">", 0)) == {
        "centos-a",
        "centos-b",
        "ubuntu",
    }
    assert await names(pg, ("backupStorage.name", "is null")) == set()
    # A nested condition matching several rows of one image returns the image once.
    reply = await query(pg, ("backupStorage.name", "~=", "bs%"), replyWithCount=True)
    assert sorted(i["name"] for i in reply["inventories"]) == ["centos-a", "centos-b", "ubuntu"]
    assert reply["total"] == 3
    reply = await query(pg, ("backupStorageRef.installPath", "~=", "%centos%"), replyWithCount=True)
    assert sorted(i["name"] for i in reply["inventories"]) == ["centos-a", "centos-b"]
    assert reply["total"] == 2
    reply = await query(pg, ("backupStorage.name", "?=", ["bs1", "bs2", "bs3"]), count=True)
    assert reply["total"] == 3
    assert await names(pg, ("backupStorageRef.backupStorageUuid", "=", bs["bs2"])) == {
        "centos-a",
        "ubuntu",
    }
    assert await names(pg, ("backupStorageRef.status", "=", "Ready")) == {
        "centos-a",
        "centos-b",
        "ubuntu",
    }
    # Each nested condition is its own EXISTS: bs1 and bs2 need not be the same row.
    assert await names(
        pg, ("backupStorage.name", "=", "bs1"), ("backupStorage.name", "=", "bs2")
    ) == {"centos-a"}
    # Mixed with plain conditions.
    assert await names(
        pg, ("backupStorage.name", "=", "bs2"), ("name", "~=", "ubu%"), ("status", "=", "Ready")
    ) == {"ubuntu"}
    # The inventory carries its refs.
    (inv,) = await found(pg, ("name", "=", "centos-a"))
    assert {r["backupStorageUuid"] for r in inv["backupStorageRefs"]} == set(bs.values())


async def test_volume_events_feed_volume_queries(stack: Stack) -> None:
    img_a, img_b = Img("image-a"), Img("image-b")
    await insert_images(stack.db, [img_a, img_b])
    vm1, vm2, vm3 = hexid(), hexid(), hexid()
    v1, v2, v3 = hexid(), hexid(), hexid()

    async def vm_images(vm: str) -> set[str]:
        return await names(stack, ("volume.vmInstanceUuid", "=", vm))

    await stack.publish_event(f"volume.created.{v1}", volume_body(v1, vm1, img_a.uuid))
    await stack.publish_event(
        f"volume.created.{v2}",
        volume_body(v2, vm1, img_a.uuid, type="Data", size=2**40),
    )
    await stack.publish_event(f"volume.created.{v3}", volume_body(v3, vm2, img_b.uuid))
    await wait_for(lambda: _count_volumes(stack, 3), timeout=10)
    # Two volumes of vm1 come from image-a: the image is listed once and counted once.
    reply = await query(stack, ("volume.vmInstanceUuid", "=", vm1), replyWithCount=True)
    assert [i["name"] for i in reply["inventories"]] == ["image-a"]
    assert reply["total"] == 1
    assert await vm_images(vm2) == {"image-b"}
    assert await names(stack, ("volume.vmInstanceUuid", "?=", [vm1, vm2])) == {
        "image-a",
        "image-b",
    }
    assert await names(stack, ("volume.type", "=", "Data")) == {"image-a"}
    assert await names(stack, ("volume.size", ">", 2**32)) == {"image-a"}
    assert await names(stack, ("volume.installPath", "~=", "file://%")) == {"image-a", "image-b"}
    assert await names(stack, ("volume.uuid", "=", v3)) == {"image-b"}

    # updated: v3 moves to vm3.
    await stack.publish_event(f"volume.updated.{v3}", volume_body(v3, vm3, img_b.uuid))
    assert await wait_for(lambda: vm_images(vm3), timeout=10) == {"image-b"}
    assert await vm_images(vm2) == set()

    # deleted: v1 drops out; image-a still has v2 on vm1, then none.
    await stack.publish_event(f"volume.deleted.{v1}", {"uuid": v1})
    await wait_for(lambda: _is_empty(names(stack, ("volume.uuid", "=", v1))), timeout=10)
    assert await vm_images(vm1) == {"image-a"}
    await stack.publish_event(f"volume.deleted.{v2}", volume_body(v2, vm1, img_a.uuid))
    await wait_for(lambda: _is_empty(vm_images(vm1)), timeout=10)
    assert await names(stack, ("volume.type", "=", "Data")) == set()

    # A replayed `created` after `deleted` does not revive; nor does a `created` that arrives
    # after its own `deleted` (reordered). A deleted event is idempotent.
    v4 = hexid()
    await stack.publish_event(f"volume.deleted.{v4}", {"uuid": v4})
    await stack.publish_event(f"volume.created.{v1}", volume_body(v1, vm1, img_a.uuid))
    await stack.publish_event(f"volume.deleted.{v1}", {"uuid": v1})
    await stack.publish_event(f"volume.created.{v4}", volume_body(v4, vm1, img_b.uuid))
    await stack.publish_event(f"volume.updated.{v2}", volume_body(v2, vm1, img_a.uuid))
    marker = hexid()
    await stack.publish_event(f"volume.created.{marker}", volume_body(marker, vm2, img_b.uuid))
    assert await wait_for(lambda: vm_images(vm2), timeout=10) == {"image-b"}
    # The marker came after them all. The replays leave no trace of their own; v4's deletion
    # does (a tombstone), whichever of its two events was handled first.
    await wait_for(lambda: _tombstoned(stack, v4), timeout=10)
    assert await vm_images(vm1) == set()
    assert await names(stack, ("volume.uuid", "?=", [v1, v2, v4])) == set()


async def _count_volumes(stack: Stack, n: int) -> bool:
    return (await stack.db.fetchval("SELECT count(*) FROM volume WHERE NOT deleted")) >= n


async def _is_empty(awaitable: Any) -> bool:
    return not await awaitable


async def _tombstoned(stack: Stack, volume_uuid: str) -> bool:
    return bool(await stack.db.fetchval("SELECT deleted FROM volume WHERE uuid = $1", volume_uuid))


async def test_malformed_volume_events_are_dropped(stack: Stack) -> None:
    img = Img("image-m")
    await insert_images(stack.db, [img])
    vm = hexid()
    routed, body_uuid, good = hexid(), hexid(), hexid()
    bad: list[tuple[str, bytes | dict[str, Any]]] = [
        (f"volume.created.{routed}", b"garbage{"),
        (f"volume.created.{routed}", b'["not", "an", "object"]'),
        (f"volume.created.{routed}", {"uuid": "not-a-uuid"}),
        (f"volume.created.{routed}", volume_body(routed, vm, img.uuid, size="huge")),
        # The body names another volume than the routing key.
        (f"volume.created.{routed}", volume_body(body_uuid, vm, img.uuid)),
        (f"volume.exploded.{routed}", volume_body(routed, vm, img.uuid)),
    ]
    for key, body in bad:
        await stack.publish_event(key, body)
    # A later good event still applies: the queue is not blocked.
    await stack.publish_event(f"volume.created.{good}", volume_body(good, vm, img.uuid))
    assert await wait_for(lambda: names(stack, ("volume.vmInstanceUuid", "=", vm))) == {"image-m"}

    # Each bad one is logged as dropped once it has been handled.
    async def all_dropped() -> bool:
        log = stack.services[0].log().splitlines()
        return sum(routed in line and "dropped" in line for line in log) >= len(bad)

    await wait_for(all_dropped, timeout=10)
    rows = await stack.db.fetch("SELECT uuid FROM volume")
    assert {r["uuid"] for r in rows} == {good}
    assert await names(stack, ("volume.uuid", "?=", [routed, body_uuid])) == set()
    assert all(proc.running for proc in stack.services)


# --- user tags ----------------------------------------------------------------------------


async def test_user_tags_create_query_delete(stack: Stack) -> None:
    img_a, img_b, img_c = Img("tagged-a"), Img("tagged-b"), Img("untagged")
    await insert_images(stack.db, [img_a, img_b, img_c])

    async def tag(resource: str, text: str) -> dict[str, Any]:
        reply = await stack.call(
            "CreateUserTag", {"resourceType": "ImageVO", "resourceUuid": resource, "tag": text}
        )
        assert reply["success"], reply
        return dict(reply["inventory"])

    golden = await tag(img_a.uuid, "golden-image")
    assert golden["resourceType"] == "ImageVO" and golden["type"] == "User"
    assert golden["resourceUuid"] == img_a.uuid and golden["tag"] == "golden-image"
    assert re.fullmatch(r"[0-9a-f]{32}", golden["uuid"])
    await tag(img_a.uuid, "golden-image-v2")
    await tag(img_b.uuid, "golden-image")
    await tag(img_b.uuid, "team::qa")

    assert await names(stack, ("__userTag__", "=", "golden-image")) == {"tagged-a", "tagged-b"}
    # Two tags of tagged-a match: it is listed and counted once.
    reply = await query(stack, ("__userTag__", "~=", "golden%"), replyWithCount=True)
    assert sorted(i["name"] for i in reply["inventories"]) == ["tagged-a", "tagged-b"]
    assert reply["total"] == 2
    assert await names(stack, ("__userTag__", "=", "team::qa")) == {"tagged-b"}
    assert await names(stack, ("__userTag__", "?=", ["team::qa", "nope"])) == {"tagged-b"}
    assert await names(stack, ("__userTag__", "!=", "golden-image")) == {"tagged-a", "tagged-b"}
    assert await names(stack, ("__userTag__", "not null")) == {"tagged-a", "tagged-b"}
    assert await names(stack, ("__userTag__", "=", "golden-image"), ("name", "=", "tagged-b")) == {
        "tagged-b"
    }

    # QueryUserTag with conditions.
    tags = await found(stack, ("resourceUuid", "=", img_a.uuid), api="QueryUserTag")
    assert sorted(t["tag"] for t in tags) == ["golden-image", "golden-image-v2"]
    tags = await found(stack, ("tag", "=", "golden-image"), api="QueryUserTag")
    assert sorted(t["resourceUuid"] for t in tags) == sorted([img_a.uuid, img_b.uuid])
    tags = await found(
        stack, ("tag", "~=", "golden%"), ("resourceType", "=", "ImageVO"), api="QueryUserTag"
    )
    assert len(tags) == 3
    tags = await found(stack, ("createDate", ">", "2000-01-01T00:00:00Z"), api="QueryUserTag")
    assert len(tags) == 4
    tags = await found(stack, ("uuid", "=", golden["uuid"]), api="QueryUserTag")
    assert tags == [golden]
    reply = await query(stack, ("type", "=", "User"), api="QueryUserTag", count=True)
    assert reply["success"] and reply["total"] == 4
    tags = await found(stack, api="QueryUserTag", fields=["tag"], sortBy="tag", limit=2)
    assert tags == [{"tag": "golden-image"}, {"tag": "golden-image"}]

    # DeleteTag: the tag is gone and no longer matches.
    reply = await stack.call("DeleteTag", {"uuid": golden["uuid"]})
    assert reply["success"], reply
    assert await found(stack, ("uuid", "=", golden["uuid"]), api="QueryUserTag") == []
    assert await names(stack, ("__userTag__", "=", "golden-image")) == {"tagged-b"}
    assert await names(stack, ("__userTag__", "~=", "golden%")) == {"tagged-a", "tagged-b"}

    # Refusals.
    reply = await stack.call(
        "CreateUserTag", {"resourceType": "ImageVO", "resourceUuid": hexid(), "tag": "x"}
    )
    assert reply["error"]["code"] == "RESOURCE_NOT_FOUND", reply
    reply = await stack.call(
        "CreateUserTag", {"resourceType": "VmInstanceVO", "resourceUuid": img_c.uuid, "tag": "x"}
    )
    assert reply["error"]["code"] == "INVALID_ARGUMENT", reply
    assert "resourceType" in reply["error"]["details"]
    assert "nosuch" in await invalid(stack, ("nosuch", "=", "x"), api="QueryUserTag")


async def test_real_images_queries_and_tags_go_with_the_image(stack: Stack) -> None:
    bs1 = await stack.start_agent("bs1")
    url, md5 = stack.http.add("centos-real.raw", b"\x01" * 300_000)
    reply = await stack.add_image(url, [bs1], name="centos-real", format="raw", platform="Linux")
    assert reply["success"], reply
    inv = reply["inventory"]
    url2, _ = stack.http.add("other.raw", b"\x02" * 1000)
    reply = await stack.add_image(url2, [bs1], name="other", format="raw", system=True)
    assert reply["success"], reply
    other = reply["inventory"]

    (got,) = await found(stack, ("uuid", "=", inv["uuid"]))
    assert got == inv
    for condition in [
        ("status", "=", "Ready"),
        ("backupStorage.name", "=", "bs1"),
        ("backupStorage.uuid", "=", bs1.uuid),
        ("backupStorageRef.installPath", "~=", f"{bs1.root}/templates/%"),
        ("lastOpDate", ">=", inv["createDate"]),
    ]:
        assert await names(stack, condition) == {"centos-real", "other"}, condition
    for condition in [
        ("backupStorageRef.installPath", "~=", "%centos%"),
        ("md5Sum", "=", md5),
        ("size", "=", 300_000),
        ("createDate", "=", inv["createDate"]),
        ("createDate", "<=", inv["createDate"]),
        ("system", "=", False),
        ("name", "~=", "%cent%"),
    ]:
        assert await names(stack, condition) == {"centos-real"}, condition
    assert await names(stack, ("backupStorage.name", "=", "bs1"), ("system", "=", True)) == {
        "other"
    }
    reply = await query(stack, ("backupStorage.name", "=", "bs1"), count=True)
    assert reply["total"] == 2

    # QueryBackupStorage with conditions on the real agent.
    bs_rows = await found(stack, ("name", "=", "bs1"), api="QueryBackupStorage")
    assert [b["uuid"] for b in bs_rows] == [bs1.uuid]
    assert bs_rows[0]["status"] == "Connected" and bs_rows[0]["url"] == str(bs1.root)
    for condition in [
        ("status", "=", "Connected"),
        ("state", "!=", "Disabled"),
        ("totalCapacity", ">", 0),
        ("availableCapacity", "<=", bs_rows[0]["totalCapacity"]),
        ("uuid", "?=", [bs1.uuid, hexid()]),
        ("createDate", "<=", bs_rows[0]["createDate"]),
        ("description", "is null"),
    ]:
        got_bs = await found(stack, condition, api="QueryBackupStorage")
        assert [b["uuid"] for b in got_bs] == [bs1.uuid], condition
    assert await found(stack, ("status", "=", "Disconnected"), api="QueryBackupStorage") == []
    assert await found(stack, ("name", "~=", "nope%"), api="QueryBackupStorage") == []
    details = await invalid(stack, ("status", "=", "Broken"), api="QueryBackupStorage")
    assert "Broken" in details
    assert "bogus" in await invalid(stack, api="QueryBackupStorage", sortBy="bogus")

    # Tags, then DeleteImage: the tags go away with the image.
    for text in ("golden-image", "keep-me"):
        reply = await stack.call(
            "CreateUserTag",
            {"resourceType": "ImageVO", "resourceUuid": inv["uuid"], "tag": text},
        )
        assert reply["success"], reply
    reply = await stack.call(
        "CreateUserTag", {"resourceType": "ImageVO", "resourceUuid": other["uuid"], "tag": "x"}
    )
    assert reply["success"], reply
    assert await names(stack, ("__userTag__", "=", "golden-image")) == {"centos-real"}
    reply = await stack.call("DeleteImage", {"uuid": inv["uuid"]})
    assert reply["success"], reply
    assert await found(stack, ("uuid", "=", inv["uuid"])) == []
    assert await names(stack, ("__userTag__", "=", "golden-image")) == set()
    assert await found(stack, ("resourceUuid", "=", inv["uuid"]), api="QueryUserTag") == []
    remaining = await found(stack, api="QueryUserTag")
    assert [t["resourceUuid"] for t in remaining] == [other["uuid"]]


# --- sorting, paging, count, fields -------------------------------------------------------


async def test_sorting_on_several_fields(pg: PgStack) -> None:
    rng = random.Random(7)
    images = [
        Img(
            f"img{i:02d}",
            size=rng.choice([None, *range(1000, 1020)]) if i % 5 else None,
            system=rng.random() < 0.3,
            create_date=BASE + timedelta(minutes=rng.randint(0, 10)),
            platform=rng.choice(["Linux", "Windows", "Other", "Paravirtualization"]),
        )
        for i in range(25)
    ]
    for img in images:
        if img.size is None:
            img.status, img.virtual_size = "Downloading", None
    rng.shuffle(images)
    await insert_images(pg.db, images)

    def default_key(img: Img) -> tuple[datetime, str]:
        return (img.create_date, img.uuid)

    async def order(**params: Any) -> list[str]:
        return [i["uuid"] for i in await found(pg, **params)]

    # No sortBy: createDate then uuid.
    assert await order() == [i.uuid for i in sorted(images, key=default_key)]
    # sortBy name, both directions (names are distinct).
    by_name = [i.uuid for i in sorted(images, key=lambda i: i.name)]
    assert await order(sortBy="name") == by_name
    assert await order(sortBy="name", sortDirection="asc") == by_name
    assert await order(sortBy="name", sortDirection="desc") == by_name[::-1]
    # sortBy createDate desc; ties keep the default order (createDate, uuid) among themselves.
    got = await order(sortBy="createDate", sortDirection="desc")
    dates = {i.uuid: i.create_date for i in images}
    assert [dates[u] for u in got] == sorted(dates.values(), reverse=True)
    assert got == [
        i.uuid for i in sorted(images, key=lambda i: (-i.create_date.timestamp(), i.uuid))
    ]
    # sortBy size: non-null values in order, nulls together at one end.
    for direction in ("asc", "desc"):
        got = await order(sortBy="size", sortDirection=direction)
        sizes = {i.uuid: i.size for i in images}
        values = [sizes[u] for u in got]
        known = [v for v in values if v is not None]
        assert known == sorted(known, reverse=direction == "desc"), (direction, values)
        nulls = [v is None for v in values]
        assert nulls == sorted(nulls) or nulls == sorted(nulls, reverse=True), values
        assert sorted(got) == sorted(sizes)
    # sortBy an enum and a bool: ties broken by createDate, uuid.
    got = await order(sortBy="platform")
    assert got == [i.uuid for i in sorted(images, key=lambda i: (i.platform, *default_key(i)))]
    got = await order(sortBy="system", sortDirection="desc")
    assert got == [i.uuid for i in sorted(images, key=lambda i: (not i.system, *default_key(i)))]
    # Sorting applies before paging.
    assert await order(sortBy="name", sortDirection="desc", start=3, limit=4) == by_name[::-1][3:7]


async def test_paging_over_equal_create_dates_never_skips_or_repeats(pg: PgStack) -> None:
    images = [Img(f"same-{i:02d}", system=i % 3 == 0, create_date=BASE) for i in range(50)]
    await insert_images(pg.db, images)
    expected = sorted(img.uuid for img in images)
    for limit in (1, 7, 10, 49, 50, 1000):
        pages = [
            [i["uuid"] for i in await found(pg, start=start, limit=limit)]
            for start in range(0, 50, limit)
        ]
        seen = [u for page in pages for u in page]
        assert seen == expected, f"limit={limit}"
        assert all(len(page) == min(limit, 50 - n * limit) for n, page in enumerate(pages))
    # Beyond the end: empty page; total still counts everything.
    reply = await query(pg, start=50, limit=10, replyWithCount=True)
    assert reply["inventories"] == [] and reply["total"] == 50
    # Paging with a sortBy full of ties, with a condition: still a total order.
    system = {img.uuid: img.system for img in images}
    want = sorted(expected, key=lambda u: (not system[u], u))
    seen = []
    for start in range(0, 50, 6):
        seen += [
            i["uuid"]
            for i in await found(
                pg, ("name", "~=", "same-%"), sortBy="system", sortDirection="desc",
                start=start, limit=6,
            )
        ]  # fmt: skip
    assert seen == want
    # Several concurrent pages agree with the sequential walk.
    pages = await asyncio.gather(*(found(pg, start=s, limit=5) for s in range(0, 50, 5)))
    assert [i["uuid"] for page in pages for i in page] == expected


async def test_count_reply_with_count_and_fields(pg: PgStack) -> None:
    await insert_images(pg.db, OPERATOR_IMAGES)
    # Plain query: inventories, no total.
    reply = await query(pg, ("status", "=", "Ready"))
    assert reply["success"] and "total" not in reply
    assert len(reply["inventories"]) == len(READY)
    # count=true: total, and no inventory (the service sends an empty list).
    reply = await query(pg, ("status", "=", "Ready"), count=True)
    assert reply["success"] and reply["total"] == len(READY)
    assert reply.get("inventories", []) == []
    reply = await query(pg, count=True, limit=1)
    assert reply["total"] == len(ALL)
    # count=true with replyWithCount=true: count wins (only the total).
    reply = await query(pg, count=True, replyWithCount=True)
    assert reply["total"] == len(ALL) and reply.get("inventories", []) == []
    # replyWithCount: both; total is independent of limit/start.
    reply = await query(pg, ("status", "=", "Ready"), replyWithCount=True, limit=2, start=1)
    assert reply["total"] == len(READY) and len(reply["inventories"]) == 2
    reply = await query(pg, ("name", "=", "nope"), replyWithCount=True)
    assert reply["total"] == 0 and reply["inventories"] == []
    # fields: only those keys, in the same order as without fields.
    full = await found(pg)
    slim = await found(pg, fields=["uuid", "name"])
    assert all(set(inv) == {"uuid", "name"} for inv in slim)
    assert slim == [{"uuid": i["uuid"], "name": i["name"]} for i in full]
    refs = await found(pg, ("name", "=", "alpha"), fields=["backupStorageRefs", "createDate"])
    assert refs == [{"backupStorageRefs": [], "createDate": "2024-03-01T12:00:00.000000Z"}]
    reply = await query(pg, fields=["uuid"], replyWithCount=True, sortBy="size", limit=3)
    assert reply["total"] == len(ALL)
    assert [set(i) for i in reply["inventories"]] == [{"uuid"}] * 3


# --- errors -------------------------------------------------------------------------------


async def test_invalid_queries_name_the_offender(pg: PgStack) -> None:
    await insert_images(pg.db, OPERATOR_IMAGES[:2])
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"conditions": [{"name": "nosuchfield", "op": "=", "value": "x"}]}, ["nosuchfield"]),
        ({"conditions": [{"name": "backupStorage.nosuch", "op": "=", "value": "x"}]}, ["nosuch"]),
        ({"conditions": [{"name": "volume.bogus", "op": "=", "value": "x"}]}, ["bogus"]),
        ({"conditions": [{"name": "nowhere.name", "op": "=", "value": "x"}]}, ["nowhere"]),
        ({"conditions": [{"name": "backupStorageRefs", "op": "=", "value": "x"}]}, ["backupStorageRefs"]),
        ({"conditions": [{"name": "name", "op": "=~", "value": "x"}]}, ["=~"]),
        ({"conditions": [{"name": "name", "op": "like", "value": "x"}]}, ["like"]),
        ({"conditions": [{"name": "name", "op": "==", "value": "x"}]}, ["=="]),
        ({"conditions": [{"name": "size", "op": "=", "value": "abc"}]}, ["size", "abc"]),
        ({"conditions": [{"name": "size", "op": ">", "value": 1.5}]}, ["size"]),
        ({"conditions": [{"name": "size", "op": "?=", "value": [1, "abc"]}]}, ["size", "abc"]),
        ({"conditions": [{"name": "virtualSize", "op": "<", "value": True}]}, ["virtualSize"]),
        ({"conditions": [{"name": "system", "op": "=", "value": "maybe"}]}, ["system", "maybe"]),
        ({"conditions": [{"name": "system", "op": "=", "value": 1}]}, ["system"]),
        ({"conditions": [{"name": "createDate", "op": ">", "value": "yesterday"}]}, ["createDate", "yesterday"]),
        ({"conditions": [{"name": "createDate", "op": "=", "value": 1700000000}]}, ["createDate"]),
        ({"conditions": [{"name": "status", "op": "=", "value": "Broken"}]}, ["status", "Broken"]),
        ({"conditions": [{"name": "platform", "op": "=", "value": "linux"}]}, ["platform", "linux"]),
        ({"conditions": [{"name": "mediaType", "op": "?=", "value": ["ISO", "Floppy"]}]}, ["mediaType", "Floppy"]),
        ({"conditions": [{"name": "format", "op": "!=", "value": "vmdk"}]}, ["format", "vmdk"]),
        ({"conditions": [{"name": "state", "op": ">", "value": "Off"}]}, ["state", "Off"]),
        ({"conditions": [{"name": "backupStorage.status", "op": "=", "value": "Up"}]}, ["backupStorage.status"]),
        ({"conditions": [{"name": "name", "op": "="}]}, ["name"]),
        ({"conditions": [{"name": "name", "op": "?=", "value": []}]}, ["name"]),
        ({"conditions": [{"name": "name", "op": "=", "value": {"a": 1}}]}, ["name"]),
        ({"conditions": [{"name": "name", "op": "~=", "value": 5}]}, ["name"]),
        ({"conditions": [{"name": "name", "value": "x"}]}, ["op"]),
        ({"conditions": [{"op": "=", "value": "x"}]}, ["name"]),
        ({"conditions": [{"name": "name", "op": "=", "value": "x", "extra": 1}]}, ["extra"]),
        ({"conditions": "name=x"}, ["conditions"]),
        ({"limit": -1}, ["limit"]),
        ({"start": 2**63}, ["start"]),
        ({"limit": 2**31}, ["limit"]),
        ({"limit": "10"}, ["limit"]),
        ({"start": -1}, ["start"]),
        ({"count": "yes"}, ["count"]),
        ({"fields": ["uuid", "bogusfield"]}, ["bogusfield"]),
        ({"fields": "uuid"}, ["fields"]),
        ({"sortBy": "bogussort"}, ["bogussort"]),
        ({"sortBy": "backupStorage.name"}, ["backupStorage.name"]),
        ({"sortDirection": "sideways"}, ["sortDirection"]),
        ({"unknownParam": 1}, ["unknownParam"]),
    ]  # fmt: skip
    replies = await asyncio.gather(*(pg.call("QueryImage", params) for params, _ in cases))
    failures = []
    for (params, words), reply in zip(cases, replies, strict=True):
        error = reply.get("error") or {}
        details = str(error.get("details") or "")
        if reply.get("success") is not False or error.get("code") != "INVALID_ARGUMENT":
            failures.append(f"{params}: expected INVALID_ARGUMENT, got {reply}")
        elif not all(word in details for word in words):
            failures.append(f"{params}: details {details!r} do not name {words}")
    assert not failures, "\n".join(failures)
    # Limits at the edges are fine.
    assert len(await found(pg, limit=1)) == 1
    assert len(await found(pg, limit=10000)) == 2
    assert await found(pg, start=10**6) == []
    # The queries still work after all that.
    assert len(await found(pg)) == 2


# --- injection ----------------------------------------------------------------------------

HOSTILE = [
    "x'; DROP TABLE image; --",
    "' OR '1'='1",
    "'; DELETE FROM image WHERE ''='",
    '"; DROP TABLE image; --',
    "\\'; DROP TABLE image; --",
    "$1",
    "%' OR 1=1 --",
    "a) OR (1=1",
]


async def test_injection_attempts_are_values_or_invalid(stack: Stack) -> None:
    quoted = Img('O\'Brien "quoted" -- image; DROP', description="it's; --")
    plain = Img("plain")
    await insert_images(stack.db, [quoted, plain])
    reply = await stack.call(
        "CreateUserTag",
        {"resourceType": "ImageVO", "resourceUuid": plain.uuid, "tag": HOSTILE[0]},
    )
    assert reply["success"], reply
    bs = await insert_backup_storage(stack.db, "bs'; --")
    await stack.db.execute(
        "INSERT INTO image_backup_storage_ref (image_uuid, backup_storage_uuid, install_path,"
        " status) VALUES ($1, $2, '/x', 'Ready')",
        quoted.uuid,
        bs,
    )

    # Values: harmless, matching only what they literally say.
    for value in HOSTILE:
        for name in ("name", "description", "url", "md5Sum", "backupStorage.name", "volume.name"):
            for op in ("=", "!=", "~=", "?=", ">"):
                arg = [value, "x"] if op == "?=" else value
                reply = await query(stack, (name, op, arg))
                assert reply["success"], (name, op, value, reply)
                got = {i["name"] for i in reply["inventories"]}
                if op in ("=", "~=", "?="):
                    assert got == set(), (name, op, value, got)
        for name in ("size", "system", "createDate", "status", "platform"):
            assert await invalid(stack, (name, "=", value)), (name, value)
    assert await names(stack, ("name", "=", quoted.name)) == {quoted.name}
    assert await names(stack, ("name", "?=", [quoted.name, "plain"])) == {quoted.name, "plain"}
    assert await names(stack, ("name", "~=", "O'Brien%")) == {quoted.name}
    assert await names(stack, ("description", "=", "it's; --")) == {quoted.name}
    assert await names(stack, ("backupStorage.name", "=", "bs'; --")) == {quoted.name}
    assert await names(stack, ("__userTag__", "=", HOSTILE[0])) == {"plain"}
    tags = await found(stack, ("tag", "=", HOSTILE[0]), api="QueryUserTag")
    assert [t["resourceUuid"] for t in tags] == [plain.uuid]

    # Identifiers: field names, ops, sortBy, fields are never SQL; all INVALID_ARGUMENT.
    for value in HOSTILE:
        await invalid(stack, (value, "=", "x"))
        await invalid(stack, (f"name{value}", "=", "x"))
        await invalid(stack, (f"backupStorage.{value}", "=", "x"))
        await invalid(stack, ("name", value[:8], "x"))
        await invalid(stack, sortBy=value)
        await invalid(stack, sortBy="name", sortDirection=value)
        await invalid(stack, fields=["uuid", value])
        await invalid(stack, (value, "=", "x"), api="QueryBackupStorage")
        await invalid(stack, (value, "=", "x"), api="QueryUserTag")
    await invalid(stack, ("uuid; DROP TABLE image", "is null"))
    await invalid(stack, limit="1; DROP TABLE image")

    # Everything is still there.
    assert await stack.db.fetchval("SELECT to_regclass('public.image') IS NOT NULL")
    assert await stack.db.fetchval("SELECT count(*) FROM image") == 2
    assert await stack.db.fetchval("SELECT count(*) FROM user_tag") == 1
    assert await names(stack) == {quoted.name, "plain"}


# --- property: the service agrees with a plain-Python model --------------------------------

STATUS_ORDER = {"Creating": 0, "Downloading": 1, "Ready": 2}  # the PostgreSQL enum's order
NAME_POOL = ["centos7", "centos8", "ubuntu2204", "ubuntu2004", "win2019", "debian12", "alpine"]
DESC_POOL = [None, None, "", "golden", "test image", "first", "it's"]
BS_NAMES = ["bs1", "bs2", "bs3", "BS4"]
LIKE_POOL = ["%cent%", "centos%", "%7", "_buntu%", "%", "win____", "%o%s%", "a%", "", "Re%", "%i%"]
PROPERTY_FIELDS = [
    "name",
    "description",
    "size",
    "virtualSize",
    "system",
    "status",
    "platform",
    "createDate",
    "backupStorage.name",
]
PROPERTY_OPS = ["=", "!=", ">", ">=", "<", "<=", "?=", "!?=", "~=", "!~=", "is null", "not null"]


def property_dataset(seed: int = 20240301, count: int = 60) -> list[Img]:
    rng = random.Random(seed)
    images = []
    for i in range(count):
        status = rng.choice(["Ready"] * 4 + ["Downloading", "Creating"])
        media = rng.choice(["RootVolumeTemplate"] * 3 + ["DataVolumeTemplate", "ISO"])
        images.append(
            Img(
                name=rng.choice(NAME_POOL) + rng.choice(["", "", f"-{i}"]),
                description=rng.choice(DESC_POOL),
                size=rng.choice([0, 1024, 1024, 4096, 2**20, 2**30, 5 * 2**30, 2**40]),
                virtual_size=rng.choice([None, 2**30, 8 * 2**30, 2**34]),
                system=rng.random() < 0.3,
                create_date=BASE + timedelta(minutes=rng.randint(0, 40)),
                status=status,
                state=rng.choice(["Enabled", "Enabled", "Disabled"]),
                media_type=media,
                platform=rng.choice(["Linux", "Linux", "Windows", "Paravirtualization", "Other"]),
                format=rng.choice(["qcow2", "raw"]),
                bs_names=rng.sample(BS_NAMES, rng.choice([0, 1, 1, 2, 3])),
            )
        )
    return images


def pyvalue(img: Img, name: str) -> list[Any]:
    """The values a condition on `name` is tested against (any of them may match)."""
    if name == "backupStorage.name":
        return list(img.bs_names)
    attr = {"virtualSize": "virtual_size", "createDate": "create_date"}.get(name, name)
    return [getattr(img, attr)]


def parse_date(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cast(name: str, value: Any) -> Any:
    if name in ("size", "virtualSize"):
        return int(value)
    if name == "system":
        return value if isinstance(value, bool) else value.lower() == "true"
    if name == "createDate":
        return parse_date(value)
    return value


def like(text: str, pattern: str) -> bool:
    regex = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, text, re.S) is not None


def as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def matches(name: str, op: str, raw: Any, value: Any) -> bool:
    """SQL's three-valued logic, collapsed: anything compared with NULL is not a match."""
    if op == "is null":
        return value is None
    if op == "not null":
        return value is not None
    if value is None:
        return False
    if op in ("~=", "!~="):
        hit = like(as_text(value), raw)
        return hit if op == "~=" else not hit
    if op in ("?=", "!?="):
        items = raw.split(",") if isinstance(raw, str) else raw
        hit = value in [cast(name, item) for item in items]
        return hit if op == "?=" else not hit

    def key(v: Any) -> Any:
        return STATUS_ORDER[v] if name == "status" else v

    a, b = key(value), key(cast(name, raw))
    return {
        "=": a == b,
        "!=": a != b,
        ">": a > b,
        ">=": a >= b,
        "<": a < b,
        "<=": a <= b,
    }[op]


def evaluate(images: list[Img], conditions: list[dict[str, Any]]) -> set[str]:
    return {
        img.uuid
        for img in images
        if all(
            any(matches(c["name"], c["op"], c.get("value"), v) for v in pyvalue(img, c["name"]))
            for c in conditions
        )
    }


class Picker:
    """What the condition generator needs from a source of randomness (random or hypothesis)."""

    def __init__(self, choice: Callable[[Sequence[Any]], Any], randint: Callable[[int, int], int]):
        self.choice = choice
        self.randint = randint

    def sample(self, pool: Sequence[Any], k: int) -> list[Any]:
        return [self.choice(pool) for _ in range(k)]


def date_text(p: Picker, moment: datetime) -> str:
    moment += timedelta(seconds=p.choice([0, 0, 0, -1, 1, 30]))
    style = p.choice(["Z", "offset", "iso", "naive", "micro"])
    if style == "Z":
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == "offset":
        return moment.astimezone(timezone(timedelta(hours=-5))).isoformat()
    if style == "naive":
        return moment.replace(tzinfo=None).isoformat()
    if style == "micro":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.isoformat()


def pick_value(p: Picker, images: list[Img], name: str) -> Any:
    if name in ("name", "description"):
        pool = [v for img in images for v in pyvalue(img, name) if v is not None]
        return p.choice([*pool, "nope", "centos", "m", ""])
    if name == "backupStorage.name":
        return p.choice([*BS_NAMES, "nope", "bs"])
    if name in ("size", "virtualSize"):
        pool = [v for img in images for v in pyvalue(img, name) if v is not None]
        value = p.choice(pool) + p.choice([0, 0, -1, 1])
        return p.choice([value, str(value)])
    if name == "system":
        return p.choice([True, False, "true", "false", "TRUE"])
    if name == "status":
        return p.choice(list(STATUS_ORDER))
    if name == "platform":
        return p.choice(["Linux", "Windows", "Paravirtualization", "Other"])
    if name == "createDate":
        return date_text(p, p.choice(images).create_date)
    raise AssertionError(name)


def pick_condition(p: Picker, images: list[Img]) -> dict[str, Any]:
    name = p.choice(PROPERTY_FIELDS)
    op = p.choice(PROPERTY_OPS)
    if op in ("is null", "not null"):
        return {"name": name, "op": op}
    if op in ("~=", "!~="):
        if name == "createDate":  # LIKE on a date's text is not part of the model
            op = "="
        else:
            return {"name": name, "op": op, "value": p.choice(LIKE_POOL)}
    if op in ("?=", "!?="):
        values = p.sample([pick_value(p, images, name) for _ in range(4)], p.randint(1, 3))
        joinable = all(isinstance(v, str) and v and "," not in v for v in values)
        if name not in ("size", "virtualSize", "system") and joinable and p.randint(0, 3) == 0:
            return {"name": name, "op": op, "value": ",".join(values)}
        return {"name": name, "op": op, "value": values}
    return {"name": name, "op": op, "value": pick_value(p, images, name)}


def pick_conditions(p: Picker, images: list[Img]) -> list[dict[str, Any]]:
    return [pick_condition(p, images) for _ in range(p.randint(0, 4))]


async def property_stack(service: Service) -> list[Img]:
    bs = {name: await insert_backup_storage(service.db, name) for name in BS_NAMES}
    images = property_dataset()
    await insert_images(service.db, images, bs)
    return images


async def check_conditions(
    service: Service, images: list[Img], conditions: list[dict[str, Any]]
) -> str | None:
    """None when the service agrees with the model, else a description of the disagreement."""
    reply = await service.call("QueryImage", {"conditions": conditions, "replyWithCount": True})
    if not reply.get("success"):
        return f"{conditions}: {reply.get('error')}"
    got = [inv["uuid"] for inv in reply["inventories"]]
    want = evaluate(images, conditions)
    if len(got) != len(set(got)):
        return f"{conditions}: duplicates"
    if set(got) != want or reply["total"] != len(want):
        by_uuid = {img.uuid: img for img in images}
        extra = [by_uuid[u] for u in set(got) - want]
        missing = [by_uuid[u] for u in want - set(got)]
        return (
            f"{conditions}: total {reply['total']}, expected {len(want)};"
            f" unexpected {extra[:2]}; missing {missing[:2]}"
        )
    ordered = sorted((i for i in images if i.uuid in want), key=lambda i: (i.create_date, i.uuid))
    if got != [i.uuid for i in ordered]:
        return f"{conditions}: not in (createDate, uuid) order"
    return None


async def test_random_condition_lists_agree_with_python_model(pg: PgStack) -> None:
    """200 seeded random condition lists over ~60 varied images."""
    images = await property_stack(pg)
    rng = random.Random(1234)
    picker = Picker(rng.choice, rng.randint)
    lists = [pick_conditions(picker, images) for _ in range(200)]
    # Every field and every op is exercised.
    assert {c["name"] for cs in lists for c in cs} == set(PROPERTY_FIELDS)
    assert {c["op"] for cs in lists for c in cs} == set(PROPERTY_OPS)
    failures: list[str] = []
    for start in range(0, len(lists), 20):
        batch = lists[start : start + 20]
        results = await asyncio.gather(*(check_conditions(pg, images, cs) for cs in batch))
        failures += [r for r in results if r]
    assert not failures, f"{len(failures)} disagreements:\n" + "\n".join(failures[:10])


async def test_hypothesis_condition_lists_agree_with_python_model(pg: PgStack) -> None:
    """The same property driven by hypothesis (with shrinking). Hypothesis runs its synchronous
    engine in a worker thread; each example calls the service on the test's event loop."""
    images = await property_stack(pg)
    loop = asyncio.get_running_loop()

    @st.composite
    def condition_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
        picker = Picker(
            lambda pool: draw(st.sampled_from(list(pool))),
            lambda a, b: draw(st.integers(a, b)),
        )
        return pick_conditions(picker, images)

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(conditions=condition_lists())
    def agrees(conditions: list[dict[str, Any]]) -> None:
        future = asyncio.run_coroutine_threadsafe(check_conditions(pg, images, conditions), loop)
        problem = future.result(timeout=60)
        assert problem is None, problem

    await asyncio.to_thread(agrees)


# --- the command line ---------------------------------------------------------------------


async def test_command_line_queries(stack: Stack) -> None:
    images = [
        Img("mycentos7", description="CentOS", size=2000, system=False),
        Img("centos-sys", description=None, size=500, system=True),
        Img("ubuntu", description=None, size=3000, system=False, create_date=BASE + H),
        Img("pending", status="Downloading", create_date=BASE + 2 * H),
    ]
    await insert_images(stack.db, images)
    by_name = {img.name: img.uuid for img in images}
    a, b = by_name["mycentos7"], by_name["ubuntu"]
    runs = {
        "ready": ("QueryImage", "status=Ready", "system=false"),
        "like": ("QueryImage", "name~=cent"),
        "in": ("QueryImage", f"uuid?={a},{b}"),
        "null": ("QueryImage", "description=null"),
        "notnull": ("QueryImage", "description!=null"),
        "size": ("QueryImage", "size>=1000", "sortBy=size", "sortDirection=desc"),
        "count": ("QueryImage", "count=true"),
        "countcond": ("QueryImage", "system=true", "count=true"),
        "page": ("QueryImage", "limit=2", "start=1", "replyWithCount=true", "fields=uuid,name"),
        "api_error": ("QueryImage", "nosuchfield=1"),
        "api_error2": ("QueryImage", "size=abc"),
        "usage": ("AddImage", "system=maybe"),
        "usage2": ("QueryImage", "limit=ten"),
        "usage3": ("QueryImage", "no-operator-here"),
    }
    results = dict(
        zip(runs, await asyncio.gather(*(image_cli(stack, *args) for args in runs.values())),
            strict=True)
    )  # fmt: skip

    def ok(key: str) -> dict[str, Any]:
        code, out, err = results[key]
        assert code == 0, (key, code, out, err)
        reply = json.loads(out)
        assert reply["success"] is True, reply
        return dict(reply)

    def got(key: str) -> list[str]:
        return [inv["name"] for inv in ok(key)["inventories"]]

    assert sorted(got("ready")) == ["mycentos7", "ubuntu"]
    assert sorted(got("like")) == ["centos-sys", "mycentos7"]  # wrapped as %cent%
    assert sorted(got("in")) == ["mycentos7", "ubuntu"]
    assert sorted(got("null")) == ["centos-sys", "pending", "ubuntu"]
    assert got("notnull") == ["mycentos7"]
    assert got("size") == ["ubuntu", "mycentos7"]
    assert ok("count")["total"] == 4
    assert ok("countcond")["total"] == 1
    page = ok("page")
    assert page["total"] == 4 and len(page["inventories"]) == 2
    assert all(set(inv) == {"uuid", "name"} for inv in page["inventories"])
    for key, word in (("api_error", "nosuchfield"), ("api_error2", "abc")):
        code, out, err = results[key]
        assert code == 1, (key, code, out, err)
        reply = json.loads(out)
        assert reply["success"] is False and reply["error"]["code"] == "INVALID_ARGUMENT"
        assert word in reply["error"]["details"]
    for key in ("usage", "usage2", "usage3"):
        code, out, err = results[key]
        assert code == 2, (key, code, out, err)
        assert out == "" and err.strip(), (key, out, err)
    # `python -m image_service.cli` is the same program.
    code, out, _ = await cli(stack, "QueryImage", "name=ubuntu")
    assert code == 0 and [i["uuid"] for i in json.loads(out)["inventories"]] == [b]
    # Nothing was added by the usage error.
    assert await stack.db.fetchval("SELECT count(*) FROM image") == 4
