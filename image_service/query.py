"""Compiler from the contract's query conditions (§5) to one parameterised SQL statement.

Pure: it takes validated `Query` models and returns SQL text plus bound arguments. Every
identifier comes from the whitelists below and every value is a `$n` parameter, so no input
ever reaches SQL as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any

from image_service.errors import ApiError, ErrorCode
from image_service.lifecycle import (
    BACKUP_STORAGE_STATE,
    BACKUP_STORAGE_STATUS,
    IMAGE_STATE,
    IMAGE_STATUS,
    REF_STATUS,
    Machine,
)
from image_service.params import Condition, ImageFormat, MediaType, Platform, Query


class Kind(Enum):
    TEXT = "text"
    INT = "int"
    BOOL = "bool"
    DATE = "date"
    ENUM = "enum"
    UUID = "uuid"  # char(32) columns: compared as bpchar so that their indexes are used


@dataclass(frozen=True, slots=True)
class Column:
    sql: str
    kind: Kind
    choices: tuple[str, ...] = ()
    pg_enum: str | None = None  # the PostgreSQL ENUM type, so comparisons can use indexes

    @property
    def value_type(self) -> str:
        """The SQL type values are cast to before comparison with this column."""
        if self.pg_enum:
            return self.pg_enum
        return {
            Kind.INT: "bigint",
            Kind.BOOL: "boolean",
            Kind.DATE: "timestamptz",
            Kind.UUID: "bpchar",
        }.get(self.kind, "text")


@dataclass(frozen=True, slots=True)
class Nested:
    """A related inventory reachable as `prefix.FIELD`: the rows of `source` (with `{n}` the
    nested alias) whose `key` is the outer row's uuid and that pass `scope`."""

    entity: Entity
    source: str
    key: str
    scope: str = ""


@dataclass(frozen=True, slots=True)
class Entity:
    table: str
    columns: dict[str, Column]
    default_order: tuple[str, ...] = ("createDate", "uuid")
    nested: dict[str, Nested] = field(default_factory=dict)
    # `__userTag__` conditions: the entity's user tags.
    tags: Nested | None = None
    # The column a page is selected by (and its inventories then loaded by).
    key_sql: str = "uuid"


def _c(sql: str, kind: Kind, *choices: str, pg_enum: str | None = None) -> Column:
    return Column(sql, kind, choices, pg_enum)


def _state(sql: str, machine: Machine[Any]) -> Column:
    """A column holding the states of one of lifecycle's machines, in its ENUM type."""
    return Column(sql, Kind.ENUM, tuple(s.value for s in machine.states), machine.db_type)


def _choice(sql: str, enum: type[StrEnum]) -> Column:
    return Column(sql, Kind.ENUM, tuple(e.value for e in enum), None)


BACKUP_STORAGE = Entity(
    table="backup_storage",
    columns={
        "uuid": _c("uuid", Kind.UUID),
        "name": _c("name", Kind.TEXT),
        "description": _c("description", Kind.TEXT),
        "url": _c("url", Kind.TEXT),
        "hostname": _c("hostname", Kind.TEXT),
        "type": _c("type", Kind.TEXT),
        "state": _state("state", BACKUP_STORAGE_STATE),
        "status": _state("status", BACKUP_STORAGE_STATUS),
        "totalCapacity": _c("total_capacity", Kind.INT),
        "availableCapacity": _c("available_capacity", Kind.INT),
        "createDate": _c("create_date", Kind.DATE),
        "lastOpDate": _c("last_op_date", Kind.DATE),
    },
)

BACKUP_STORAGE_REF = Entity(
    table="image_backup_storage_ref",
    columns={
        "imageUuid": _c("image_uuid", Kind.UUID),
        "backupStorageUuid": _c("backup_storage_uuid", Kind.UUID),
        "installPath": _c("install_path", Kind.TEXT),
        "status": _state("status", REF_STATUS),
        "createDate": _c("create_date", Kind.DATE),
        "lastOpDate": _c("last_op_date", Kind.DATE),
    },
    default_order=("createDate", "imageUuid"),
)

VOLUME = Entity(
    table="volume",
    columns={
        "uuid": _c("uuid", Kind.UUID),
        "name": _c("name", Kind.TEXT),
        "type": _c("type", Kind.ENUM, "Root", "Data"),
        "vmInstanceUuid": _c("vm_instance_uuid", Kind.UUID),
        "rootImageUuid": _c("root_image_uuid", Kind.UUID),
        "primaryStorageUuid": _c("primary_storage_uuid", Kind.UUID),
        "installPath": _c("install_path", Kind.TEXT),
        "format": _c("format", Kind.TEXT),
        "size": _c("size", Kind.INT),
        "createDate": _c("create_date", Kind.DATE),
        "lastOpDate": _c("last_op_date", Kind.DATE),
    },
)

USER_TAG = Entity(
    table="user_tag",
    columns={
        "uuid": _c("uuid", Kind.UUID),
        "resourceType": _c("resource_type", Kind.TEXT),
        "resourceUuid": _c("resource_uuid", Kind.UUID),
        "tag": _c("tag", Kind.TEXT),
        "type": _c("type", Kind.TEXT),
        "createDate": _c("create_date", Kind.DATE),
        "lastOpDate": _c("last_op_date", Kind.DATE),
    },
)

# Options are named by category and name; `id` (category.name) is their key.
GLOBAL_CONFIG = Entity(
    table="global_config",
    columns={
        "category": _c("category", Kind.TEXT),
        "name": _c("name", Kind.TEXT),
        "value": _c("value", Kind.TEXT),
        "defaultValue": _c("default_value", Kind.TEXT),
        "description": _c("description", Kind.TEXT),
    },
    default_order=("category", "name"),
    key_sql="id",
)

IMAGE = Entity(
    table="image",
    columns={
        "uuid": _c("uuid", Kind.UUID),
        "name": _c("name", Kind.TEXT),
        "description": _c("description", Kind.TEXT),
        "state": _state("state", IMAGE_STATE),
        "status": _state("status", IMAGE_STATUS),
        "size": _c("size", Kind.INT),
        "actualSize": _c("actual_size", Kind.INT),
        "virtualSize": _c("virtual_size", Kind.INT),
        "url": _c("url", Kind.TEXT),
        "mediaType": _choice("media_type", MediaType),
        "guestOsType": _c("guest_os_type", Kind.TEXT),
        "platform": _choice("platform", Platform),
        "system": _c("system", Kind.BOOL),
        "format": _choice("format", ImageFormat),
        "md5Sum": _c("md5_sum", Kind.TEXT),
        "sha256Sum": _c("sha256_sum", Kind.TEXT),
        "type": _c("type", Kind.TEXT),
        "createDate": _c("create_date", Kind.DATE),
        "lastOpDate": _c("last_op_date", Kind.DATE),
    },
    nested={
        "backupStorage": Nested(
            BACKUP_STORAGE,
            "image_backup_storage_ref r_{n} JOIN backup_storage {n} "
            "ON {n}.uuid = r_{n}.backup_storage_uuid",
            "r_{n}.image_uuid",
        ),
        "backupStorageRef": Nested(
            BACKUP_STORAGE_REF, "image_backup_storage_ref {n}", "{n}.image_uuid"
        ),
        "volume": Nested(VOLUME, "volume {n}", "{n}.root_image_uuid", "NOT {n}.deleted"),
    },
    tags=Nested(USER_TAG, "user_tag {n}", "{n}.resource_uuid"),
)

# The inventory field names a `fields` list may name, beyond the columns.
EXTRA_FIELDS = {"image": ("backupStorageRefs",)}

# Nested conditions beyond this many become subplans instead of semi-joins: PostgreSQL plans
# joins in time that grows steeply with their number (64 semi-joins: 2.5 s of planning,
# tests/benchmarks/bench_query_planning.py), subplans in linear time. A subplan is hashed when
# its rows fit work_mem, else scanned per outer row; the query timeout bounds that. The first
# few stay joins, so that a selective nested condition (volume.vmInstanceUuid=X) still starts
# from its index.
MAX_JOINED = 4

COMPARISONS = {"=": "=", "!=": "<>", ">": ">", ">=": ">=", "<": "<", "<=": "<="}
ALL_OPS = (*COMPARISONS, "?=", "!?=", "~=", "!~=", "is null", "not null")


def _bad(details: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_ARGUMENT, details)


# ASCII digits only: `str.isdigit` also accepts superscripts and other scripts' digits.
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")


def cast_value(name: str, column: Column, value: Any) -> Any:
    """Cast one condition value to the column's type, or raise INVALID_ARGUMENT naming it."""
    kind = column.kind
    if kind is Kind.INT:
        if isinstance(value, bool):
            raise _bad(f"conditions: {name}: {value!r} is not an integer")
        number: int | None = None
        if isinstance(value, int):
            number = value
        elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            number = int(value.strip())
        if number is not None and -(2**63) <= number < 2**63:
            return number
        raise _bad(f"conditions: {name}: {value!r} is not a 64-bit integer")
    if kind is Kind.BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _bad(f"conditions: {name}: {value!r} is not true or false")
    if kind is Kind.DATE:
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                pass
            else:
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        raise _bad(f"conditions: {name}: {value!r} is not an ISO 8601 date")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _bad(f"conditions: {name}: {value!r} is not a string")
    text = str(value)
    if "\x00" in text or len(text) > 4096:
        raise _bad(f"conditions: {name}: value is not a valid string")
    if kind is Kind.ENUM and text not in column.choices:
        raise _bad(f"conditions: {name}: {text!r} is not one of {', '.join(column.choices)}")
    return text


class _Compiler:
    def __init__(self) -> None:
        self.args: list[Any] = []
        self.aliases = 0
        self.joined = 0

    def bind(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def alias(self) -> str:
        self.aliases += 1
        return f"n{self.aliases}"

    def predicate(self, ref: str, name: str, column: Column, op: str, value: Any) -> str:
        col = f"{ref}.{column.sql}"
        typ = column.value_type
        if op == "is null":
            return f"{col} IS NULL"
        if op == "not null":
            return f"{col} IS NOT NULL"
        if op in ("?=", "!?="):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or not items or len(items) > 1000:
                raise _bad(f"conditions: {name}: {op} takes a non-empty list")
            placeholder = self.bind([cast_value(name, column, item) for item in items])
            if op == "?=":
                return f"{col} = ANY({placeholder}::{typ}[])"
            return f"NOT ({col} = ANY({placeholder}::{typ}[]))"
        if op in ("~=", "!~="):
            if not isinstance(value, str) or len(value) > 4096 or "\x00" in value:
                raise _bad(f"conditions: {name}: {op} takes a string pattern")
            text = col if column.kind is Kind.TEXT else f"{col}::text"
            placeholder = self.bind(value)
            return f"{text} LIKE {placeholder}" if op == "~=" else f"{text} NOT LIKE {placeholder}"
        if op in COMPARISONS:
            if value is None:
                raise _bad(f"conditions: {name}: a value is required for {op}")
            placeholder = self.bind(cast_value(name, column, value))
            return f"{col} {COMPARISONS[op]} {placeholder}::{typ}"
        raise _bad(f"conditions: {name}: unknown op {op!r} (one of {', '.join(ALL_OPS)})")

    def related(self, nested: Nested, ref: str, name: str, column: str, cond: Condition) -> str:
        """The outer row has a related row that passes the condition."""
        alias = self.alias()
        pred = self.predicate(alias, name, nested.entity.columns[column], cond.op, cond.value)
        source = nested.source.format(n=alias)
        key = nested.key.format(n=alias)
        where = " AND ".join(filter(None, [nested.scope.format(n=alias), pred]))
        self.joined += 1
        if self.joined <= MAX_JOINED:
            return f"EXISTS (SELECT 1 FROM {source} WHERE {key} = {ref}.uuid AND {where})"
        # Not at the top level of WHERE (IS TRUE), so the planner keeps it a subplan.
        return f"({ref}.uuid IN (SELECT {key} FROM {source} WHERE {where})) IS TRUE"

    def condition(self, entity: Entity, ref: str, cond: Condition) -> str:
        name = cond.name
        if name == "__userTag__" and entity.tags is not None:
            return self.related(entity.tags, ref, name, "tag", cond)
        if name in entity.columns:
            return self.predicate(ref, name, entity.columns[name], cond.op, cond.value)
        prefix, dot, rest = name.partition(".")
        if dot and prefix in entity.nested:
            nested = entity.nested[prefix]
            if rest not in nested.entity.columns:
                raise _bad(f"conditions: unknown field {name!r}")
            return self.related(nested, ref, name, rest, cond)
        raise _bad(f"conditions: unknown field {name!r}")


@dataclass(frozen=True, slots=True)
class CompiledQuery:
    select_sql: str
    count_sql: str
    args: list[Any]
    count_args: list[Any]
    fields: tuple[str, ...] | None


def compile_query(entity: Entity, query: Query) -> CompiledQuery:
    """Compile a query to `SELECT key ...` (one page) and `SELECT count(*) ...`."""
    compiler = _Compiler()
    where = [compiler.condition(entity, "a", cond) for cond in query.conditions]
    where_sql = " AND ".join(where) if where else "TRUE"
    count_args = list(compiler.args)
    order: list[str] = []
    if query.sortBy is not None:
        if query.sortBy not in entity.columns:
            raise _bad(f"sortBy: unknown field {query.sortBy!r}")
        direction = "DESC" if query.sortDirection == "desc" else "ASC"
        order.append(f"a.{entity.columns[query.sortBy].sql} {direction} NULLS LAST")
    for name in entity.default_order:
        order.append(f"a.{entity.columns[name].sql} ASC")
    key_sql = entity.key_sql
    limit = compiler.bind(query.limit)
    offset = compiler.bind(query.start)
    select_sql = (
        f"SELECT a.{key_sql} FROM {entity.table} a WHERE {where_sql} "
        f"ORDER BY {', '.join(order)} LIMIT {limit} OFFSET {offset}"
    )
    count_sql = f"SELECT count(*) FROM {entity.table} a WHERE {where_sql}"
    fields: tuple[str, ...] | None = None
    if query.fields is not None:
        allowed = set(entity.columns) | set(EXTRA_FIELDS.get(entity.table, ()))
        for name in query.fields:
            if name not in allowed:
                raise _bad(f"fields: unknown field {name!r}")
        fields = tuple(query.fields)
    return CompiledQuery(select_sql, count_sql, compiler.args, count_args, fields)
