"""ZStack's API portal, as data: which message class is which API, how its parameters and
query conditions become the contract's, and how a reply or error goes back in ZStack's shape
(contract section 11, docs/ZSTACK.md). Pure functions: the server (`portal.server`) does IO.

A ZStack client sends `{"org.zstack.header.image.APIAddImageMsg": {params, "session": {...}}}`
and reads `{"org.zstack.header.image.APIAddImageEvent": {"success": true, "inventory": ...}}`
back, inside the portal's envelope. Everything else about the call (validation, execution at
most once, the stored reply) is the bus API's own: the portal only translates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from image_service.protocol.errors import ErrorCode, cut

_IMAGE = "org.zstack.header.image."
_BACKUP = "org.zstack.header.storage.backup."
_TAG = "org.zstack.header.tag."
_CONFIG = "org.zstack.core.config."
_IDENTITY = "org.zstack.header.identity."


class Special(StrEnum):
    """The portal's own messages: they never reach the bus API."""

    LogIn = "LogIn"
    LogOut = "LogOut"
    ValidateSession = "ValidateSession"


@dataclass(frozen=True, slots=True)
class MessageClass:
    """One ZStack message class: the API it runs and the class its answer carries."""

    name: str  # the full class name, as clients send it
    api: str  # the contract's API, or a `Special` value
    reply: str  # the full class name of the reply or event
    # ZStack's parameter names that differ from the contract's: {zstack: contract}.
    renames: tuple[tuple[str, str], ...] = ()

    @property
    def is_query(self) -> bool:
        return self.api.startswith("Query")


def _event(package: str, api: str, renames: tuple[tuple[str, str], ...] = ()) -> MessageClass:
    return MessageClass(f"{package}API{api}Msg", api, f"{package}API{api}Event", renames)


def _reply(package: str, api: str, reply: str | None = None) -> MessageClass:
    return MessageClass(f"{package}API{api}Msg", api, f"{package}API{reply or api}Reply")


# ZStack calls the image `imageUuid` where the contract (and ZStack's other image APIs) say `uuid`.
_IMAGE_UUID = (("imageUuid", "uuid"),)

CLASSES: dict[str, MessageClass] = {
    c.name: c
    for c in (
        _event(_IMAGE, "AddImage"),
        _event(_IMAGE, "DeleteImage"),
        _event(_IMAGE, "ExpungeImage", _IMAGE_UUID),
        _event(_IMAGE, "RecoverImage", _IMAGE_UUID),
        _event(_IMAGE, "ChangeImageState"),
        _event(_IMAGE, "UpdateImage"),
        _event(_IMAGE, "SyncImageSize"),
        _reply(_IMAGE, "QueryImage"),
        _event(_IMAGE, "CreateRootVolumeTemplateFromRootVolume"),
        _event(_IMAGE, "CreateRootVolumeTemplateFromVolumeSnapshot"),
        _event(_IMAGE, "CreateDataVolumeTemplateFromVolume"),
        _reply(_BACKUP, "QueryBackupStorage"),
        _event(_BACKUP, "ChangeBackupStorageState"),
        _event(_BACKUP, "DeleteBackupStorage"),
        _event(_TAG, "CreateUserTag"),
        _event(_TAG, "DeleteTag"),
        _reply(_TAG, "QueryUserTag"),
        _reply(_CONFIG, "QueryGlobalConfig"),
        _event(_CONFIG, "UpdateGlobalConfig"),
        # The portal's own: they run here, not on the bus.
        MessageClass(
            f"{_IDENTITY}APILogInByAccountMsg", Special.LogIn, f"{_IDENTITY}APILogInReply"
        ),
        _reply(_IDENTITY, Special.LogOut),
        _reply(_IDENTITY, Special.ValidateSession),
    )
}
BY_API: dict[str, MessageClass] = {c.api: c for c in CLASSES.values()}

# Fields of ZStack's message base classes that every client may send and that mean nothing
# here: they are dropped, never passed on as (unknown, refused) API parameters.
ENVELOPE_FIELDS = frozenset(
    {"session", "timeout", "id", "headers", "serviceId", "creatingAccountUuid", "requestIp"}
)
# ZStack's tags on any creating message: accepted when empty (clients send `[]` or null).
TAG_FIELDS = ("systemTags", "userTags", "tagUuids")
# ZStack's `deleteMode` on deletions the contract has no modes for: Permissive is what they do.
MODELESS_DELETES = frozenset({"DeleteBackupStorage", "DeleteTag"})

# ZStack's query operators and the contract's (section 5).
QUERY_OPS: dict[str, str] = {
    "=": "=",
    "!=": "!=",
    ">": ">",
    ">=": ">=",
    "<": "<",
    "<=": "<=",
    "in": "?=",
    "not in": "!?=",
    "like": "~=",
    "not like": "!~=",
    "is null": "is null",
    "is not null": "not null",
}


_ZSTACK_REFS = "backupStorageRefs."


class PortalError(Exception):
    """A request the portal refuses before any API runs: bad JSON, an unknown class, bad
    query conditions, a missing or expired session, a wrong password."""

    def __init__(self, code: str, details: str, *, status: int = 200) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        # The HTTP status: 200 when the answer is an API's (ZStack answers failed calls with
        # 200 and the error in the reply), 4xx when the request is not an API call at all.
        self.status = status


# ZStack's codes: SysErrors (SYS.*) and IdentityErrors (ID.*) of zstackio/zstack.
SYS_INTERNAL = "SYS.1000"
SYS_TIMEOUT = "SYS.1001"
SYS_RESOURCE_NOT_FOUND = "SYS.1003"
SYS_OPERATION_ERROR = "SYS.1006"
SYS_INVALID_ARGUMENT = "SYS.1007"
SYS_UNKNOWN_MESSAGE = "SYS.1008"
SYS_UNAVAILABLE = "SYS.1012"
ID_AUTHENTICATION = "ID.1000"
ID_INVALID_SESSION = "ID.1001"

ZSTACK_DESCRIPTIONS: dict[str, str] = {
    SYS_INTERNAL: "An internal error happened in system",
    SYS_TIMEOUT: "An operation timeout",
    SYS_RESOURCE_NOT_FOUND: "Unable to find resource",
    SYS_OPERATION_ERROR: "An operation failed",
    SYS_INVALID_ARGUMENT: "One or more API argument is invalid",
    SYS_UNKNOWN_MESSAGE: "No service deals with the message",
    SYS_UNAVAILABLE: "The management node is unavailable",
    ID_AUTHENTICATION: "Authentication failed",
    ID_INVALID_SESSION: "Session expired",
}

# The contract's codes (section 2) and ZStack's (docs/ZSTACK.md has the table and the why).
ERROR_CODES: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED_MESSAGE: SYS_INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_API: SYS_UNKNOWN_MESSAGE,
    ErrorCode.INVALID_ARGUMENT: SYS_INVALID_ARGUMENT,
    ErrorCode.RESOURCE_NOT_FOUND: SYS_RESOURCE_NOT_FOUND,
    ErrorCode.INVALID_STATE: SYS_OPERATION_ERROR,
    ErrorCode.NO_BACKUP_STORAGE: SYS_OPERATION_ERROR,
    ErrorCode.CAPACITY_EXCEEDED: SYS_OPERATION_ERROR,
    ErrorCode.DOWNLOAD_FAILED: SYS_OPERATION_ERROR,
    ErrorCode.CHECKSUM_MISMATCH: SYS_OPERATION_ERROR,
    ErrorCode.UNSAFE_IMAGE: SYS_OPERATION_ERROR,
    ErrorCode.URL_NOT_ALLOWED: SYS_INVALID_ARGUMENT,
    ErrorCode.OPERATION_ERROR: SYS_OPERATION_ERROR,
    ErrorCode.TIMEOUT: SYS_TIMEOUT,
    ErrorCode.INTERNAL_ERROR: SYS_INTERNAL,
}


def zstack_error(code: str, details: str, opaque: dict[str, Any] | None = None) -> dict[str, Any]:
    """ZStack's ErrorCode object: `code`, `description`, `details` (and `opaque` for what ZStack
    has no field for, such as the contract's own code)."""
    # Details may echo the request: whatever it holds, they stay encodable (no lone surrogate).
    printable = details.encode("utf-8", "backslashreplace").decode()
    error: dict[str, Any] = {
        "code": code,
        "description": ZSTACK_DESCRIPTIONS.get(code, "Error"),
        "details": cut(printable),
    }
    if opaque:
        error["opaque"] = opaque
    return error


def error_from_contract(error: dict[str, Any]) -> dict[str, Any]:
    """A contract error object (section 2) as ZStack's: its code mapped, its own code kept in
    `opaque.code`, and per-backup-storage `causes` as ZStack's list of causes."""
    try:
        ours = ErrorCode(str(error.get("code")))
    except ValueError:
        ours = ErrorCode.INTERNAL_ERROR
    text = str(error.get("details") or error.get("description") or ours.value)
    result = zstack_error(ERROR_CODES[ours], f"{ours.value}: {text}", {"code": ours.value})
    causes = error.get("causes") or []
    if causes:
        result["causes"] = [_cause(c) for c in causes if isinstance(c, dict)]
    return result


def _cause(cause: dict[str, Any]) -> dict[str, Any]:
    try:
        ours = ErrorCode(str(cause.get("code")))
    except ValueError:
        ours = ErrorCode.OPERATION_ERROR
    return zstack_error(
        ERROR_CODES[ours],
        f"{ours.value}: {cause.get('details') or ''}",
        {"code": ours.value, "backupStorageUuid": cause.get("backupStorageUuid")},
    )


def parse_request(data: Any) -> tuple[MessageClass, dict[str, Any]]:
    """The decoded body of `POST /zstack/api`: its class and its message (ZStack's names).
    Anything that is not one message of a known class is a 400."""
    if not isinstance(data, dict) or len(data) != 1:
        raise PortalError(
            SYS_INVALID_ARGUMENT,
            "the body must be one JSON object with exactly one key, the message class:"
            ' {"org.zstack.header.image.APIQueryImageMsg": {...}}',
            status=400,
        )
    ((name, body),) = data.items()
    cls = CLASSES.get(name)
    if cls is None:
        raise PortalError(
            SYS_UNKNOWN_MESSAGE,
            f"unknown message class {cut(repr(name), 256)}; this portal serves: "
            + ", ".join(sorted(CLASSES)),
            status=400,
        )
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise PortalError(
            SYS_INVALID_ARGUMENT, f"{name}: the message must be a JSON object", status=400
        )
    return cls, body


def session_of(body: dict[str, Any]) -> str | None:
    """The session uuid a message carries (`"session": {"uuid": S}`), None without one."""
    session = body.get("session")
    if session is None:
        return None
    if isinstance(session, dict) and isinstance(session.get("uuid"), str):
        return str(session["uuid"])
    raise PortalError(ID_INVALID_SESSION, 'session must be {"uuid": SESSION_UUID}')


def api_params(cls: MessageClass, body: dict[str, Any]) -> dict[str, Any]:
    """A ZStack message's parameters as the contract's API takes them. Anything this does not
    recognise is passed on, so that the API's own validation names it (INVALID_ARGUMENT)."""
    params = {k: v for k, v in body.items() if k not in ENVELOPE_FIELDS}
    for field in TAG_FIELDS:
        if field in params:
            if params[field]:
                raise PortalError(
                    SYS_INVALID_ARGUMENT,
                    f"{field}: tags on {cls.api} are not supported; use CreateUserTag",
                )
            del params[field]
    if cls.api in MODELESS_DELETES and "deleteMode" in params:
        if params["deleteMode"] not in ("Permissive", "Enforcing"):
            raise PortalError(SYS_INVALID_ARGUMENT, "deleteMode: Permissive or Enforcing")
        del params["deleteMode"]
    for zstack_name, ours in cls.renames:
        # SDKs send every field, the unused ones as null: a null is no value.
        if params.get(zstack_name) is None:
            params.pop(zstack_name, None)
            continue
        if params.get(ours) is not None:
            raise PortalError(SYS_INVALID_ARGUMENT, f"give {zstack_name} or {ours}, not both")
        params[ours] = params.pop(zstack_name)
    if cls.is_query:
        params = _query_params(params)
    return params


def _query_params(params: dict[str, Any]) -> dict[str, Any]:
    # ZStack's `groupBy` and `filterName` have no meaning here when absent.
    for unused in ("groupBy", "filterName"):
        if params.get(unused) in (None, ""):
            params.pop(unused, None)
    conditions = params.get("conditions")
    if conditions is None:
        params["conditions"] = []
    elif isinstance(conditions, list):
        params["conditions"] = [_condition(i, c) for i, c in enumerate(conditions)]
    else:
        raise PortalError(SYS_INVALID_ARGUMENT, "conditions: a list of {name, op, value}")
    return params


def _condition(index: int, condition: Any) -> Any:
    if not isinstance(condition, dict):
        return condition  # the API's validation names it
    op = condition.get("op")
    if not isinstance(op, str):
        return condition
    ours = QUERY_OPS.get(op.strip().lower())
    if ours is None:
        raise PortalError(
            SYS_INVALID_ARGUMENT,
            f"conditions[{index}].op: {cut(repr(op), 64)} is not one of ZStack's query operators: "
            + ", ".join(QUERY_OPS),
        )
    converted = {**condition, "op": ours}
    name = condition.get("name")
    if isinstance(name, str) and name.startswith(_ZSTACK_REFS):
        # ZStack's ImageInventory calls its references `backupStorageRefs`.
        converted["name"] = "backupStorageRef." + name[len(_ZSTACK_REFS) :]
    if ours in ("is null", "not null"):
        converted.pop("value", None)
    return converted


def reply_body(reply: dict[str, Any]) -> dict[str, Any]:
    """A contract reply (section 2) as ZStack's reply or event body."""
    body = {k: v for k, v in reply.items() if k != "api"}
    if reply.get("success") is False:
        error = reply.get("error")
        body["error"] = error_from_contract(error if isinstance(error, dict) else {})
    return body


def result_string(cls_reply: str, body: dict[str, Any]) -> str:
    """The portal envelope's `result`: a JSON string holding exactly one key, the class."""
    return json.dumps({cls_reply: body}, separators=(",", ":"), default=str)


def zstack_date(moment: datetime | None) -> str | None:
    """Dates in the envelope and the session, as every date of the contract:
    `2024-01-31T08:00:00.000000Z`."""
    if moment is None:
        return None
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
