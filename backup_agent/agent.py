"""The backup-storage agent process: commands in, results and heartbeats out.

Commands arrive on the durable queue `NS.agent.<uuid>`; each is journalled before its delivery
is acked, runs as a task, and its result is journalled and then published to the durable
`NS.results` queue (re-published after a restart until the broker confirmed it). An op id
already in the journal is never run again: its result is re-published instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import unicodedata
from pathlib import Path

from pydantic import ValidationError

from backup_agent.config import AgentSettings
from backup_agent.conversion import remove_tree
from backup_agent.fetchers import OpFailure
from backup_agent.journal import Entry, Journal
from backup_agent.layout import Gauge, Layout
from backup_agent.monitoring import AgentMetrics, MetricsServer
from backup_agent.work import Work
from image_service.protocol.agent import (
    AgentCommand,
    AgentResult,
    DeleteCommand,
    Heartbeat,
    command_from_dict,
    parse_command,
)
from image_service.protocol.config import split_host_port
from image_service.protocol.errors import ErrorCode, validation_details
from image_service.protocol.events import ImageProgress
from image_service.protocol.names import Names
from image_service.protocol.transport import Bus, Incoming, WrongBrokerUser

log = logging.getLogger(__name__)

JOURNAL_RETENTION = 7 * 24 * 3600.0
MAX_PUBLIC_DETAILS = 2048
# Control, format (bidi overrides, zero-width), separator, private-use and unassigned
# characters: what could make a reply render as something else than it says.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})


def public_details(details: str, private: Path) -> str:
    """Error details fit for the service's replies (contract section 9): no path inside the
    agent's private directory (partial files, journal), in any spelling, no invisible or
    control characters (qemu-img may echo bytes of a hostile image), at most 2 KiB of UTF-8."""
    text = details
    for spelling in {str(private), os.path.realpath(private)}:
        text = re.sub(re.escape(spelling) + r"[^\s'\"]*", "(agent-private file)", text)
    text = "".join(
        " " if ch in "\t\n\r" else "?" if unicodedata.category(ch) in _HIDDEN else ch for ch in text
    )
    encoded = text.encode()
    if len(encoded) > MAX_PUBLIC_DETAILS:
        text = encoded[: MAX_PUBLIC_DETAILS - 3].decode(errors="ignore") + "…"
    return text


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.layout = Layout(settings.root.resolve())
        self.gauge = Gauge(self.layout, settings.capacity)
        self.journal = Journal(self.layout.ops)
        self.names = Names(settings.namespace)
        broker = settings.broker("backup-agent")
        self.bus = Bus(broker, self.names, connection_name=f"backup-agent {settings.name}")
        # Contract section 8: commands count only from this broker user.
        self.service_user = settings.service_user or broker.user
        self.uuid = ""
        self.running: dict[str, asyncio.Task[None]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False
        self.metrics = AgentMetrics()
        self._http: MetricsServer | None = None

    async def start(self) -> None:
        if self.settings.http_listen is not None:
            # First: a port that cannot be had ends the start before anything else is done.
            self._http = MetricsServer(self.metrics)
            await self._http.start(*split_host_port(self.settings.http_listen))
        self.layout.prepare()
        self.uuid = self.layout.identity(self.settings.backup_storage_uuid)
        self.work = self._make_work()
        await self.bus.connect()
        await self.bus.declare_agent_topology(self.uuid)
        self.journal.prune(JOURNAL_RETENTION)
        unfinished = [e for e in self.journal.entries() if e.result is None]
        keep = {e.op_id for e in unfinished}
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
            self._resume(entry)
        await self._first_beat()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        await self.bus.consume(self.names.agent(self.uuid), self.on_command, prefetch=32)
        log.info(
            "backup agent %s (%s) serving %s as broker user %r; commands count only from %r",
            self.settings.name,
            self.uuid,
            self.layout.root,
            self.bus.broker.user,
            self.service_user,
        )

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
        if self._http is not None:
            await self._http.stop()

    # --- commands ------------------------------------------------------------------------

    async def on_command(self, msg: Incoming) -> None:
        if msg.exchange != "" or msg.user_id != self.service_user:
            log.warning(
                "command dropped (message %r): sent by broker user %r through exchange %r;"
                " commands count only from %r through the default exchange",
                msg.message_id,
                msg.user_id,
                msg.exchange,
                self.service_user,
            )
            return
        try:
            command = parse_command(msg.body)
        except ValidationError as exc:
            log.warning(
                "invalid command dropped (message %s): %s", msg.message_id, validation_details(exc)
            )
            return
        if command.backupStorageUuid != self.uuid:
            log.warning(
                "command %s for backup storage %s dropped: this is %s",
                command.opId,
                command.backupStorageUuid,
                self.uuid,
            )
            return
        entry = self.journal.get(command.opId)
        if entry is not None:
            failed = entry.result is not None and not entry.result.success
            if failed and isinstance(command, DeleteCommand):
                # A delete that failed (a file it could not remove then) is what the service
                # re-sends it for: try it again; removing is idempotent.
                self.journal.begin(command.opId, command.model_dump(mode="json"))
                if command.opId not in self.running:
                    self._launch(command)
                return
            if entry.result is not None:
                await self._publish_result(entry)  # the service asks again: answer again
            elif command.opId not in self.running:
                self._launch(command)
            return
        if isinstance(command, DeleteCommand):
            self._forget(command.cancelOpIds)
        self.journal.begin(command.opId, command.model_dump(mode="json"))
        self._launch(command)

    def _forget(self, op_ids: list[str]) -> None:
        """A cancelled op that never reached this agent must not run if it arrives later."""
        for op_id in op_ids:
            if self.journal.get(op_id) is None:
                self.journal.finish(op_id, None, self._cancelled(op_id))

    def _cancelled(self, op_id: str) -> AgentResult:
        return AgentResult.failed(op_id, self.uuid, ErrorCode.DOWNLOAD_FAILED, "cancelled")

    def _resume(self, entry: Entry) -> None:
        """Run a journalled command again after a restart."""
        try:
            command = command_from_dict(entry.command or {})
        except ValidationError as exc:
            details = f"journalled command unreadable: {validation_details(exc)}"
            log.error("op %s: %s", entry.op_id, details)
            result = AgentResult.failed(entry.op_id, self.uuid, ErrorCode.INTERNAL_ERROR, details)
            self.journal.finish(entry.op_id, entry.command, result)
            return
        log.info("resuming op %s (%s)", entry.op_id, command.command)
        self._launch(command)

    def _launch(self, command: AgentCommand) -> None:
        self.running[command.opId] = asyncio.create_task(self._execute(command))

    async def _execute(self, command: AgentCommand) -> None:
        op_id = command.opId
        self.metrics.started(command.command)
        cancelled = False
        try:
            result = await self.work.run(command)
        except OpFailure as exc:
            log.warning("op %s failed: %s", op_id, exc)
            details = public_details(exc.details, self.layout.state)
            result = AgentResult.failed(op_id, self.uuid, exc.code, details)
        except asyncio.CancelledError:
            if self._stopping:
                raise  # stays unfinished in the journal; resumed at the next start
            result = self._cancelled(op_id)
            cancelled = True
        except Exception as exc:
            log.exception("op %s failed", op_id)
            details = public_details(f"{type(exc).__name__}: {exc}", self.layout.state)
            result = AgentResult.failed(op_id, self.uuid, ErrorCode.INTERNAL_ERROR, details)
        finally:
            self.running.pop(op_id, None)
        outcome = "cancelled" if cancelled else None if result.success else result.code or "other"
        self.metrics.finished(command.command, outcome, result.size)
        entry = self.journal.finish(op_id, command.model_dump(mode="json"), result)
        await self._publish_result(entry)

    def _make_work(self) -> Work:
        return Work(
            self.settings,
            self.layout,
            self.uuid,
            self.running,
            self._progress,
            self._placing,
            self._was_placing,
            self.gauge,
        )

    def _placing(self, command: AgentCommand, path: Path) -> None:
        self.journal.placing(command.opId, command.model_dump(mode="json"), str(path))

    def _was_placing(self, op_id: str, path: Path) -> bool:
        entry = self.journal.get(op_id)
        return entry is not None and entry.result is None and entry.placing == str(path)

    # --- publishing ----------------------------------------------------------------------

    async def _publish_result(self, entry: Entry) -> None:
        """Publish a journalled result with the capacity measured now, after its op (and
        after any op that finished since: the service keeps the latest measurement)."""
        assert entry.result is not None
        result = entry.result
        try:
            capacity = await self.gauge.measure()
        except OSError as exc:
            # The result matters more than the figures: the next heartbeat brings them.
            log.warning("capacity not measured for the result of %s: %r", entry.op_id, exc)
        else:
            self.metrics.capacity(capacity.total, capacity.available)
            result = result.model_copy(
                update={
                    "totalCapacity": capacity.total,
                    "availableCapacity": capacity.available,
                    "capacitySeq": capacity.seq,
                }
            )
        body = result.to_json()
        delay = 0.5
        while True:
            try:
                await self.bus.publish(
                    self.names.agent_messages,
                    self.names.result_key(self.uuid),
                    body,
                    message_id=entry.op_id,
                    persistent=True,
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
        event = ImageProgress(
            uuid=image_uuid, backupStorageUuid=self.uuid, downloadedBytes=done, totalBytes=total
        )
        with contextlib.suppress(Exception):
            await self.bus.publish(
                self.names.events,
                event.routing_key,
                event.model_dump_json().encode(),
            )

    async def _beat(self) -> None:
        interval = self.settings.heartbeat_interval
        capacity = await self.gauge.measure()
        self.metrics.capacity(capacity.total, capacity.available)
        beat = Heartbeat(
            uuid=self.uuid,
            name=self.settings.name,
            url=str(self.layout.root),
            hostname=self.settings.hostname,
            totalCapacity=capacity.total,
            availableCapacity=capacity.available,
            heartbeatInterval=interval,
            sentAt=time.time(),
            capacitySeq=capacity.seq,
        )
        await self.bus.publish(
            self.names.agent_messages,
            self.names.heartbeat_key(self.uuid),
            beat.model_dump_json().encode(),
            persistent=False,
            expiration=max(1.0, interval * 2),
        )

    async def _first_beat(self) -> None:
        """The first heartbeat, before any work: a broker that knows this agent as another user
        than its messages say (WrongBrokerUser) stops it here, at once and clearly."""
        try:
            await self._beat()
        except WrongBrokerUser:
            raise
        except Exception as exc:
            log.warning("heartbeat failed: %r", exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat failed: %r", exc)
