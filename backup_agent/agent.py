"""The backup-storage agent process.

Commands arrive on the durable queue `NS.agent.<uuid>`; each is journalled before its delivery
is acked, runs as a task, and its result is journalled and then published to the durable
`NS.results` queue (re-published after a restart until the broker confirmed it). An op id
already in the journal is never run again: its result is re-published instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backup_agent.conversion import flatten, hash_file, materialize, remove_tree
from backup_agent.fetchers import FetchSettings, OpFailure
from backup_agent.inspection import inspect_image
from backup_agent.journal import Entry, Journal
from backup_agent.layout import Layout, PathRejected, fsync_dir
from backup_agent.transfer import Progress, receive
from image_service.bus import Bus, Incoming
from image_service.names import Names

log = logging.getLogger(__name__)

JOURNAL_RETENTION = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class AgentSettings:
    root: Path
    name: str
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    namespace: str = "image"
    heartbeat_interval: float = 10.0
    hostname: str = field(default_factory=socket.getfqdn)
    capacity: int | None = None
    max_downloads: int = 4
    volume_roots: tuple[Path, ...] = ()
    fetch: FetchSettings = field(default_factory=FetchSettings)


def failure(
    command: dict[str, Any], backup_storage_uuid: str, code: str, details: str
) -> dict[str, Any]:
    return {
        "opId": command["opId"],
        "backupStorageUuid": backup_storage_uuid,
        "success": False,
        "code": code,
        "details": details,
    }


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.layout = Layout(settings.root.resolve())
        self.journal = Journal(self.layout.ops)
        self.names = Names(settings.namespace)
        self.bus = Bus(
            settings.amqp_url, self.names, connection_name=f"backup-agent {settings.name}"
        )
        self.uuid = ""
        self.running: dict[str, asyncio.Task[None]] = {}
        self._downloads = asyncio.Semaphore(settings.max_downloads)
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self.layout.prepare()
        self.uuid = self.layout.identity()
        await self.bus.connect()
        await self.bus.declare_agent_topology(self.uuid)
        self.journal.prune(JOURNAL_RETENTION)
        unfinished = [e for e in self.journal.entries() if e.result is None]
        keep = {str(uuid.UUID(e.op_id)) for e in unfinished}
        for partial in self.layout.partial.iterdir():
            if partial.name.split(".")[0] not in keep:
                if partial.is_dir():
                    remove_tree(partial)
                else:
                    partial.unlink(missing_ok=True)
        for entry in self.journal.entries():
            if entry.result is not None and not entry.published:
                await self._publish_result(entry)
        for entry in unfinished:
            log.info("resuming op %s (%s)", entry.op_id, entry.command.get("command"))
            self._launch(entry.command)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        await self.bus.consume(self.names.agent(self.uuid), self.on_command, prefetch=32)
        log.info("backup agent %s (%s) serving %s", self.settings.name, self.uuid, self.layout.root)

    async def stop(self) -> None:
        """Graceful stop: unfinished ops stay in the journal and resume at the next start."""
        self._stopping = True
        await self.bus.stop_consuming(drain_timeout=10)
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self.bus.close()

    # --- commands ------------------------------------------------------------------------

    async def on_command(self, msg: Incoming) -> None:
        try:
            command = json.loads(msg.body)
            op_id = str(uuid.UUID(command["opId"]))
            kind = command["command"]
            if kind not in ("download", "create", "delete"):
                raise ValueError(f"unknown command {kind!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("malformed command dropped: %s", exc)
            return
        entry = self.journal.get(op_id)
        if entry is not None:
            if entry.result is not None:
                await self._publish_result(entry)  # the service asks again: answer again
            elif op_id not in self.running:
                self._launch(entry.command)
            return
        if kind == "delete":
            self._forget(command.get("cancelOpIds") or [])
        self.journal.begin(op_id, command)
        self._launch(command)

    def _forget(self, op_ids: list[str]) -> None:
        """A cancelled op that never reached this agent must not run if it arrives later."""
        for op_id in op_ids:
            with contextlib.suppress(ValueError, TypeError):
                if self.journal.get(op_id) is None:
                    stub = {"opId": op_id, "command": "download"}
                    self.journal.finish(
                        op_id, stub, failure(stub, self.uuid, "DOWNLOAD_FAILED", "cancelled")
                    )

    def _launch(self, command: dict[str, Any]) -> None:
        op_id = str(uuid.UUID(command["opId"]))
        self.running[op_id] = asyncio.create_task(self._execute(op_id, command))

    async def _execute(self, op_id: str, command: dict[str, Any]) -> None:
        try:
            if command["command"] == "download":
                result = await self._download(command)
            elif command["command"] == "create":
                result = await self._create(command)
            else:
                result = await self._delete(command)
        except OpFailure as exc:
            log.warning("op %s failed: %s", op_id, exc)
            result = failure(command, self.uuid, exc.code, exc.details)
        except asyncio.CancelledError:
            if self._stopping:
                raise  # stays unfinished in the journal; resumed at the next start
            result = failure(command, self.uuid, "DOWNLOAD_FAILED", "cancelled")
        except Exception as exc:
            log.exception("op %s failed", op_id)
            result = failure(command, self.uuid, "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}")
        finally:
            self.running.pop(op_id, None)
        entry = self.journal.finish(op_id, command, result)
        await self._publish_result(entry)

    def _target(self, command: dict[str, Any]) -> Path:
        try:
            return self.layout.resolve_install_path(command["installPath"])
        except PathRejected as exc:
            raise OpFailure("INVALID_ARGUMENT", str(exc)) from None

    def _reporter(self, command: dict[str, Any]) -> Progress:
        async def progress(done: int, total: int | None) -> None:
            await self._progress(command["imageUuid"], done, total)

        return progress

    async def _store(
        self, command: dict[str, Any], partial: Path, final: Path, size: int, md5: str
    ) -> dict[str, Any]:
        """Inspect a finished partial file and move it into place; the op's result."""
        fmt = str(command["format"])
        facts = await inspect_image(partial, fmt)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        fsync_dir(final.parent)
        return {
            "opId": command["opId"],
            "backupStorageUuid": self.uuid,
            "success": True,
            "installPath": str(final),
            "size": size,
            "actualSize": facts.actual_size,
            "virtualSize": facts.virtual_size,
            "md5Sum": md5,
            "format": fmt,
        }

    async def _download(self, command: dict[str, Any]) -> dict[str, Any]:
        final = self._target(command)
        async with self._downloads:
            capacity = await asyncio.to_thread(self.layout.capacity, self.settings.capacity)
            partial = self.layout.partial_path(command["opId"])
            received = await receive(
                command["url"],
                partial,
                self.settings.fetch,
                available=capacity.available,
                progress=self._reporter(command),
            )
            try:
                expected = command.get("md5Sum")
                if expected and expected.lower() != received.md5:
                    raise OpFailure(
                        "CHECKSUM_MISMATCH", f"expected md5 {expected}, got {received.md5}"
                    )
                return await self._store(command, partial, final, received.size, received.md5)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise

    async def _create(self, command: dict[str, Any]) -> dict[str, Any]:
        final = self._target(command)
        async with self._downloads:
            capacity = await asyncio.to_thread(self.layout.capacity, self.settings.capacity)
            partial = self.layout.partial_path(command["opId"])
            workdir = partial.with_name(f"{partial.name}.chain")
            try:
                source = await materialize(
                    str(command["source"]),
                    str(command["sourceFormat"]),
                    workdir,
                    volume_roots=self.settings.volume_roots,
                    settings=self.settings.fetch,
                    available=capacity.available,
                    progress=self._reporter(command),
                )
                await flatten(source, str(command["sourceFormat"]), partial, command["format"])
                hashed = await hash_file(partial)
                if hashed.size > capacity.available:
                    raise OpFailure(
                        "CAPACITY_EXCEEDED",
                        f"the template has {hashed.size} bytes; {capacity.available} are available",
                    )
                return await self._store(command, partial, final, hashed.size, hashed.md5)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            finally:
                remove_tree(workdir)

    async def _delete(self, command: dict[str, Any]) -> dict[str, Any]:
        for cancel_id in command.get("cancelOpIds") or []:
            task = self.running.get(str(uuid.UUID(cancel_id)))
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self.layout.partial_path(cancel_id).unlink(missing_ok=True)
        try:
            path = self.layout.resolve_install_path(command["installPath"])
        except PathRejected as exc:
            log.error("delete of %s refused: %s", command["installPath"], exc)
        else:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when empty
        return {"opId": command["opId"], "backupStorageUuid": self.uuid, "success": True}

    # --- publishing ----------------------------------------------------------------------

    async def _publish_result(self, entry: Entry) -> None:
        assert entry.result is not None
        body = json.dumps(entry.result).encode()
        delay = 0.5
        while True:
            try:
                await self.bus.publish(
                    "", self.names.results, body, message_id=entry.op_id, persistent=True
                )
                break
            except Exception as exc:
                if self._stopping:
                    return  # re-published at the next start
                log.warning("publishing result of %s failed (%r); retrying", entry.op_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.journal.mark_published(entry)

    async def _progress(self, image_uuid: str, done: int, total: int | None) -> None:
        body = {
            "uuid": image_uuid,
            "backupStorageUuid": self.uuid,
            "downloadedBytes": done,
            "totalBytes": total,
        }
        with contextlib.suppress(Exception):
            await self.bus.publish(
                self.names.events,
                f"image.progress.{image_uuid}",
                json.dumps(body).encode(),
                persistent=False,
            )

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            try:
                capacity = await asyncio.to_thread(self.layout.capacity, self.settings.capacity)
                body = {
                    "uuid": self.uuid,
                    "name": self.settings.name,
                    "url": str(self.layout.root),
                    "hostname": self.settings.hostname,
                    "totalCapacity": capacity.total,
                    "availableCapacity": capacity.available,
                    "heartbeatInterval": interval,
                    "sentAt": time.time(),
                }
                await self.bus.publish(
                    "",
                    self.names.heartbeats,
                    json.dumps(body).encode(),
                    persistent=False,
                    expiration=max(1.0, interval * 2),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat failed: %r", exc)
            await asyncio.sleep(interval)
