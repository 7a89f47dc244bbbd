"""The agent's journal: one small JSON file per operation id.

A command is journalled before its delivery is acked, and its result is journalled before it
is published, so after a crash the agent resumes unfinished work and re-publishes results that
may not have reached the service. The same op id never runs twice (idempotency).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backup_agent.layout import write_atomically


@dataclass(frozen=True, slots=True)
class Entry:
    op_id: str
    command: dict[str, Any]
    result: dict[str, Any] | None
    published: bool


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, op_id: str) -> Path:
        return self.directory / f"{uuid.UUID(op_id)}.json"

    def get(self, op_id: str) -> Entry | None:
        try:
            data = json.loads(self._path(op_id).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return Entry(op_id, data["command"], data.get("result"), bool(data.get("published")))

    def _write(self, entry: Entry) -> None:
        body = {
            "command": entry.command,
            "result": entry.result,
            "published": entry.published,
            "updatedAt": time.time(),
        }
        write_atomically(self._path(entry.op_id), json.dumps(body).encode())

    def begin(self, op_id: str, command: dict[str, Any]) -> Entry:
        entry = Entry(op_id, command, None, False)
        self._write(entry)
        return entry

    def finish(self, op_id: str, command: dict[str, Any], result: dict[str, Any]) -> Entry:
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
