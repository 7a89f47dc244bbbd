"""The agent's journal: one small JSON file per operation id.

A command is journalled before its delivery is acked, and its result is journalled before it
is published, so after a crash the agent resumes unfinished work and re-publishes results that
may not have reached the service. The same op id never runs twice (idempotency).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from backup_agent.layout import write_atomically
from image_service.protocol.agent import AgentResult

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    op_id: str
    # The command as it arrived (validated then); None for an op cancelled before it came.
    command: dict[str, Any] | None
    result: AgentResult | None
    published: bool
    # The stored file this op was moving into place (set just before the move): after a crash
    # there, the resumed op may replace that file, and only that one.
    placing: str | None = None


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, op_id: str) -> Path:
        return self.directory / f"{uuid.UUID(op_id)}.json"

    def get(self, op_id: str) -> Entry | None:
        try:
            data = json.loads(self._path(op_id).read_text())
            result = data.get("result")
            return Entry(
                op_id,
                data.get("command"),
                AgentResult.model_validate(result) if result is not None else None,
                bool(data.get("published")),
                data.get("placing") if isinstance(data.get("placing"), str) else None,
            )
        except FileNotFoundError:
            return None
        except (ValueError, ValidationError, AttributeError) as exc:
            log.error("journal entry %s is unreadable (%s); ignored", op_id, exc)
            return None

    def _write(self, entry: Entry) -> None:
        body = {
            "command": entry.command,
            "result": entry.result.model_dump(mode="json", exclude_none=True)
            if entry.result is not None
            else None,
            "published": entry.published,
            "placing": entry.placing,
            "updatedAt": time.time(),
        }
        write_atomically(self._path(entry.op_id), json.dumps(body).encode())

    def begin(self, op_id: str, command: dict[str, Any]) -> Entry:
        entry = Entry(op_id, command, None, False)
        self._write(entry)
        return entry

    def placing(self, op_id: str, command: dict[str, Any], path: str) -> None:
        """Record, before the move, the stored file this op is about to create."""
        self._write(Entry(op_id, command, None, False, path))

    def finish(self, op_id: str, command: dict[str, Any] | None, result: AgentResult) -> Entry:
        entry = Entry(op_id, command, result, False)
        self._write(entry)
        return entry

    def mark_published(self, entry: Entry) -> None:
        self._write(Entry(entry.op_id, entry.command, entry.result, True))

    def entries(self) -> list[Entry]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            entry = self.get(path.stem)
            if entry is not None:
                found.append(entry)
        return found

    def prune(self, older_than: float) -> None:
        """Forget published results older than `older_than` seconds."""
        cutoff = time.time() - older_than
        for path in self.directory.glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("published") and data.get("updatedAt", 0) < cutoff:
                path.unlink(missing_ok=True)
