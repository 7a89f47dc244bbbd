"""`image-cli` argument syntax (contract §6): tokens to API params, and the usage exit code."""

from __future__ import annotations

from typing import Any

import pytest

from image_service import cli
from image_service.cli import UsageError, build_params, parse_condition

U1, U2 = "1" * 32, "2" * 32


def conditions(*tokens: str) -> list[dict[str, Any]]:
    params = build_params("QueryImage", list(tokens))
    result: list[dict[str, Any]] = params["conditions"]
    return result


# --- query conditions --------------------------------------------------------------------


def test_like_without_wildcards_is_wrapped() -> None:
    assert conditions("name~=cent") == [{"name": "name", "op": "~=", "value": "%cent%"}]


def test_like_with_wildcards_is_kept() -> None:
    assert conditions("name~=%cent%") == [{"name": "name", "op": "~=", "value": "%cent%"}]
    assert conditions("name~=cent_7") == [{"name": "name", "op": "~=", "value": "cent_7"}]
    assert conditions("name!~=cent") == [{"name": "name", "op": "!~=", "value": "%cent%"}]


def test_in_list_is_a_list() -> None:
    assert conditions("uuid?=a,b") == [{"name": "uuid", "op": "?=", "value": ["a", "b"]}]
    assert conditions("uuid!?=a") == [{"name": "uuid", "op": "!?=", "value": ["a"]}]


@pytest.mark.parametrize("op", [">=", "<=", ">", "<", "!=", "="])
def test_comparisons_keep_the_value_as_text_for_the_service_to_cast(op: str) -> None:
    assert conditions(f"size{op}1000") == [{"name": "size", "op": op, "value": "1000"}]


def test_null_values_are_null_tests() -> None:
    assert conditions("description=null") == [{"name": "description", "op": "is null"}]
    assert conditions("description!=null") == [{"name": "description", "op": "not null"}]


def test_equality_keeps_an_equals_sign_in_the_value() -> None:
    assert conditions("name=a=b") == [{"name": "name", "op": "=", "value": "a=b"}]


def test_nested_and_user_tag_names() -> None:
    assert conditions(f"volume.vmInstanceUuid={U1}", "__userTag__~=web") == [
        {"name": "volume.vmInstanceUuid", "op": "=", "value": U1},
        {"name": "__userTag__", "op": "~=", "value": "%web%"},
    ]


def test_query_example_of_the_contract() -> None:
    # image-cli QueryImage status=Ready system=true: both are conditions, cast by the service.
    assert build_params("QueryImage", ["status=Ready", "system=true"]) == {
        "conditions": [
            {"name": "status", "op": "=", "value": "Ready"},
            {"name": "system", "op": "=", "value": "true"},
        ]
    }


def test_query_parameters_are_typed() -> None:
    params = build_params(
        "QueryImage",
        [
            "count=true",
            "replyWithCount=false",
            "limit=10",
            "start=5",
            "sortBy=createDate",
            "sortDirection=desc",
            "fields=uuid,name",
        ],
    )
    assert params == {
        "count": True,
        "replyWithCount": False,
        "limit": 10,
        "start": 5,
        "sortBy": "createDate",
        "sortDirection": "desc",
        "fields": ["uuid", "name"],
        "conditions": [],
    }


def test_a_query_without_tokens_has_empty_conditions() -> None:
    assert build_params("QueryBackupStorage", []) == {"conditions": []}


@pytest.mark.parametrize("token", ["size", "=5", "1name=x", "name", "na me=x", ""])
def test_an_unreadable_condition_is_a_usage_error(token: str) -> None:
    with pytest.raises(UsageError):
        parse_condition(token)


@pytest.mark.parametrize("token", ["limit=ten", "start=", "count=yes", "replyWithCount=1"])
def test_a_mistyped_query_parameter_is_a_usage_error(token: str) -> None:
    with pytest.raises(UsageError):
        build_params("QueryImage", [token])


# --- other APIs --------------------------------------------------------------------------


def test_add_image_example_of_the_contract() -> None:
    params = build_params(
        "AddImage",
        [
            "name=CentOS7",
            "format=qcow2",
            f"backupStorageUuids={U1},{U2}",
            "url=http://example.com/c7.qcow2?a=b",
            "mediaType=RootVolumeTemplate",
            "platform=Linux",
            "system=true",
        ],
    )
    assert params == {
        "name": "CentOS7",
        "format": "qcow2",
        "backupStorageUuids": [U1, U2],
        "url": "http://example.com/c7.qcow2?a=b",
        "mediaType": "RootVolumeTemplate",
        "platform": "Linux",
        "system": True,
    }


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("TRUE", True)])
def test_booleans(text: str, value: bool) -> None:
    assert build_params("UpdateImage", [f"system={text}"]) == {"system": value}


def test_get_image_source_flag() -> None:
    assert build_params("GetImageSource", [f"uuid={U1}", "forSystemVm=true"]) == {
        "uuid": U1,
        "forSystemVm": True,
    }


@pytest.mark.parametrize("value", ["yes", "1", "", "tru"])
def test_a_bad_boolean_is_a_usage_error(value: str) -> None:
    with pytest.raises(UsageError) as excinfo:
        build_params("AddImage", [f"system={value}"])
    assert "system" in str(excinfo.value)


@pytest.mark.parametrize("token", ["name", "=x", "url"])
def test_a_token_without_key_and_value_is_a_usage_error(token: str) -> None:
    with pytest.raises(UsageError):
        build_params("AddImage", [token])


def test_non_query_values_are_not_conditions() -> None:
    # `>` and `~` are ordinary characters outside queries.
    assert build_params("UpdateImage", [f"uuid={U1}", "description=a>=b~=c"]) == {
        "uuid": U1,
        "description": "a>=b~=c",
    }


# --- exit codes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["AddImage", "system=maybe"],
        ["QueryImage", "size"],
        ["QueryImage", "limit=ten"],
        ["DeleteImage", "uuid"],
        [],
    ],
)
def test_a_usage_error_exits_2_without_calling_the_service(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_broker(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a usage error must not reach the broker")

    monkeypatch.setattr(cli, "run", no_broker)
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--amqp-url", "amqp://guest:guest@127.0.0.1:1/", *argv])
    assert excinfo.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip()
