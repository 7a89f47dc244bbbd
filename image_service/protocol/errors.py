"""The contract's error codes (section 2), used in replies and in agent results."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import ValidationError


class ErrorCode(StrEnum):
    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
    UNKNOWN_API = "UNKNOWN_API"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_NOT_FOUND = "RESOURCE_NOT_FOUND"
    INVALID_STATE = "INVALID_STATE"
    NO_BACKUP_STORAGE = "NO_BACKUP_STORAGE"
    CAPACITY_EXCEEDED = "CAPACITY_EXCEEDED"
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    UNSAFE_IMAGE = "UNSAFE_IMAGE"
    URL_NOT_ALLOWED = "URL_NOT_ALLOWED"
    OPERATION_ERROR = "OPERATION_ERROR"
    TIMEOUT = "TIMEOUT"
    INTERNAL_ERROR = "INTERNAL_ERROR"


DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED_MESSAGE: "the message body is not a JSON API envelope",
    ErrorCode.UNKNOWN_API: "no such API",
    ErrorCode.INVALID_ARGUMENT: "a parameter is missing, unknown, mistyped or out of range",
    ErrorCode.RESOURCE_NOT_FOUND: "the resource does not exist",
    ErrorCode.INVALID_STATE: "the resource is not in a state that allows this operation",
    ErrorCode.NO_BACKUP_STORAGE: "no usable backup storage",
    ErrorCode.CAPACITY_EXCEEDED: "the backup storage has no room for the image",
    ErrorCode.DOWNLOAD_FAILED: "the image could not be downloaded",
    ErrorCode.CHECKSUM_MISMATCH: "the downloaded image does not match the given md5Sum",
    ErrorCode.UNSAFE_IMAGE: "the image content is unsafe or does not match its declared format",
    ErrorCode.URL_NOT_ALLOWED: "the url is not allowed",
    ErrorCode.OPERATION_ERROR: "the operation failed on every target",
    ErrorCode.TIMEOUT: "the operation timed out",
    ErrorCode.INTERNAL_ERROR: "internal error",
}


# An error reply repeats at most this many bytes of the request (contract section 8): its
# details are cut there, so that a request naming 600,000 unknown parameters gets a short reply.
MAX_ECHO = 4096


def cut(text: str, limit: int = MAX_ECHO) -> str:
    """`text` within `limit` bytes of UTF-8, saying how much was left out."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore") + f" ... ({len(data) - limit} more bytes)"


def error_body(
    code: ErrorCode | str, details: str, causes: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The `error` object of a reply: every field always present (PROTOCOL.md A.6)."""
    code = ErrorCode(code)
    return {
        "code": code.value,
        "description": DESCRIPTIONS[code],
        "details": cut(details),
        "causes": causes or [],
    }


def validation_details(exc: ValidationError) -> str:
    """Pydantic errors as `field: problem; ...`, naming every offending field, for replies and
    for the log lines of dropped agent messages."""
    parts: list[str] = []
    size = 0
    for err in exc.errors(include_url=False):
        if size > MAX_ECHO:
            parts.append(f"and {exc.error_count() - len(parts)} more")
            break
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
        size += len(parts[-1]) + 2
    return "; ".join(parts)
