"""The agent's directory: where images, partial downloads, the journal and the identity live.

ROOT/templates/<imageUuid>/<name>.template   stored images (the seed's layout)
ROOT/.agent/identity.json                    this backup storage's uuid, kept across restarts
ROOT/.agent/ops/<opId>.json                  the journal of operations (see journal.py)
ROOT/.agent/partial/<opId>                   downloads in progress, never under templates/
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path


class IdentityMismatch(Exception):
    """The directory is another backup storage's."""


class PathRejected(ValueError):
    """An install path outside this agent's templates directory."""


def write_atomically(path: Path, data: bytes) -> None:
    """Write-then-rename with fsync, so a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Capacity:
    total: int
    available: int
    # Orders measurements (Gauge): the service keeps the one with the largest.
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def state(self) -> Path:
        return self.root / ".agent"

    @property
    def ops(self) -> Path:
        return self.state / "ops"

    @property
    def partial(self) -> Path:
        return self.state / "partial"

    def prepare(self) -> None:
        for directory in (self.templates, self.ops, self.partial):
            directory.mkdir(parents=True, exist_ok=True)

    def identity(self, expected: str | None = None) -> str:
        """This backup storage's uuid: `expected` (the one its broker user was enrolled for)
        or a new one on first start, then read back; a directory that already belongs to
        another backup storage is refused (IdentityMismatch)."""
        path = self.state / "identity.json"
        if path.exists():
            value = str(json.loads(path.read_text())["uuid"])
            if expected is not None and value != expected:
                raise IdentityMismatch(
                    f"{self.root} is backup storage {value}, not {expected} (--backup-storage-uuid)"
                )
            return value
        new = expected or uuid.uuid4().hex
        write_atomically(path, json.dumps({"uuid": new}).encode())
        return new

    def next_incarnation(self) -> int:
        """A number larger than at any earlier start of this agent: one more than the last
        (kept in the directory), and at least the clock's seconds, so that a directory that
        was replaced, restored or lost its count still numbers after what the service saw."""
        path = self.state / "incarnation.json"
        previous = 0
        if path.exists():
            try:
                previous = int(json.loads(path.read_text())["incarnation"])
            except (ValueError, KeyError, TypeError):
                previous = 0
        current = max(previous + 1, int(time.time()))
        write_atomically(path, json.dumps({"incarnation": current}).encode())
        return current

    def partial_path(self, op_id: str) -> Path:
        return self.partial / str(uuid.UUID(op_id))

    def resolve_install_path(self, install_path: str, image_uuid: str) -> Path:
        """The stored file an install path names, only if it lies in the directory of image
        `image_uuid` under templates/: a command about one image never touches another's file."""
        path = Path(os.path.normpath(install_path))
        if not path.is_absolute():
            path = Path(os.path.normpath(self.root / install_path))
        templates = Path(os.path.normpath(self.templates.resolve()))
        try:
            relative = Path(os.path.normpath(path.parent.resolve() / path.name)).relative_to(
                templates
            )
        except ValueError:
            raise PathRejected(f"{install_path} is outside {templates}") from None
        if len(relative.parts) < 2 or any(part in ("", ".", "..") for part in relative.parts):
            raise PathRejected(f"{install_path} is not a template path")
        if relative.parts[0] != image_uuid:
            raise PathRejected(f"{install_path} is not in the directory of image {image_uuid}")
        return templates / relative

    def used_bytes(self) -> int:
        total = 0
        for directory, _dirs, files in os.walk(self.templates):
            for name in files:
                try:
                    total += os.stat(os.path.join(directory, name)).st_blocks * 512
                except OSError:
                    continue
        return total

    def capacity(self, quota: int | None, used: int | None = None) -> Capacity:
        """The file system's size and free space; with a quota, the quota and what is left of
        it (`used`: the bytes under templates/, walked for when not given)."""
        usage = shutil.disk_usage(self.root)
        if quota is None:
            return Capacity(total=usage.total, available=usage.free)
        if used is None:
            used = self.used_bytes()
        return Capacity(total=quota, available=max(0, min(usage.free, quota - used)))


def allocated(path: Path) -> int:
    """The bytes a file occupies on disk; 0 when it is not there."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


class Gauge:
    """Measures this backup storage's capacity, one measurement at a time, each numbered
    (`Capacity.seq`) after every earlier one, across restarts too: heartbeats and results
    carry it, and the service keeps only a newer measurement than the one it has, so a
    heartbeat measured before an op never undoes the result measured after it."""

    # 2^24 measurements per incarnation (then a new one): with an incarnation of the clock's
    # seconds, sequence numbers stay below 2^63 for thousands of years.
    COUNTER_BITS = 24
    # With a quota, the bytes under templates/ are walked for at the first measurement and
    # then tracked: the agent changes them only inside `changing`, which reports each change.
    # A walk this often still finds what was changed behind the agent's back. Walking at every
    # result would cost a stat of every stored file each time (tests/benchmarks).
    REWALK_AFTER = 60.0

    def __init__(self, layout: Layout, quota: int | None) -> None:
        self.layout = layout
        self.quota = quota
        self._lock = asyncio.Lock()
        self._incarnation: int | None = None  # taken at the first measurement
        self._count = 0
        self._used: int | None = None
        self._walked = 0.0

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[Callable[[int], None]]:
        """Change files under templates/ while no measurement is under way; report the bytes
        each change added (negative: freed) through the callable yielded."""
        async with self._lock:
            yield self._adjust

    def _adjust(self, delta: int) -> None:
        if self._used is not None:
            self._used = max(0, self._used + delta)

    async def _used_bytes(self) -> int | None:
        if self.quota is None:
            return None
        now = time.monotonic()
        if self._used is None or now - self._walked >= self.REWALK_AFTER:
            self._used = await asyncio.to_thread(self.layout.used_bytes)
            self._walked = now
        return self._used

    async def measure(self) -> Capacity:
        async with self._lock:
            self._count += 1
            if self._incarnation is None or self._count >= 1 << self.COUNTER_BITS:
                self._incarnation = await asyncio.to_thread(self.layout.next_incarnation)
                self._count = 1
            seq = (self._incarnation << self.COUNTER_BITS) | self._count
            used = await self._used_bytes()
            measured = await asyncio.to_thread(self.layout.capacity, self.quota, used)
            return Capacity(measured.total, measured.available, seq)
