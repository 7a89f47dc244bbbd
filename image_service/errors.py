"""The contract's error codes and the one exception type handlers raise.

Every failure a caller can see maps to exactly one `ErrorCode`; handlers raise `ApiError`
and the dispatcher turns it into the contract's error reply.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


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


class ApiError(Exception):
    """A failure that becomes the contract's error reply."""

    def __init__(
        self,
        code: ErrorCode,
        details: str,
        causes: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.causes = causes or []

    def to_error(self) -> dict[str, Any]:
        return error_body(self.code, self.details, self.causes)


def error_body(
    code: ErrorCode | str, details: str, causes: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    code = ErrorCode(code)
    return {
        "code": code.value,
        "description": DESCRIPTIONS[code],
        "details": details,
        "causes": causes or [],
    }
