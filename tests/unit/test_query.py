"""The query compiler (contract §5): whitelisted identifiers, values only as `$n` parameters."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from image_service.errors import ApiError, ErrorCode
from image_service.params import Query
from image_service.query import (
    BACKUP_STORAGE,
    IMAGE,
    USER_TAG,
    CompiledQuery,
    Entity,
    cast_value,
    compile_query,
)

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1

# Text without lone surrogates, which JSON (the wire format) cannot carry.
json_text = st.text(st.characters(blacklist_categories=("Cs",)))


def make_query(*conditions: dict[str, Any], **params: Any) -> Query:
    """A `Query` validated the way the service validates it: from JSON."""
    return Query.model_validate_json(json.dumps({"conditions": list(conditions), **params}))


def compile_one(
    name: str, op: str, value: Any = None, entity: Entity = IMAGE, **params: Any
) -> CompiledQuery:
    condition: dict[str, Any] = {"name": name, "op": op}
    if value is not None:
        condition["value"] = value
    return compile_query(entity, make_query(condition, **params))


def where(compiled: CompiledQuery) -> str:
    """The WHERE clause of the count statement (the same as the page statement's)."""
    prefix = f"SELECT count(*) FROM {IMAGE.table} a WHERE "
    assert compiled.count_sql.startswith(prefix), compiled.count_sql
    return compiled.count_sql.removeprefix(prefix)


def invalid_argument(excinfo: pytest.ExceptionInfo[ApiError]) -> str:
    assert excinfo.value.code is ErrorCode.INVALID_ARGUMENT
    return excinfo.value.details


def assert_parameterised(sql: str) -> None:
    """No literal in the statement: every value is a `$n`; identifiers come from whitelists."""
    assert "'" not in sql and '"' not in sql and "--" not in sql and ";" not in sql, sql
    assert re.fullmatch(r"[A-Za-z0-9_$.,()*=<>! \[\]:]+", sql), sql


# --- one test per op of the contract -----------------------------------------------------


@pytest.mark.parametrize(
    ("op", "sql_op"), [("=", "="), ("!=", "<>"), (">", ">"), (">=", ">="), ("<", "<"), ("<=", "<=")]
)
def test_comparison_ops_bind_the_value(op: str, sql_op: str) -> None:
    compiled = compile_one("name", op, "centos")
    assert where(compiled) == f"a.name {sql_op} $1::text"
    assert compiled.args[0] == "centos"
    assert compiled.count_args == ["centos"]
    assert_parameterised(compiled.select_sql)


def test_in_list_binds_one_array() -> None:
    compiled = compile_one("uuid", "?=", ["a" * 32, "b" * 32])
    assert where(compiled) == "a.uuid = ANY($1::bpchar[])"
    assert compiled.args[0] == ["a" * 32, "b" * 32]


def test_not_in_list_binds_one_array() -> None:
    compiled = compile_one("size", "!?=", [1, "2"])
    assert where(compiled) == "NOT (a.size = ANY($1::bigint[]))"
    assert compiled.args[0] == [1, 2]


def test_in_list_accepts_a_comma_separated_string() -> None:
    compiled = compile_one("status", "?=", "Ready,Downloading")
    assert where(compiled) == "a.status = ANY($1::image_status[])"
    assert compiled.args[0] == ["Ready", "Downloading"]


@pytest.mark.parametrize("value", [[], ["x"] * 1001])
def test_in_list_must_be_non_empty_and_bounded(value: list[str]) -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one("name", "?=", value)
    assert "name" in invalid_argument(excinfo)


def test_like_and_not_like_bind_the_pattern() -> None:
    like = compile_one("name", "~=", "%cent%")
    assert where(like) == "a.name LIKE $1" and like.args[0] == "%cent%"
    not_like = compile_one("name", "!~=", "cent_")
    assert where(not_like) == "a.name NOT LIKE $1" and not_like.args[0] == "cent_"


def test_like_on_a_non_text_column_compares_its_text() -> None:
    compiled = compile_one("size", "~=", "10%")
    assert where(compiled) == "a.size::text LIKE $1"


def test_like_requires_a_string_pattern() -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one("name", "~=", 5)
    assert "name" in invalid_argument(excinfo)


@pytest.mark.parametrize(("op", "sql"), [("is null", "IS NULL"), ("not null", "IS NOT NULL")])
def test_null_ops_take_no_value(op: str, sql: str) -> None:
    compiled = compile_one("description", op)
    assert where(compiled) == f"a.description {sql}"
    assert compiled.count_args == []


def test_comparison_without_value_is_invalid() -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one("name", "=")
    assert "name" in invalid_argument(excinfo)


@pytest.mark.parametrize("op", ["==", "LIKE", "in", "=;", "IS NULL", "?"])
def test_unknown_op_is_invalid(op: str) -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one("name", op, "x")
    assert "name" in invalid_argument(excinfo)


def test_conditions_are_anded_and_numbered_in_order() -> None:
    compiled = compile_query(
        IMAGE,
        make_query(
            {"name": "status", "op": "=", "value": "Ready"},
            {"name": "system", "op": "=", "value": "false"},
            limit=10,
            start=20,
        ),
    )
    assert where(compiled) == "a.status = $1::image_status AND a.system = $2::boolean"
    assert compiled.args == ["Ready", False, 10, 20]
    assert compiled.count_args == ["Ready", False]
    assert compiled.select_sql.endswith("LIMIT $3 OFFSET $4")


def test_no_condition_selects_everything_in_a_stable_order() -> None:
    compiled = compile_query(IMAGE, make_query())
    assert compiled.select_sql == (
        "SELECT a.uuid FROM image a WHERE TRUE "
        "ORDER BY a.create_date ASC, a.uuid ASC LIMIT $1 OFFSET $2"
    )
    assert compiled.args == [1000, 0]


# --- no input ever reaches the SQL text --------------------------------------------------

OPS_WITH_TEXT_VALUE = ["=", "!=", ">", ">=", "<", "<=", "~=", "!~="]


@given(value=json_text.filter(lambda v: "\x00" not in v), op=st.sampled_from(OPS_WITH_TEXT_VALUE))
@example(value="x'; DROP TABLE image; --", op="=")
@example(value="$1", op="~=")
@example(value="a.uuid", op="!=")
def test_a_text_value_never_reaches_the_sql(value: str, op: str) -> None:
    compiled = compile_one("name", op, value)
    reference = compile_one("name", op, "reference")
    # The statement does not depend on the value at all: only its parameter does.
    assert compiled.select_sql == reference.select_sql
    assert compiled.count_sql == reference.count_sql
    assert compiled.args[0] == value
    assert_parameterised(compiled.select_sql)
    # A value that cannot occur in SQL by chance (short ones like "a.uuid" can) is not there.
    marked = compile_one("name", op, f"@@{value}@@")
    assert f"@@{value}@@" not in marked.select_sql + marked.count_sql


@given(values=st.lists(json_text.filter(lambda v: "\x00" not in v), min_size=1, max_size=5))
def test_list_values_never_reach_the_sql(values: list[str]) -> None:
    compiled = compile_one("description", "?=", values)
    assert where(compiled) == "a.description = ANY($1::text[])"
    assert compiled.args[0] == values
    assert_parameterised(compiled.select_sql)


@given(value=json_text.filter(lambda v: "\x00" not in v))
def test_user_tag_and_nested_values_never_reach_the_sql(value: str) -> None:
    for name in ("__userTag__", "backupStorage.name", "backupStorageRef.installPath"):
        compiled = compile_one(name, "=", value)
        assert compiled.select_sql == compile_one(name, "=", "reference").select_sql
        assert compiled.args[0] == value
        assert_parameterised(compiled.select_sql)
        marked = f"@@{value}@@"
        assert marked not in compile_one(name, "=", marked).select_sql


KNOWN_IMAGE_FIELDS = {
    *IMAGE.columns,
    "__userTag__",
    *(f"backupStorage.{c}" for c in BACKUP_STORAGE.columns),
    *(f"backupStorageRef.{c}" for c in IMAGE.nested["backupStorageRef"].entity.columns),
}


@given(name=json_text.filter(lambda n: 1 <= len(n) <= 128 and n not in KNOWN_IMAGE_FIELDS))
@example(name="name; DROP TABLE image")
@example(name="uuid) OR (1=1")
@example(name="backupStorage.uuid OR TRUE")
@example(name="backupStorage.")
@example(name="backupStorage")
@example(name="volume.vmInstanceUuid.x")
@example(name="Name")
def test_an_unknown_field_is_invalid_argument_naming_it(name: str) -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one(name, "=", "x")
    details = invalid_argument(excinfo)
    assert repr(name) in details or name in details


@given(name=st.sampled_from(sorted(KNOWN_IMAGE_FIELDS)))
def test_every_known_field_compiles_to_a_parameterised_null_test(name: str) -> None:
    compiled = compile_one(name, "not null")
    assert_parameterised(compiled.select_sql)


# --- casts -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", True, False, 1.5, "1.0", "", None, [1], {"a": 1}, "1e3"])
def test_int_field_rejects_non_integers(value: Any) -> None:
    with pytest.raises(ApiError) as excinfo:
        cast_value("size", IMAGE.columns["size"], value)
    assert "size" in invalid_argument(excinfo)


def test_int_field_rejects_a_boolean_through_the_compiler() -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one("size", ">", True)
    assert "size" in invalid_argument(excinfo)


@pytest.mark.parametrize(("value", "cast"), [("1000", 1000), (1000, 1000), (" -5 ", -5), (0, 0)])
def test_int_field_accepts_integers_and_their_text(value: Any, cast: int) -> None:
    assert cast_value("size", IMAGE.columns["size"], value) == cast


@given(value=st.integers())
@example(value=2**63)
@example(value=-(2**63) - 1)
@example(value=10**30)
def test_int_field_bounds_json_integers_to_bigint(value: int) -> None:
    """A JSON integer outside bigint cannot be bound: it must be INVALID_ARGUMENT here, not an
    asyncpg overflow (INTERNAL_ERROR) at execution."""
    try:
        cast = cast_value("size", IMAGE.columns["size"], value)
    except ApiError as exc:
        assert exc.code is ErrorCode.INVALID_ARGUMENT
        assert not BIGINT_MIN <= value <= BIGINT_MAX
    else:
        assert cast == value and BIGINT_MIN <= cast <= BIGINT_MAX


@given(value=json_text)
@example(value="²")
@example(value="+-1")
@example(value="--1")
@example(value="1_000")
@example(value="١٢")
def test_int_cast_of_any_text_is_an_integer_or_invalid_argument(value: str) -> None:
    """Whatever text arrives, the result is an int in range or INVALID_ARGUMENT (never a
    ValueError that would become INTERNAL_ERROR)."""
    try:
        cast = cast_value("size", IMAGE.columns["size"], value)
    except ApiError as exc:
        assert exc.code is ErrorCode.INVALID_ARGUMENT
    else:
        assert isinstance(cast, int) and BIGINT_MIN <= cast <= BIGINT_MAX


@pytest.mark.parametrize(
    ("value", "cast"), [("true", True), ("false", False), ("TRUE", True), (True, True)]
)
def test_bool_field_accepts_true_and_false(value: Any, cast: bool) -> None:
    assert cast_value("system", IMAGE.columns["system"], value) is cast


@pytest.mark.parametrize("value", ["yes", "1", 1, 0, "", None, "t"])
def test_bool_field_rejects_anything_else(value: Any) -> None:
    with pytest.raises(ApiError) as excinfo:
        cast_value("system", IMAGE.columns["system"], value)
    assert "system" in invalid_argument(excinfo)


@pytest.mark.parametrize(
    ("value", "cast"),
    [
        ("2024-05-06T07:08:09Z", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2024-05-06T07:08:09.123456Z", datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)),
        ("2024-05-06T09:08:09+02:00", datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)),
        ("2024-05-06", datetime(2024, 5, 6, tzinfo=UTC)),
    ],
)
def test_date_field_accepts_iso_8601(value: str, cast: datetime) -> None:
    result = cast_value("createDate", IMAGE.columns["createDate"], value)
    assert result == cast and result.tzinfo is not None


@given(moment=st.datetimes(timezones=st.just(UTC)))
def test_date_field_round_trips_every_iso_date(moment: datetime) -> None:
    assert cast_value("createDate", IMAGE.columns["createDate"], moment.isoformat()) == moment


@pytest.mark.parametrize("value", ["yesterday", "2024-13-01", "", 1714979289, True, None])
def test_date_field_rejects_non_dates(value: Any) -> None:
    with pytest.raises(ApiError) as excinfo:
        cast_value("createDate", IMAGE.columns["createDate"], value)
    assert "createDate" in invalid_argument(excinfo)


@given(value=json_text)
def test_date_cast_of_any_text_is_a_date_or_invalid_argument(value: str) -> None:
    try:
        cast = cast_value("createDate", IMAGE.columns["createDate"], value)
    except ApiError as exc:
        assert exc.code is ErrorCode.INVALID_ARGUMENT
    else:
        assert isinstance(cast, datetime) and cast.tzinfo is not None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("status", "Expunged"),
        ("status", "ready"),
        ("state", "Enable"),
        ("format", "vmdk"),
        ("mediaType", "Iso"),
        ("platform", "linux"),
    ],
)
def test_enum_field_rejects_values_outside_its_set(name: str, value: str) -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one(name, "=", value)
    assert name in invalid_argument(excinfo)


def test_enum_field_rejects_a_value_outside_its_set_inside_a_list() -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one("status", "?=", ["Ready", "Gone"])
    assert "status" in invalid_argument(excinfo)


@pytest.mark.parametrize("value", ["a\x00b", "x" * 4097, True, [1], {"k": "v"}])
def test_text_field_rejects_values_postgres_cannot_take(value: Any) -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one("name", "=", value)
    assert "name" in invalid_argument(excinfo)


@pytest.mark.parametrize("op", ["~=", "!~="])
def test_like_pattern_with_nul_is_invalid_argument(op: str) -> None:
    """PostgreSQL text cannot hold NUL; `=` refuses it as INVALID_ARGUMENT, so must LIKE
    (otherwise the database rejects the statement and the caller gets INTERNAL_ERROR)."""
    with pytest.raises(ApiError) as excinfo:
        compile_one("name", op, "%a\x00b%")
    assert "name" in invalid_argument(excinfo)


# --- sortBy and fields -------------------------------------------------------------------


def test_sort_by_a_known_field_orders_by_its_column_first() -> None:
    compiled = compile_query(IMAGE, make_query(sortBy="size", sortDirection="desc"))
    assert "ORDER BY a.size DESC NULLS LAST, a.create_date ASC, a.uuid ASC" in compiled.select_sql


@pytest.mark.parametrize("field", ["bogus", "size; DROP TABLE image", "backupStorage.name", ""])
def test_sort_by_an_unknown_field_is_invalid(field: str) -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_query(IMAGE, make_query(sortBy=field))
    details = invalid_argument(excinfo)
    assert "sortBy" in details and repr(field) in details


def test_fields_known_are_kept() -> None:
    compiled = compile_query(IMAGE, make_query(fields=["uuid", "name", "backupStorageRefs"]))
    assert compiled.fields == ("uuid", "name", "backupStorageRefs")


def test_fields_unknown_is_invalid() -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_query(IMAGE, make_query(fields=["uuid", "secret"]))
    details = invalid_argument(excinfo)
    assert "fields" in details and "'secret'" in details


def test_backup_storage_refs_is_not_a_field_of_backup_storage() -> None:
    with pytest.raises(ApiError):
        compile_query(BACKUP_STORAGE, make_query(fields=["backupStorageRefs"]))


# --- nested names ------------------------------------------------------------------------


def test_backup_storage_field_is_an_exists_subquery() -> None:
    compiled = compile_one("backupStorage.name", "=", "bs1")
    assert where(compiled) == (
        "EXISTS (SELECT 1 FROM image_backup_storage_ref r_n1 JOIN backup_storage n1 "
        "ON n1.uuid = r_n1.backup_storage_uuid WHERE r_n1.image_uuid = a.uuid "
        "AND n1.name = $1::text)"
    )
    assert compiled.args[0] == "bs1"


def test_nested_conditions_beyond_four_are_subplans_not_joins() -> None:
    """Planning time grows steeply with semi-joins (64 took over a second): the fifth and later
    nested conditions are uncorrelated IN lists kept out of the join search by IS TRUE."""
    conditions = [{"name": "volume.name", "op": "=", "value": f"v{i}"} for i in range(6)]
    compiled = compile_query(IMAGE, make_query(conditions=conditions))
    sql = compiled.select_sql
    assert sql.count("EXISTS (") == 4
    assert sql.count(") IS TRUE") == 2
    assert (
        "(a.uuid IN (SELECT n5.root_image_uuid FROM volume n5 WHERE NOT n5.deleted "
        "AND n5.name = $5::text)) IS TRUE"
    ) in sql


def test_backup_storage_ref_field_is_an_exists_subquery() -> None:
    compiled = compile_one("backupStorageRef.installPath", "~=", "/data/%")
    assert where(compiled) == (
        "EXISTS (SELECT 1 FROM image_backup_storage_ref n1 WHERE n1.image_uuid = a.uuid "
        "AND n1.install_path LIKE $1)"
    )
    assert compiled.args[0] == "/data/%"


def test_nested_fields_are_cast_to_their_type() -> None:
    compiled = compile_one("backupStorage.availableCapacity", ">=", "1024")
    assert compiled.args[0] == 1024
    with pytest.raises(ApiError) as excinfo:
        compile_one("backupStorage.status", "=", "Online")
    assert "backupStorage.status" in invalid_argument(excinfo)


def test_user_tag_is_an_exists_subquery() -> None:
    compiled = compile_one("__userTag__", "~=", "%web%")
    assert where(compiled) == (
        "EXISTS (SELECT 1 FROM user_tag n1 WHERE n1.resource_uuid = a.uuid AND n1.tag LIKE $1)"
    )
    assert compiled.args[0] == "%web%"


def test_two_nested_conditions_get_their_own_aliases() -> None:
    compiled = compile_query(
        IMAGE,
        make_query(
            {"name": "backupStorage.name", "op": "=", "value": "bs1"},
            {"name": "backupStorage.status", "op": "=", "value": "Connected"},
        ),
    )
    clause = where(compiled)
    assert "n1.name = $1::text" in clause and "n2.status = $2::bs_status" in clause


@pytest.mark.parametrize("name", ["backupStorage.bogus", "backupStorageRef.name", "tag.x"])
def test_unknown_nested_field_is_invalid_naming_it(name: str) -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_one(name, "=", "x")
    assert repr(name) in invalid_argument(excinfo)


@pytest.mark.parametrize("entity", [BACKUP_STORAGE, USER_TAG])
def test_user_tag_condition_exists_only_for_images(entity: Entity) -> None:
    with pytest.raises(ApiError) as excinfo:
        compile_query(entity, make_query({"name": "__userTag__", "op": "=", "value": "x"}))
    assert "__userTag__" in invalid_argument(excinfo)
