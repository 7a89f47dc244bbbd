"""The portal's translation of ZStack messages, and the stored form of passwords."""

from __future__ import annotations

import hashlib
import json

import pytest

from image_service.api import APIS
from image_service.portal import accounts
from image_service.portal.zstack import (
    BY_API,
    CLASSES,
    ERROR_CODES,
    PortalError,
    Special,
    api_params,
    error_from_contract,
    parse_request,
    reply_body,
    result_string,
    session_of,
)
from image_service.protocol.errors import ErrorCode

CONTRACT_CLASSES = {
    f"org.zstack.header.image.API{name}Msg"
    for name in (
        "AddImage",
        "DeleteImage",
        "ExpungeImage",
        "RecoverImage",
        "ChangeImageState",
        "UpdateImage",
        "SyncImageSize",
        "QueryImage",
        "CreateRootVolumeTemplateFromRootVolume",
        "CreateRootVolumeTemplateFromVolumeSnapshot",
        "CreateDataVolumeTemplateFromVolume",
    )
} | {
    "org.zstack.header.storage.backup.APIQueryBackupStorageMsg",
    "org.zstack.header.storage.backup.APIChangeBackupStorageStateMsg",
    "org.zstack.header.storage.backup.APIDeleteBackupStorageMsg",
    "org.zstack.header.tag.APICreateUserTagMsg",
    "org.zstack.header.tag.APIDeleteTagMsg",
    "org.zstack.header.tag.APIQueryUserTagMsg",
    "org.zstack.core.config.APIQueryGlobalConfigMsg",
    "org.zstack.core.config.APIUpdateGlobalConfigMsg",
    "org.zstack.header.identity.APILogInByAccountMsg",
    "org.zstack.header.identity.APILogOutMsg",
    "org.zstack.header.identity.APIValidateSessionMsg",
}


def test_every_class_of_the_contract_and_only_those() -> None:
    assert set(CLASSES) == CONTRACT_CLASSES
    for cls in CLASSES.values():
        assert cls.api in APIS or cls.api in set(Special), cls
        suffix = "Reply" if cls.is_query or cls.api in set(Special) else "Event"
        assert cls.reply.endswith(suffix), cls
        assert cls.reply.rsplit(".", 1)[0] == cls.name.rsplit(".", 1)[0]
    assert BY_API["QueryImage"].reply == "org.zstack.header.image.APIQueryImageReply"
    assert BY_API["AddImage"].reply == "org.zstack.header.image.APIAddImageEvent"
    assert BY_API["LogIn"].reply == "org.zstack.header.identity.APILogInReply"


def test_every_contract_error_code_maps_to_a_zstack_code() -> None:
    assert set(ERROR_CODES) == set(ErrorCode)
    for code in ERROR_CODES.values():
        assert code.startswith("SYS.1"), code
    mapped = error_from_contract(
        {
            "code": "OPERATION_ERROR",
            "details": "every backup storage failed",
            "causes": [{"backupStorageUuid": "a" * 32, "code": "DOWNLOAD_FAILED", "details": "x"}],
        }
    )
    assert mapped["code"] == "SYS.1006"
    assert mapped["opaque"] == {"code": "OPERATION_ERROR"}
    assert mapped["causes"][0]["opaque"]["backupStorageUuid"] == "a" * 32
    assert mapped["causes"][0]["opaque"]["code"] == "DOWNLOAD_FAILED"
    assert error_from_contract({"code": "no such code"})["code"] == "SYS.1000"


@pytest.mark.parametrize(
    "body",
    [[], "x", 1, None, {}, {"a": {}, "b": {}}],
)
def test_a_body_that_is_not_one_message_is_a_400(body: object) -> None:
    with pytest.raises(PortalError) as caught:
        parse_request(body)
    assert caught.value.status == 400
    assert caught.value.code == "SYS.1007"


def test_an_unknown_class_is_sys_1008_and_is_not_echoed_in_full() -> None:
    with pytest.raises(PortalError) as caught:
        parse_request({"org.zstack.header.vm.APICreateVmInstanceMsg" + "x" * 5000: {}})
    assert caught.value.code == "SYS.1008"
    assert caught.value.status == 400
    assert len(caught.value.details) < 4000


def test_a_session_must_be_an_object_with_a_uuid() -> None:
    cls, fields = parse_request(
        {"org.zstack.header.image.APIQueryImageMsg": {"session": {"uuid": "s" * 32}}}
    )
    assert cls.api == "QueryImage" and session_of(fields) == "s" * 32
    assert session_of({}) is None
    for bad in ("s", {"uuid": 1}, [], {"id": "s"}):
        with pytest.raises(PortalError) as caught:
            session_of({"session": bad})
        assert caught.value.code == "ID.1001" and caught.value.status == 200
    with pytest.raises(PortalError) as caught:
        parse_request({"org.zstack.header.image.APIQueryImageMsg": []})
    assert caught.value.status == 400


def test_query_conditions_take_zstack_ops() -> None:
    cls = BY_API["QueryImage"]
    params = api_params(
        cls,
        {
            "conditions": [
                {"name": "name", "op": "=", "value": "a"},
                {"name": "name", "op": "like", "value": "%a%"},
                {"name": "uuid", "op": "in", "value": "a,b"},
                {"name": "uuid", "op": "not in", "value": ["a"]},
                {"name": "name", "op": "not like", "value": "b%"},
                {"name": "description", "op": "is null", "value": ""},
                {"name": "description", "op": "is not null"},
                {"name": "size", "op": ">=", "value": "1"},
            ],
            "limit": 50,
            "replyWithCount": True,
            "session": {"uuid": "x"},
            "systemTags": [],
            "userTags": None,
            "groupBy": None,
        },
    )
    assert [c["op"] for c in params["conditions"]] == [
        "=",
        "~=",
        "?=",
        "!?=",
        "!~=",
        "is null",
        "not null",
        ">=",
    ]
    assert "value" not in params["conditions"][5]
    assert params["limit"] == 50 and params["replyWithCount"] is True
    assert not {"session", "systemTags", "userTags", "groupBy"} & set(params)


def test_an_unknown_query_op_is_refused_by_name() -> None:
    with pytest.raises(PortalError) as caught:
        api_params(BY_API["QueryImage"], {"conditions": [{"name": "n", "op": "~=", "value": 1}]})
    assert caught.value.code == "SYS.1007"
    assert "conditions[0].op" in caught.value.details


def test_zstack_parameter_names_and_unsupported_tags() -> None:
    assert api_params(BY_API["ExpungeImage"], {"imageUuid": "a" * 32}) == {"uuid": "a" * 32}
    assert (
        api_params(BY_API["RecoverImage"], {"imageUuid": "a" * 32, "backupStorageUuids": []})[
            "uuid"
        ]
        == "a" * 32
    )
    with pytest.raises(PortalError):
        api_params(BY_API["RecoverImage"], {"imageUuid": "a" * 32, "uuid": "b" * 32})
    with pytest.raises(PortalError) as caught:
        api_params(BY_API["AddImage"], {"systemTags": ["x"]})
    assert "systemTags" in caught.value.details
    assert api_params(BY_API["DeleteTag"], {"uuid": "t", "deleteMode": "Permissive"}) == {
        "uuid": "t"
    }
    # An unknown parameter is passed on: the API's validation names it.
    assert api_params(BY_API["UpdateImage"], {"uuid": "u", "bogus": 1}) == {"uuid": "u", "bogus": 1}


def test_replies_in_zstack_shape() -> None:
    ok = reply_body({"success": True, "api": "QueryImage", "inventories": [], "total": 0})
    assert ok == {"success": True, "inventories": [], "total": 0}
    failed = reply_body(
        {
            "success": False,
            "api": "DeleteImage",
            "error": {"code": "INVALID_STATE", "description": "d", "details": "busy", "causes": []},
        }
    )
    assert failed["error"]["code"] == "SYS.1006"
    assert "busy" in failed["error"]["details"]
    text = result_string("org.zstack.header.image.APIDeleteImageEvent", failed)
    decoded = json.loads(text)
    assert list(decoded) == ["org.zstack.header.image.APIDeleteImageEvent"]


def test_passwords_are_kept_as_salted_scrypt_of_the_wire_form() -> None:
    wire = accounts.wire_form("password")
    assert wire == hashlib.sha512(b"password").hexdigest()
    stored = accounts.hash_wire(wire)
    assert wire not in stored and "password" not in stored
    assert stored.startswith("scrypt$16384$8$1$")
    assert stored != accounts.hash_wire(wire)  # salted
    assert accounts.verify_wire(stored, wire)
    assert accounts.verify_wire(stored, wire.upper())  # hex is hex
    assert not accounts.verify_wire(stored, accounts.wire_form("Password"))
    assert not accounts.verify_wire(stored, "password")
    assert not accounts.verify_wire("garbage", wire)
    assert not accounts.verify_wire("scrypt$1$1$1$zz$zz", wire)
