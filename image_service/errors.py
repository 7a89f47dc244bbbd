"""The one exception type handlers raise; it becomes the contract's error reply.

Every failure a caller can see maps to exactly one `ErrorCode` (in the protocol package, which
the agent shares).
"""

from __future__ import annotations

from typing import Any

from image_service.protocol.errors import ErrorCode, error_body

__all__ = ["ApiError", "ErrorCode"]


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
