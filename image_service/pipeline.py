"""The life of an API message, in one place (docs/DESIGN.md section 2).

Validate the envelope; in one transaction claim the message id (inbox), answer a duplicate
from the stored reply, run the handler inside a savepoint, store the reply and put what must be
published in the outbox; commit; then the bus acks. `Ctx` is what a handler works with; it is
built here, once per message. Queries take a shorter path with the same guarantees
(`_read_only`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    nullcontext,
)
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from image_service.errors import ApiError, ErrorCode
from image_service.metrics import METRICS, outcome_of
from image_service.outbox import Outbox, encode
from image_service.params import Envelope
from image_service.protocol.errors import validation_details
from image_service.protocol.names import Names
from image_service.protocol.transport import Bus, Incoming, PublishRejected, Refused, RetryLater
from image_service.replies import error_reply, finish_message, success_reply
from image_service.store import CONNECTION_ERRORS, Store, Tx

log = logging.getLogger(__name__)

MAX_PARAMS = 64
QUERY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Ctx:
    """What a handler works with: one transaction, its outbox, and the message being run."""

    tx: Tx
    outbox: Outbox
    message_id: str
    # Seconds a query may run before it is cancelled (TIMEOUT, contract section 8).
    query_timeout: float = QUERY_TIMEOUT


class AwaitOps:
    """Returned by a handler whose reply comes when its agent operations have finished."""


AWAIT_OPS = AwaitOps()
Outcome = dict[str, Any] | AwaitOps
# Replies to a message once none of its agent ops is pending (settlement.settle_message).
Settle = Callable[["Ctx", str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Api:
    model: type[BaseModel]
    handler: Callable[[Ctx, Any], Awaitable[Outcome]]
    # Reads only: its reply is stored with the message id and published directly (no outbox,
    # no durable flush), see Pipeline._read_only.
    read_only: bool = False
    # A read-only request waits here for its turn before it takes a database connection (the
    # costly queries take turns, api/queries.py): waiting with a connection in hand would
    # starve the pool that every other request needs.
    # It is given the validated params and the most it may wait, and raises ApiError when the
    # request gets no turn (answered like the handler's own errors).
    admit: Callable[[Any, float], AbstractAsyncContextManager[None]] | None = None


class Transactions:
    """Opens the transaction every message and loop runs in. Its commit wakes the relay; a
    lost database becomes RetryLater (the bus keeps the delivery and tries again)."""

    def __init__(self, store: Store, names: Names, *, query_timeout: float = QUERY_TIMEOUT) -> None:
        self.store = store
        self.names = names
        self.query_timeout = query_timeout
        self.committed = asyncio.Event()
        # Since when this replica has been consuming heartbeats: silence before says nothing.
        self.heard_since = time.monotonic()

    def database_lost(self, exc: BaseException) -> RetryLater:
        # Heartbeats wait in their queue meanwhile: do not judge agents by this silence.
        self.heard_since = time.monotonic()
        return RetryLater(f"database unavailable: {exc}")

    @asynccontextmanager
    async def open(self, message_id: str = "") -> AsyncIterator[Ctx]:
        try:
            async with self.store.transaction() as tx:
                yield Ctx(tx, Outbox(tx, self.names), message_id, self.query_timeout)
        except CONNECTION_ERRORS as exc:
            raise self.database_lost(exc) from exc
        self.committed.set()


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


class Pipeline:
    """Runs every message of `NS.api` through the one order of operations."""

    def __init__(
        self, transactions: Transactions, bus: Bus, apis: Mapping[str, Api], settle: Settle
    ) -> None:
        self.transactions = transactions
        self.bus = bus
        self.apis = apis
        self.settle = settle

    async def submit(self, message_id: str, body: bytes) -> None:
        """Run an API message that came another way than the bus (the HTTP portal): the same
        order of operations, with no one to send the reply to; it waits in the inbox under
        `message_id`. Raises RetryLater when the database is lost before the commit."""
        await self.on_api(
            Incoming(
                body=body,
                message_id=message_id,
                reply_to=None,
                correlation_id=None,
                routing_key=None,
                redelivered=False,
            )
        )

    async def on_api(self, msg: Incoming) -> None:
        message_id = msg.message_id or f"generated-{uuid.uuid4().hex}"
        if msg.reply_to and self.transactions.names.is_internal(msg.reply_to):
            log.warning(
                "message %r names the internal queue %r as reply_to: it gets no reply",
                message_id,
                msg.reply_to[:300],
            )
            msg = dataclasses.replace(msg, reply_to=None)
        if msg.message_id is None:
            log.warning("API message without message_id: it cannot be deduplicated")
        correlation_id = msg.correlation_id or msg.message_id
        try:
            envelope: Envelope | ApiError = parse_envelope(msg.body)
        except ApiError as exc:
            envelope = exc
        api_name = envelope.api if isinstance(envelope, Envelope) else None
        api = self.apis.get(api_name) if api_name is not None else None
        if isinstance(envelope, Envelope) and api is not None and api.read_only:
            await self._read_only(msg, envelope, message_id, correlation_id)
            return
        async with self.transactions.open(message_id) as ctx:
            claimed = await ctx.tx.inbox.claim(
                message_id=message_id,
                api=api_name or "",
                reply_to=msg.reply_to,
                correlation_id=correlation_id,
            )
            if not claimed:
                await self._duplicate(ctx, msg, correlation_id)
                return
            if isinstance(envelope, ApiError):
                await finish_message(ctx.tx, ctx.outbox, message_id, error_reply(None, envelope))
                return
            outcome = await self._run(ctx, envelope)
            if isinstance(outcome, AwaitOps):
                # The agents' results bring the reply; or it is due now, when no op is left
                # to wait for (every target skipped, none Connected).
                await self.settle(ctx, message_id)
            else:
                await finish_message(ctx.tx, ctx.outbox, message_id, outcome)

    async def _read_only(
        self, msg: Incoming, envelope: Envelope, message_id: str, correlation_id: str | None
    ) -> None:
        """The queries: the same guarantees as other APIs (a message id runs once, its reply
        is stored and survives a crash of this process), in fewer round trips.
        The reads and the one statement that stores the reply with the message id run without
        a transaction (under READ COMMITTED a transaction gives the reads no common snapshot
        anyway), and the reply is published straight away rather than through the outbox.
        Should that publish fail, the delivery is not acked; its redelivery finds the stored
        reply."""
        transactions = self.transactions
        started = time.monotonic()
        checked = self._validate(envelope)
        admission: AbstractAsyncContextManager[None] = nullcontext()
        if not isinstance(checked, dict) and checked[0].admit is not None:
            admission = checked[0].admit(checked[1], transactions.query_timeout)
        try:
            async with AsyncExitStack() as stack:
                try:
                    await stack.enter_async_context(admission)
                except ApiError as exc:
                    checked = error_reply(envelope.api, exc)
                tx = await stack.enter_async_context(transactions.store.autocommit())
                ctx = Ctx(
                    tx, Outbox(tx, transactions.names), message_id, transactions.query_timeout
                )
                if isinstance(checked, dict):
                    body: Outcome = checked
                else:
                    body = await self._execute(ctx, envelope.api, *checked, isolated=False)
                assert not isinstance(body, AwaitOps), "a read-only API never waits for agents"
                payload = encode(body)
                recorded = await tx.inbox.record(
                    message_id=message_id,
                    api=envelope.api,
                    reply_to=msg.reply_to,
                    correlation_id=correlation_id,
                    reply=payload.decode(),
                )
        except CONNECTION_ERRORS as exc:
            raise transactions.database_lost(exc) from exc
        if not recorded:
            async with transactions.open(message_id) as ctx:
                await self._duplicate(ctx, msg, correlation_id)
            return
        METRICS.answered(envelope.api, outcome_of(body), time.monotonic() - started)
        if not msg.reply_to:
            log.debug("message %r (%s) had no reply_to", message_id, envelope.api)
            return
        try:
            await self.bus.publish_reply(msg.reply_to, payload, correlation_id=correlation_id)
        except Refused as exc:
            # No queue by that name (the caller went away, or never was), or a direct reply-to
            # name the broker refused on its own: only this reply is lost.
            log.warning("reply to %r dropped: %s", message_id, exc)
        except PublishRejected as exc:
            # The channel closed under it, maybe for another message: the outbox relay tries
            # again, and drops what is refused twice.
            log.warning("reply to %r not published (%s); handed to the outbox", message_id, exc)
            async with transactions.open(message_id) as ctx:
                await ctx.outbox.reply(msg.reply_to, correlation_id, body)

    async def _run(self, ctx: Ctx, envelope: Envelope, *, isolated: bool = True) -> Outcome:
        """Run one API. `isolated`: inside a savepoint, so that a handler that fails leaves
        no partial writes (read-only handlers write nothing and need none)."""
        checked = self._validate(envelope)
        if isinstance(checked, dict):
            return checked
        return await self._execute(ctx, envelope.api, *checked, isolated=isolated)

    def _validate(self, envelope: Envelope) -> tuple[Api, BaseModel] | dict[str, Any]:
        """The API and its validated parameters, or the error reply."""
        name = envelope.api
        api = self.apis.get(name)
        if api is None:
            known = ", ".join(sorted(self.apis))
            return error_reply(name, ApiError(ErrorCode.UNKNOWN_API, f"{name!r}; known: {known}"))
        if len(envelope.params) > MAX_PARAMS:
            # No API has that many: refuse before validation lists each unknown one.
            return error_reply(
                name,
                ApiError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"params: {len(envelope.params)} parameters; no API takes more than"
                    f" {MAX_PARAMS}",
                ),
            )
        try:
            # JSON-mode validation: strict types, with enums given as their strings.
            return api, api.model.model_validate_json(json.dumps(envelope.params))
        except ValidationError as exc:
            return error_reply(name, ApiError(ErrorCode.INVALID_ARGUMENT, validation_details(exc)))

    async def _execute(
        self, ctx: Ctx, name: str, api: Api, params: BaseModel, *, isolated: bool
    ) -> Outcome:
        try:
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
        row = await ctx.tx.inbox.get(ctx.message_id)
        assert row is not None
        log.info("duplicate message %r (redelivered=%s)", ctx.message_id, msg.redelivered)
        if not msg.reply_to:
            return
        if row.reply is not None:
            await ctx.outbox.reply(msg.reply_to, correlation_id, row.reply)
        elif (msg.reply_to, correlation_id) != (row.reply_to, row.correlation_id):
            await ctx.tx.inbox.add_waiter(
                message_id=ctx.message_id, reply_to=msg.reply_to, correlation_id=correlation_id
            )
