"""Ops: the commands sent to agents, each the lease on its work until its result arrives."""

from __future__ import annotations

import uuid
from typing import Any

from image_service.lifecycle import OP_STATUS, BackupStorageStatus, OpKind, OpStatus
from image_service.store.group import QueryGroup, Record
from image_service.store.rows import Cause, OpRow, Stranded, Succeeded

_PENDING = OpStatus.Pending


def _op(row: Record) -> OpRow:
    return OpRow(
        op_id=row["op_id"],
        kind=OpKind(row["kind"]),
        message_id=row["message_id"],
        image_uuid=row["image_uuid"],
        backup_storage_uuid=row["backup_storage_uuid"],
        command=row["command"],
    )


class Ops(QueryGroup, sql_file="ops.sql"):
    __slots__ = ()

    async def insert(
        self,
        *,
        op_id: uuid.UUID,
        kind: OpKind,
        message_id: str | None,
        image_uuid: str,
        backup_storage_uuid: str,
        command: dict[str, Any],
    ) -> None:
        await self._execute(
            "op_insert",
            op_id=op_id,
            kind=kind,
            message_id=message_id,
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            command=command,
        )

    async def insert_failed(
        self,
        *,
        kind: OpKind,
        message_id: str,
        image_uuid: str,
        backup_storage_uuid: str,
        error_code: str,
        error_details: str,
    ) -> None:
        """An op that failed before it was sent (its backup storage was skipped): it shows in
        the reply's `causes` like a real failure."""
        await self._execute(
            "op_insert_failed",
            op_id=uuid.uuid4(),
            kind=kind,
            failed=OpStatus.Failed,
            message_id=message_id,
            image_uuid=image_uuid,
            backup_storage_uuid=backup_storage_uuid,
            error_code=error_code,
            error_details=error_details,
        )

    async def finish(
        self,
        *,
        op_id: uuid.UUID,
        status: OpStatus,
        result: dict[str, Any] | None,
        error_code: str | None,
        error_details: str | None,
    ) -> OpRow | None:
        """Finish a Pending op; None when it had finished already (a late or duplicate result,
        or a cancellation that won the race)."""
        row = await self._row(
            "op_finish",
            op_id=op_id,
            status=status,
            result=result,
            error_code=error_code,
            error_details=error_details,
            allowed=OP_STATUS.allowed_from(status),
        )
        return _op(row) if row is not None else None

    async def get(self, op_id: uuid.UUID) -> OpRow | None:
        row = await self._row("op_get", op_id=op_id)
        return _op(row) if row is not None else None

    async def pending_of_image(self, image_uuid: str) -> list[OpRow]:
        rows = await self._rows("ops_pending_of_image", image_uuid=image_uuid, pending=_PENDING)
        return [_op(row) for row in rows]

    async def pending_of_backup_storage(self, backup_storage_uuid: str) -> list[OpRow]:
        rows = await self._rows(
            "ops_pending_of_bs", backup_storage_uuid=backup_storage_uuid, pending=_PENDING
        )
        return [_op(row) for row in rows]

    async def count_pending_for_message(self, message_id: str) -> int:
        count: int = await self._value(
            "ops_count_pending_for_message", message_id=message_id, pending=_PENDING
        )
        return count

    async def failures_for_message(self, message_id: str) -> list[Cause]:
        rows = await self._rows(
            "ops_failed_for_message",
            message_id=message_id,
            failed=OpStatus.Failed,
            delete=OpKind.delete,
        )
        return [
            Cause(row["backup_storage_uuid"], row["error_code"], row["error_details"])
            for row in rows
        ]

    async def successes_for_message(self, message_id: str) -> list[Succeeded]:
        rows = await self._rows(
            "ops_succeeded_for_message",
            message_id=message_id,
            succeeded=OpStatus.Succeeded,
            delete=OpKind.delete,
        )
        return [Succeeded(row["backup_storage_uuid"], row["result"]) for row in rows]

    async def pending_error(self, op_id: uuid.UUID) -> tuple[str, str | None] | None:
        """The failure the agent reported for a still Pending op, if it reported one."""
        row = await self._row("op_error", op_id=op_id, pending=_PENDING)
        if row is None or row["error_code"] is None:
            return None
        return row["error_code"], row["error_details"]

    async def detach_message(self, op_id: uuid.UUID) -> None:
        """The op goes on, but its caller no longer waits for it."""
        await self._execute("op_detach_message", op_id=op_id)

    async def note_failure(
        self, *, op_id: uuid.UUID, error_code: str, error_details: str | None
    ) -> None:
        await self._execute(
            "op_note_failure",
            op_id=op_id,
            error_code=error_code,
            error_details=error_details,
            pending=_PENDING,
        )

    async def stranded(self) -> list[Stranded]:
        """Pending ops of backup storages that are gone or Disconnected and should not wait
        (at most 100)."""
        rows = await self._rows(
            "ops_stranded",
            pending=_PENDING,
            disconnected=BackupStorageStatus.Disconnected,
            delete=OpKind.delete,
        )
        return [Stranded(_op(row), row["gone"]) for row in rows]

    async def due_for_resend(self, *, after: float) -> list[OpRow]:
        """Pending ops of Connected agents last sent more than `after` seconds ago, marked as
        sent now (SKIP LOCKED: each is taken by one replica)."""
        rows = await self._rows(
            "ops_due_for_resend",
            after=after,
            pending=_PENDING,
            connected=BackupStorageStatus.Connected,
        )
        return [_op(row) for row in rows]

    async def resend_now(self, backup_storage_uuid: str) -> None:
        await self._execute(
            "ops_resend_now", backup_storage_uuid=backup_storage_uuid, pending=_PENDING
        )

    async def prune(self, *, older_than: float) -> None:
        await self._execute("ops_prune", older_than=older_than, final=OP_STATUS.final())
