"""The image service process: wires the bus and the store to the handlers.

Every delivery follows one order: validate; in one transaction record the message id
(inbox), change state, and record what must be published (outbox); commit; ack; then the
relay publishes the outbox. Background loops (each safe to run in several replicas at once)
publish the outbox, turn silent agents Disconnected, re-send the commands of unfinished
operations (their lease) and prune old inbox and op rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from image_service.api import APIS, AwaitOps
from image_service.bus import Bus, Incoming, PublishRejected, RetryLater, Unroutable
from image_service.errors import ApiError, ErrorCode
from image_service.lifecycle import backup_storage_inventory
from image_service.models import AgentResult, Envelope, Heartbeat, SnapshotEvent, VolumeEvent
from image_service.names import Names
from image_service.operations import (
    Ctx,
    apply_result,
    backup_storage_disconnected,
    error_reply,
    finish_message,
    settle_message,
    success_reply,
)
from image_service.outbox import Outbox, encode
from image_service.store import CONNECTION_ERRORS, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Settings:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/images"
    namespace: str = "image"
    # An op whose command was sent this long ago without a result is sent again.
    resend_after: float = 30.0
    # A backup storage is Disconnected after this many heartbeat intervals of silence.
    missed_heartbeats: int = 3
    monitor_interval: float = 1.0
    retention: float = 7 * 24 * 3600.0
    prefetch: int = 16


def validation_details(exc: ValidationError) -> str:
    """Pydantic errors as `field: problem; ...`, naming every offending parameter."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_envelope(body: bytes) -> Envelope:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(ErrorCode.MALFORMED_MESSAGE, f"body is not JSON: {exc}") from None
    except RecursionError:
        raise ApiError(ErrorCode.MALFORMED_MESSAGE, "body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(ErrorCode.MALFORMED_MESSAGE, 'body must be {"api": NAME, "params": {...}}')
    data = {k: v for k, v in data.items() if k in ("api", "params")}
    try:
        return Envelope.model_validate(data)
    except ValidationError as exc:
        raise ApiError(
            ErrorCode.MALFORMED_MESSAGE,
            'body must be {"api": NAME, "params": {...}}: ' + validation_details(exc),
        ) from None


class ImageService:
    """One replica of the service; several may run against the same broker and database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.bus = Bus(settings.amqp_url, self.names)
        self.store: Store | None = None
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._heard_since = time.monotonic()

    # --- lifecycle of the process -----------------------------------------------------

    async def start(self) -> None:
        self.store = await Store.open(self.settings.database_url)
        await self.store.migrate()
        await self.bus.connect()
        await self.bus.declare_topology()
        self._tasks = [
            asyncio.create_task(self._loop("relay", self._relay_loop)),
            asyncio.create_task(self._loop("monitor", self._monitor_loop)),
        ]
        prefetch = self.settings.prefetch
        await self.bus.consume(self.names.heartbeats, self.on_heartbeat, prefetch=prefetch)
        await self.bus.consume(self.names.results, self.on_result, prefetch=prefetch)
        await self.bus.consume(self.names.volume_events, self.on_volume_event, prefetch=prefetch)
        await self.bus.consume(self.names.api, self.on_api, prefetch=prefetch)
        self._heard_since = time.monotonic()
        log.info("image service started (namespace %s)", self.settings.namespace)

    async def stop(self) -> None:
        """Graceful stop: take no new deliveries, finish and ack the ones in hand, publish
        what they committed, then close. What is left resumes in another replica."""
        self._stopping = True
        await self.bus.stop_consuming()
        with contextlib.suppress(Exception):
            await self._relay_all()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.close()
        if self.store is not None:
            await self.store.close()
        log.info("image service stopped")

    async def _loop(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s loop failed; restarting it", name)
                await asyncio.sleep(1.0)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Ctx]:
        """A transaction whose commit wakes the relay; a lost database means RetryLater."""
        assert self.store is not None
        try:
            async with self.store.transaction() as tx:
                yield Ctx(tx, Outbox(tx, self.names), "")
        except CONNECTION_ERRORS as exc:
            # Heartbeats wait in their queue meanwhile: do not judge agents by this silence.
            self._heard_since = time.monotonic()
            raise RetryLater(f"database unavailable: {exc}") from exc
        self._kick.set()

    # --- API messages -------------------------------------------------------------------

    async def on_api(self, msg: Incoming) -> None:
        message_id = msg.message_id or f"generated-{uuid.uuid4().hex}"
        if msg.message_id is None:
            log.warning("API message without message_id: it cannot be deduplicated")
        correlation_id = msg.correlation_id or msg.message_id
        envelope: Envelope | None = None
        bad_envelope: ApiError | None = None
        try:
            envelope = parse_envelope(msg.body)
        except ApiError as exc:
            bad_envelope = exc
        api_name = envelope.api if envelope is not None else None
        api = APIS.get(api_name) if api_name is not None else None
        if envelope is not None and api is not None and api.read_only:
            await self.on_read_only(msg, envelope, message_id, correlation_id)
            return
        async with self._transaction() as base:
            ctx = Ctx(base.tx, base.outbox, message_id)
            claimed = await ctx.tx.fetchrow(
                "inbox_claim", message_id, api_name or "", msg.reply_to, correlation_id
            )
            if claimed is None:
                await self._duplicate(ctx, msg, correlation_id)
                return
            if bad_envelope is not None or envelope is None:
                error = bad_envelope or ApiError(ErrorCode.MALFORMED_MESSAGE, "no envelope")
                await finish_message(ctx, message_id, error_reply(None, error))
                return
            outcome = await self._run(ctx, envelope)
            if isinstance(outcome, AwaitOps):
                await settle_message(ctx, message_id)
            else:
                await finish_message(ctx, message_id, outcome)

    async def on_read_only(
        self, msg: Incoming, envelope: Envelope, message_id: str, correlation_id: str | None
    ) -> None:
        """The queries: the same guarantees as other APIs (a message id runs once, its reply
        is stored and survives a crash of this process), in fewer round trips.
        The reads and the one statement that stores the reply with the message id run without
        a transaction (under READ COMMITTED a transaction gives the reads no common snapshot
        anyway), and the reply is published straight away rather than through the outbox.
        Should that publish fail, the delivery is not acked; its redelivery finds the stored
        reply."""
        assert self.store is not None
        try:
            async with self.store.autocommit() as tx:
                ctx = Ctx(tx, Outbox(tx, self.names), message_id)
                body = await self._run(ctx, envelope, isolated=False)
                assert not isinstance(body, AwaitOps), "a read-only API never waits for agents"
                payload = encode(body)
                recorded = await tx.fetchval(
                    "inbox_record",
                    message_id,
                    envelope.api,
                    msg.reply_to,
                    correlation_id,
                    payload.decode(),
                )
        except CONNECTION_ERRORS as exc:
            self._heard_since = time.monotonic()
            raise RetryLater(f"database unavailable: {exc}") from exc
        if recorded is None:
            async with self._transaction() as ctx:
                await self._duplicate(Ctx(ctx.tx, ctx.outbox, message_id), msg, correlation_id)
            return
        if not msg.reply_to:
            log.info("message %s (%s) had no reply_to", message_id, envelope.api)
            return
        try:
            await self.bus.publish_reply(msg.reply_to, payload, correlation_id=correlation_id)
        except Unroutable as exc:
            # No queue by that name: the caller went away (or never was). Nobody to answer.
            log.warning("reply to %s dropped: %s", message_id, exc)
        except PublishRejected as exc:
            # The reply connection was closed under it: by this message's own forged reply-to,
            # or by another one's. The outbox relay retries it, and drops what is refused twice.
            log.warning("reply to %s not published (%s); handed to the outbox", message_id, exc)
            async with self._transaction() as ctx:
                await ctx.outbox.reply(msg.reply_to, correlation_id, body)

    async def _run(
        self, ctx: Ctx, envelope: Envelope, *, isolated: bool = True
    ) -> dict[str, Any] | AwaitOps:
        """Run one API. `isolated`: inside a savepoint, so that a handler that fails leaves
        no partial writes (read-only handlers write nothing and need none)."""
        name = envelope.api
        api = APIS.get(name)
        if api is None:
            known = ", ".join(sorted(APIS))
            return error_reply(name, ApiError(ErrorCode.UNKNOWN_API, f"{name!r}; known: {known}"))
        try:
            try:
                # JSON-mode validation: strict types, with enums given as their strings.
                params = api.model.model_validate_json(json.dumps(envelope.params))
            except ValidationError as exc:
                raise ApiError(ErrorCode.INVALID_ARGUMENT, validation_details(exc)) from None
            if isolated:
                async with ctx.tx.savepoint():
                    outcome = await api.handler(ctx, params)
            else:
                outcome = await api.handler(ctx, params)
        except ApiError as exc:
            return error_reply(name, exc)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:
            log.exception("%s failed (message %s)", name, ctx.message_id)
            return error_reply(name, ApiError(ErrorCode.INTERNAL_ERROR, type(exc).__name__))
        if isinstance(outcome, AwaitOps):
            return outcome
        return success_reply(name, **outcome)

    async def _duplicate(self, ctx: Ctx, msg: Incoming, correlation_id: str | None) -> None:
        """A message id seen before: the same reply again, never a second execution."""
        row = await ctx.tx.fetchrow("inbox_get", ctx.message_id)
        assert row is not None
        log.info("duplicate message %s (redelivered=%s)", ctx.message_id, msg.redelivered)
        if not msg.reply_to:
            return
        if row["reply"] is not None:
            await ctx.outbox.reply(msg.reply_to, correlation_id, row["reply"])
        elif (msg.reply_to, correlation_id) != (row["reply_to"], row["correlation_id"]):
            await ctx.tx.execute("inbox_add_waiter", ctx.message_id, msg.reply_to, correlation_id)

    # --- agent results and heartbeats ------------------------------------------------

    async def on_result(self, msg: Incoming) -> None:
        try:
            result = AgentResult.model_validate_json(msg.body)
        except ValidationError as exc:
            log.warning("malformed agent result dropped: %s", validation_details(exc))
            return
        async with self._transaction() as ctx:
            await apply_result(ctx, result)

    async def on_heartbeat(self, msg: Incoming) -> None:
        try:
            beat = Heartbeat.model_validate_json(msg.body)
        except ValidationError as exc:
            log.warning("malformed heartbeat dropped: %s", validation_details(exc))
            return
        async with self._transaction() as ctx:
            old_status = await ctx.tx.fetchval("bs_status_for_update", beat.uuid)
            registered = await ctx.tx.fetchrow(
                "bs_heartbeat",
                beat.uuid,
                beat.name,
                beat.url,
                beat.hostname,
                beat.totalCapacity,
                beat.availableCapacity,
                beat.heartbeatInterval,
            )
            if registered is None:
                log.info("heartbeat of deleted backup storage %s ignored", beat.uuid)
                return
            changed = registered["inserted"] if old_status is None else old_status != "Connected"
            if changed:
                await self.bus.declare_agent_queue(beat.uuid)
                await ctx.tx.execute("ops_resend_now", beat.uuid)
                await self._emit_bs_status(ctx, beat.uuid, old_status, "Connected")

    async def on_volume_event(self, msg: Incoming) -> None:
        """Keep the volume read model. Idempotent: replays change nothing, a deletion is a
        tombstone that a late `created` cannot undo; a malformed event is logged and dropped."""
        kind, _, rest = (msg.routing_key or "").partition(".")
        action, _, key_uuid = rest.partition(".")
        models: dict[str, type[VolumeEvent] | type[SnapshotEvent]] = {
            "volume": VolumeEvent,
            "volumeSnapshot": SnapshotEvent,
        }
        model = models.get(kind)
        if model is None or action not in ("created", "updated", "deleted"):
            log.warning("event %r dropped: not a volume event", msg.routing_key)
            return
        try:
            event: VolumeEvent | SnapshotEvent = model.model_validate_json(msg.body)
        except ValidationError as exc:
            log.warning("malformed %s event dropped: %s", msg.routing_key, validation_details(exc))
            return
        if key_uuid and key_uuid != event.uuid:
            log.warning("event %r dropped: body uuid %s differs", msg.routing_key, event.uuid)
            return
        async with self._transaction() as ctx:
            if action == "deleted":
                query = "volume_tombstone" if kind == "volume" else "snapshot_tombstone"
                await ctx.tx.fetchrow(query, event.uuid)
            elif isinstance(event, VolumeEvent):
                await ctx.tx.fetchrow(
                    "volume_upsert",
                    event.uuid,
                    event.name,
                    event.type,
                    event.vmInstanceUuid,
                    event.rootImageUuid,
                    event.primaryStorageUuid,
                    event.installPath,
                    event.format,
                    event.size,
                )
            else:
                await ctx.tx.fetchrow(
                    "snapshot_upsert",
                    event.uuid,
                    event.volumeUuid,
                    event.installPath,
                    event.format,
                    event.size,
                )

    async def _emit_bs_status(self, ctx: Ctx, bs_uuid: str, old: str | None, new: str) -> None:
        rows = await ctx.tx.fetch("bs_inventories", [bs_uuid])
        await ctx.outbox.event(
            f"backupStorage.status.{bs_uuid}",
            {
                "uuid": bs_uuid,
                "oldStatus": old,
                "newStatus": new,
                "inventory": backup_storage_inventory(rows[0]) if rows else None,
            },
        )

    # --- background loops --------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        last_prune = 0.0
        while True:
            try:
                await self._monitor_once()
                if time.monotonic() - last_prune > 3600:
                    await self._prune()
                    last_prune = time.monotonic()
            except RetryLater as exc:
                log.warning("monitor: %s", exc)
            await asyncio.sleep(self.settings.monitor_interval)

    async def _monitor_once(self) -> None:
        async with self._transaction() as ctx:
            heard_for = time.monotonic() - self._heard_since
            lost = await ctx.tx.fetch(
                "bs_mark_disconnected", self.settings.missed_heartbeats, heard_for
            )
            for row in lost:
                log.warning("backup storage %s Disconnected (missed heartbeats)", row["uuid"])
                await self._emit_bs_status(ctx, row["uuid"], "Connected", "Disconnected")
                await backup_storage_disconnected(ctx, row["uuid"])
        async with self._transaction() as ctx:
            for op in await ctx.tx.fetch("ops_due_for_resend", self.settings.resend_after):
                await ctx.outbox.command(op["backup_storage_uuid"], op["command"])

    async def _prune(self) -> None:
        async with self._transaction() as ctx:
            await ctx.tx.execute("inbox_prune", self.settings.retention)
            await ctx.tx.execute("ops_prune", self.settings.retention)

    async def _relay_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout=0.5)
            self._kick.clear()
            try:
                await self._relay_all()
            except CONNECTION_ERRORS as exc:
                log.warning("relay: database unavailable: %s", exc)
                await asyncio.sleep(1.0)

    async def _relay_all(self) -> None:
        while await self._relay_batch() == 100:
            pass

    async def _relay_batch(self) -> int:
        """Publish up to 100 outbox rows; rows published are deleted in the same transaction
        that locked them, so another replica never publishes them too."""
        assert self.store is not None
        async with self.store.transaction() as tx:
            rows = await tx.fetch("outbox_take", 100)
            done: list[int] = []
            current: int | None = None
            try:
                for row in rows:
                    current = row["id"]
                    await self.bus.publish(
                        row["exchange"],
                        row["routing_key"],
                        encode(row["body"]),
                        correlation_id=row["correlation_id"],
                        message_id=row["message_id"],
                        persistent=row["persistent"],
                    )
                    done.append(row["id"])
            except PublishRejected as exc:
                log.warning("relay: the broker refused a message: %s", exc)
                await tx.execute("outbox_delete", done)
                refused = await tx.fetchrow("outbox_rejected", current)
                if refused is not None and refused["rejections"] >= 2:
                    log.error("relay: dropping undeliverable message to %s", refused["routing_key"])
                    await tx.execute("outbox_delete", [current])
                await asyncio.sleep(0.5)
                return 0
            except Exception as exc:  # broker trouble: keep the rest for the next round
                log.warning("relay: publish failed, will retry: %r", exc)
                await tx.execute("outbox_delete", done)
                await asyncio.sleep(0.5)
                return 0
            await tx.execute("outbox_delete", done)
            return len(rows)


async def run_forever(settings: Settings, stop: asyncio.Event) -> None:
    service = ImageService(settings)
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()
