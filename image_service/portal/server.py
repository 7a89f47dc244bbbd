"""The HTTP side of a replica (contract section 11): ZStack's API portal, /metrics, /healthz and
/readyz, on aiohttp.

A portal call becomes an ordinary API message: the same pipeline validates it, runs it at most
once under its message id (`portal-` + the call's uuid) and stores its reply in the inbox. The
portal never keeps state of its own, so any replica answers any poll: `GET
/zstack/api/result/UUID` reads the inbox. A call that finishes within `wait` seconds is
answered Done at once (ZStack clients sleep a second before each poll); the replica that
stores a reply NOTIFYs, so the waiting request hears it whichever replica finished it.

Every answer is JSON in ZStack's shape, a failure included: a body that is too large, not JSON
or not one message gets 413 or 400 with `{"success": false, "error": {...}}`; a refused call
(a wrong password, an expired session, a bad parameter) gets 200 and the error inside the
reply, as ZStack's portal answers; an unexpected failure gets 500 without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from image_service.metrics import METRICS
from image_service.pipeline import Pipeline, Transactions
from image_service.portal import accounts
from image_service.portal.zstack import (
    BY_API,
    ID_INVALID_SESSION,
    SYS_INTERNAL,
    SYS_INVALID_ARGUMENT,
    SYS_RESOURCE_NOT_FOUND,
    SYS_UNAVAILABLE,
    MessageClass,
    PortalError,
    Special,
    api_params,
    parse_request,
    reply_body,
    result_string,
    session_of,
    zstack_date,
    zstack_error,
)
from image_service.protocol.exposition import exposition
from image_service.protocol.transport import RetryLater
from image_service.store import CONNECTION_ERRORS

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
PORTAL_PREFIX = "portal-"
# NOTIFYed with a portal call's message id when its reply is stored (migration 0006).
FINISHED_CHANNEL = "image_portal_finished"
# Seconds /readyz and /metrics give the database.
PROBE_TIMEOUT = 2.0
# The longest a waiting call goes without looking at the inbox itself (a lost NOTIFY).
RECHECK = 1.0
_UUID = re.compile(r"^[0-9a-f]{32}$")
# What says "the database is gone": the call may be made again later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (RetryLater, *CONNECTION_ERRORS)
PROBE_FAILED: tuple[type[BaseException], ...] = (TimeoutError, *CONNECTION_ERRORS)

Readiness = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class PortalSettings:
    session_timeout: float = 7200.0
    # Seconds a call may take and still be answered Done in the POST's own answer.
    wait: float = 5.0
    # Portal calls running at once in this replica; more wait for a turn.
    concurrency: int = 64


def _now() -> datetime:
    return datetime.now(UTC)


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=str), status=status, content_type="application/json"
    )


def _failure(status: int, code: str, details: str) -> web.Response:
    """A request that is not an API call: ZStack's bare error body."""
    return _json({"success": False, "error": zstack_error(code, details)}, status)


def _envelope(
    job_uuid: str,
    created: datetime,
    *,
    reply_class: str | None = None,
    body: dict[str, Any] | None = None,
    finished: datetime | None = None,
) -> dict[str, Any]:
    """The portal's answer: Done with `result` (a JSON string of one key, the reply class),
    or Processing while the call runs."""
    done = reply_class is not None and body is not None
    envelope: dict[str, Any] = {
        "uuid": job_uuid,
        "state": "Done" if done else "Processing",
        "createdDate": zstack_date(created),
        "finishedDate": zstack_date(finished or _now()) if done else None,
    }
    if done:
        assert reply_class is not None and body is not None
        envelope["result"] = result_string(reply_class, body)
    return envelope


class Portal:
    """The HTTP server of one replica."""

    def __init__(
        self,
        transactions: Transactions,
        pipeline: Pipeline,
        settings: PortalSettings,
        ready: Readiness,
    ) -> None:
        self.transactions = transactions
        self.pipeline = pipeline
        self.settings = settings
        self.ready = ready
        self._turns = asyncio.Semaphore(settings.concurrency)
        self._waiters: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = False

    # --- wiring ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.router.add_post("/zstack/api", self.api)
        app.router.add_post("/zstack/api/", self.api)
        app.router.add_get("/zstack/api/result/{uuid}", self.result)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (the one chosen when `port` is 0)."""
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=5.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = [s for s in self._runner.addresses if isinstance(s, tuple)]
        bound = int(sockets[0][1]) if sockets else port
        log.info("HTTP portal listening on %s:%d", host, bound)
        return bound

    async def stop(self) -> None:
        """Stop listening. Calls waiting for their reply answer Processing at once, with their
        uuid: their work is committed, and any replica answers the poll."""
        self._stopping = True
        for event in self._waiters.values():
            event.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def finished(self, message_id: str) -> None:
        """NOTIFY of a stored reply ('' after the LISTEN connection came back: look again)."""
        if not message_id:
            for event in self._waiters.values():
                event.set()
        elif (waiter := self._waiters.get(message_id)) is not None:
            waiter.set()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route.resource
        label = route.canonical if route is not None else "other"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _failure(
                exc.status,
                SYS_RESOURCE_NOT_FOUND if exc.status == 404 else SYS_INVALID_ARGUMENT,
                f"{request.method} {request.path[:200]}: {exc.reason}",
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path[:200])
            response = _failure(500, SYS_INTERNAL, "internal error; the service log has it")
        METRICS.http_requests.labels(label, str(response.status)).inc()
        return response

    # --- health and metrics ---------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problem = await self.ready()
        if problem is not None:
            return _json({"status": "unavailable", "reason": problem}, 503)
        return _json({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), self.transactions.store.autocommit() as tx:
                ops = await tx.stats.ops_in_flight()
                backup_storages = await tx.stats.backup_storages()
                depth = await tx.stats.outbox_depth()
            METRICS.refresh(ops, backup_storages, depth)
        except PROBE_FAILED as exc:
            log.warning("/metrics: database unavailable (%r)", exc)
            METRICS.unavailable()
        body, content_type = exposition(METRICS.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- the portal -----------------------------------------------------------------------

    async def api(self, request: web.Request) -> web.Response:
        created = _now()
        try:
            data = await self._read_json(request)
            cls, fields = parse_request(data)
        except PortalError as exc:
            return _failure(exc.status, exc.code, exc.details)
        job_uuid = uuid.uuid4().hex
        try:
            return await self._call(
                cls, fields, session_of(fields), job_uuid, created, request.remote or "unknown"
            )
        except PortalError as exc:
            METRICS.answered(cls.api, exc.code, None)
            if exc.status != 200:
                return _failure(exc.status, exc.code, exc.details)
            body = {"success": False, "error": zstack_error(exc.code, exc.details)}
            return _json(_envelope(job_uuid, created, reply_class=cls.reply, body=body))
        except accounts.Busy:
            METRICS.answered(cls.api, SYS_UNAVAILABLE, None)
            return _failure(503, SYS_UNAVAILABLE, "too many logins at once; try again")
        except _UNAVAILABLE as exc:
            # Nothing was submitted (a call once submitted is answered with its uuid).
            log.warning("portal call %s: %s", cls.name, exc)
            METRICS.answered(cls.api, SYS_UNAVAILABLE, None)
            return _failure(503, SYS_UNAVAILABLE, "the database is unavailable; try again")

    async def _read_json(self, request: web.Request) -> Any:
        too_large = PortalError(
            SYS_INVALID_ARGUMENT, f"the body is over {MAX_BODY} bytes", status=413
        )
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise too_large
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        except (OSError, aiohttp.ClientError) as exc:  # the client went away mid-body
            raise PortalError(
                SYS_INVALID_ARGUMENT, f"the body was cut: {exc!r}", status=400
            ) from None
        try:
            # orjson: strict UTF-8 (no lone surrogates, no UTF-16), no NaN, nesting bounded.
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PortalError(
                SYS_INVALID_ARGUMENT, f"the body is not JSON: {exc}", status=400
            ) from None

    async def _call(
        self,
        cls: MessageClass,
        fields: dict[str, Any],
        session_uuid: str | None,
        job_uuid: str,
        created: datetime,
        address: str,
    ) -> web.Response:
        timeout = self.settings.session_timeout
        if cls.api == Special.LogIn:
            name, password = fields.get("accountName"), fields.get("password")
            problem = accounts.account_name_problem(name)
            if not isinstance(password, str) or not password:
                problem = problem or "password: the SHA-512 hex of the password (a string)"
            elif len(password) > accounts.MAX_WIRE:
                problem = problem or f"password: at most {accounts.MAX_WIRE} characters"
            if problem is not None:
                raise PortalError(SYS_INVALID_ARGUMENT, problem)
            assert isinstance(name, str) and isinstance(password, str)
            session = await accounts.log_in(
                self.transactions, name, password, address=address, timeout=timeout
            )
            body: dict[str, Any] = {"success": True, "inventory": session.inventory()}
            METRICS.answered(cls.api, "success", (_now() - created).total_seconds())
            return _json(_envelope(job_uuid, created, reply_class=cls.reply, body=body))
        # Every call but login needs a valid session (contract section 11), LogOut and
        # ValidateSession included.
        async with self.transactions.open() as ctx:
            caller = await accounts.use_session(ctx.tx, session_uuid, timeout=timeout)
        if caller is None:
            raise PortalError(
                ID_INVALID_SESSION,
                "session expired or invalid: log in again (APILogInByAccountMsg)"
                if session_uuid
                else "no session: log in first (APILogInByAccountMsg) and send"
                ' "session": {"uuid": SESSION_UUID}',
            )
        if cls.api in (Special.ValidateSession, Special.LogOut):
            # About `sessionUuid`, by default the caller's own session.
            named = fields.get("sessionUuid") or caller.uuid
            about = named if isinstance(named, str) else None
            async with self.transactions.open() as ctx:
                if cls.api == Special.LogOut:
                    await accounts.log_out(ctx.tx, about)
                    body = {"success": True}
                else:
                    body = {
                        "success": True,
                        "validSession": await accounts.session_valid(ctx.tx, about),
                    }
            METRICS.answered(cls.api, "success", (_now() - created).total_seconds())
            return _json(_envelope(job_uuid, created, reply_class=cls.reply, body=body))
        params = api_params(cls, fields)
        message_id = PORTAL_PREFIX + job_uuid
        envelope = orjson.dumps({"api": cls.api, "params": params})
        event = self._waiters.setdefault(message_id, asyncio.Event())
        try:
            async with self._turns:
                try:
                    await self.pipeline.submit(message_id, envelope)
                except RetryLater as exc:
                    # The commit may or may not have happened: never invite a second call.
                    # The uuid lets the client find out (404 when it was not committed).
                    log.warning("portal call %s (%s): %s", job_uuid, cls.api, exc)
                    return _json(_envelope(job_uuid, created))
            return await self._answer(job_uuid, created, event)
        finally:
            self._waiters.pop(message_id, None)

    async def _answer(self, job_uuid: str, created: datetime, event: asyncio.Event) -> web.Response:
        """The call's envelope: Done when its reply comes within the wait, else Processing
        (also when the database is lost meanwhile, or the replica stops: the call is
        committed, so it must be polled, never made again)."""
        deadline = time.monotonic() + self.settings.wait
        while True:
            event.clear()
            try:
                answered = await self._lookup(job_uuid)
            except RetryLater as exc:
                log.warning("portal call %s: %s; answered Processing", job_uuid, exc)
                return _json(_envelope(job_uuid, created))
            if answered is not None and (answered[0] or self._stopping):
                return answered[1]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                # Processing, dated as the inbox has it (as every poll will be).
                return answered[1] if answered is not None else _json(_envelope(job_uuid, created))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, RECHECK)):
                    await event.wait()

    async def result(self, request: web.Request) -> web.Response:
        job_uuid = request.match_info["uuid"].lower()
        try:
            answered = await self._lookup(job_uuid) if _UUID.match(job_uuid) else None
        except RetryLater as exc:
            log.warning("portal poll %s: %s", job_uuid, exc)
            return _failure(503, SYS_UNAVAILABLE, "the database is unavailable; try again")
        if answered is None:
            return _failure(
                404, SYS_RESOURCE_NOT_FOUND, f"no API call {request.match_info['uuid'][:64]!r}"
            )
        return answered[1]

    async def _lookup(self, job_uuid: str) -> tuple[bool, web.Response] | None:
        """Whether the call is done, and its envelope as the inbox has it; None when the
        inbox has no such call (never made, or pruned after the retention)."""
        try:
            async with self.transactions.store.autocommit() as tx:
                row = await tx.inbox.result(PORTAL_PREFIX + job_uuid)
        except CONNECTION_ERRORS as exc:
            raise RetryLater(f"database unavailable: {exc}") from exc
        if row is None:
            return None
        if row.reply is None:
            return False, _json(_envelope(job_uuid, row.received_at))
        cls = BY_API.get(row.api)
        reply_class = cls.reply if cls is not None else "org.zstack.header.message.APIReply"
        if isinstance(row.reply, dict):
            body = reply_body(row.reply)
        else:
            log.error("portal call %s: stored reply is not an object", job_uuid)
            body = {"success": False, "error": zstack_error(SYS_INTERNAL, "unreadable reply")}
        return True, _json(
            _envelope(
                job_uuid,
                row.received_at,
                reply_class=reply_class,
                body=body,
                finished=row.finished_at,
            )
        )
