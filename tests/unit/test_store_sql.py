"""The store's named queries: `:param` placeholders, and every query of every `.sql` file used
by exactly one method of its group (so a query cannot be orphaned or misspelled)."""

from __future__ import annotations

import inspect
import re

import pytest

from image_service.store.backup_storages import BackupStorages
from image_service.store.group import QueryGroup
from image_service.store.images import Images
from image_service.store.inbox import Inbox
from image_service.store.ops import Ops
from image_service.store.outbox import OutboxTable
from image_service.store.sqlfile import compile_query, parse_queries
from image_service.store.tags import Tags
from image_service.store.volumes import Volumes

GROUPS: list[type[QueryGroup]] = [Inbox, OutboxTable, Images, Ops, BackupStorages, Volumes, Tags]


def test_parameters_become_positions_in_order_of_first_use() -> None:
    query = compile_query("q", "SELECT :b, :a, :b WHERE x = :a")
    assert query.sql == "SELECT $1, $2, $1 WHERE x = $2"
    assert query.params == ("b", "a")


def test_casts_strings_identifiers_and_comments_are_left_alone() -> None:
    text = (
        "-- a comment with :not_a_param and it's quote\n"
        "SELECT :uuids::bpchar[], 'HH24:MI:SS', \"col:x\", '::y'\n"
        "FROM t WHERE a = ANY(:allowed::image_status[]) -- :tail"
    )
    query = compile_query("q", text)
    assert query.params == ("uuids", "allowed")
    assert "'HH24:MI:SS'" in query.sql and '"col:x"' in query.sql and "'::y'" in query.sql
    assert "$1::bpchar[]" in query.sql and "$2::image_status[]" in query.sql
    assert ":not_a_param" in query.sql and ":tail" in query.sql


def test_arguments_must_match_the_parameters_exactly() -> None:
    query = compile_query("q", "SELECT :a, :b")
    assert query.args({"b": 2, "a": 1}) == [1, 2]
    with pytest.raises(TypeError, match="takes a, b"):
        query.args({"a": 1})
    with pytest.raises(TypeError):
        query.args({"a": 1, "b": 2, "c": 3})


def test_a_name_defined_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- name: q\nSELECT 1;\n-- name: q\nSELECT 2;\n")


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_every_query_of_a_file_is_run_by_its_group(group: type[QueryGroup]) -> None:
    source = inspect.getsource(inspect.getmodule(group))  # type: ignore[arg-type]
    used = set(re.findall(r'self\._\w+\(\s*"(\w+)"', source))
    assert group.queries, f"{group.__name__} loaded no queries"
    assert used <= set(group.queries), f"unknown queries: {used - set(group.queries)}"
    assert set(group.queries) <= used, f"queries no method runs: {set(group.queries) - used}"


def test_no_query_name_is_defined_in_two_files() -> None:
    seen: dict[str, str] = {}
    for group in GROUPS:
        for name in group.queries:
            assert seen.setdefault(name, group.__name__) == group.__name__, name


def test_no_status_literal_guards_a_state_change() -> None:
    """Guarded statements take their allowed-from sets from image_service.lifecycle."""
    for group in GROUPS:
        for query in group.queries.values():
            for status in (
                "Pending",
                "Succeeded",
                "Failed",
                "Connected",
                "Disconnected",
                "Connecting",
                "Ready",
                "Downloading",
                "Creating",
                "Enabled",
                "Disabled",
            ):
                assert f"'{status}'" not in query.sql, f"{query.name} writes '{status}' in SQL"


@pytest.mark.parametrize(
    "text",
    [
        "SELECT /* :z */ :a",
        "SELECT E'it\\'s :z', :a",
        "SELECT $$ :z $$, :a",
        "SELECT $tag$ :z $tag$, :a",
        "SELECT arr[1:z], :a",
        "SELECT (x):z, :a",
    ],
)
def test_colons_that_are_not_parameters(text: str) -> None:
    query = compile_query("q", text)
    assert query.params == ("a",), query
    assert ":z" in query.sql
