"""Fixtures shared by the integration tests: real RabbitMQ, PostgreSQL, service and agent
processes, and a real HTTP server, isolated per test by a namespace and a database of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web

from image_service.api import APIS
from image_service.outbox import encode
from image_service.pipeline import Ctx, Pipeline, Transactions, parse_envelope
from image_service.protocol.broker import Broker
from image_service.protocol.client import ApiClient
from image_service.protocol.names import Names
from image_service.store import Store
from image_service.store.migrations import available_migrations, migrate

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# The broker user of AMQP_URL: the one account the test stacks' service and agents share.
TEST_USER = Broker.plain(AMQP_URL).user
PG_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")
HEARTBEAT = 0.5


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], timeout: float = 20.0, interval: float = 0.1
) -> Any:
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


# --- the HTTP server that serves images --------------------------------------------------


@dataclass
class FileServer:
    """A real aiohttp server on 127.0.0.1 serving files, plus misbehaving routes:
    /truncated/NAME (promises the whole file, sends half, closes), /stall/NAME (sends a little,
    then nothing), /slow/NAME?rate=BYTES_PER_S (throttled)."""

    directory: Path
    port: int = 0
    runner: web.AppRunner | None = None
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def add(self, name: str, data: bytes) -> tuple[str, str]:
        """Write a file; returns (url, md5)."""
        (self.directory / name).write_bytes(data)
        return self.url(f"files/{name}"), hashlib.md5(data).hexdigest()

    def add_qcow2(self, name: str, virtual_size: str = "64M") -> tuple[str, str]:
        path = self.directory / name
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), virtual_size], check=True
        )
        return self.url(f"files/{name}"), hashlib.md5(path.read_bytes()).hexdigest()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/files/{name}", self._file)
        app.router.add_get("/truncated/{name}", self._truncated)
        app.router.add_get("/stall/{name}", self._stall)
        app.router.add_get("/slow/{name}", self._slow)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _path(self, request: web.Request) -> Path:
        name = request.match_info["name"]
        self.hits[name] = self.hits.get(name, 0) + 1
        path = self.directory / name
        if "/" in name or not path.is_file():
            raise web.HTTPNotFound()
        return path

    async def _file(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self._path(request))

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        data = self._path(request).read_bytes()
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.close()
        return response

    async def _stall(self, request: web.Request) -> web.StreamResponse:
        data = self._path(request).read_bytes()
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[:1024])
        # Send nothing more, but end as soon as the client gives up so that teardown is quick.
        while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        return response

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        data = self._path(request).read_bytes()
        rate = int(request.query.get("rate", str(256 * 1024)))
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        step = max(1, rate // 10)
        for offset in range(0, len(data), step):
            await response.write(data[offset : offset + step])
            await asyncio.sleep(0.1)
        await response.write_eof()
        return response


# --- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout: float = 30) -> int | None:
        """SIGTERM: the graceful case; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Agent:
    proc: Proc
    root: Path
    name: str
    uuid: str = ""

    def files(self) -> list[Path]:
        """Every stored or partial file (the identity and journal excluded)."""
        found = [p for p in (self.root / "templates").rglob("*") if p.is_file()]
        found += [p for p in (self.root / ".agent" / "partial").glob("*") if p.is_file()]
        return sorted(found)


@dataclass
class Stack:
    """One isolated deployment: namespace, database, service replicas, agents, HTTP server."""

    namespace: str
    database_url: str
    workdir: Path
    http: FileServer
    client: ApiClient
    db: asyncpg.Connection
    services: list[Proc] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    def start_service(self, *extra: str, database_url: str | None = None) -> Proc:
        index = len(self.services)
        proc = Proc(
            f"service{index}",
            [
                sys.executable,
                "-m",
                "image_service.main",
                "--amqp-url",
                AMQP_URL,
                "--database-url",
                database_url or self.database_url,
                "--namespace",
                self.namespace,
                "--monitor-interval",
                "0.2",
                "--resend-after",
                "3",
                *extra,
            ],
            self.workdir / f"service{index}.log",
        )
        proc.start()
        self.services.append(proc)
        return proc

    def restart(self, proc: Proc) -> None:
        proc.start()

    async def start_agent(
        self, name: str | None = None, *extra: str, root: Path | None = None, wait: bool = True
    ) -> Agent:
        name = name or f"bs{len(self.agents)}"
        root = root or self.workdir / name
        root.mkdir(parents=True, exist_ok=True)
        proc = Proc(
            f"agent-{name}",
            [
                sys.executable,
                "-m",
                "backup_agent.main",
                "--root",
                str(root),
                "--name",
                name,
                "--amqp-url",
                AMQP_URL,
                "--namespace",
                self.namespace,
                "--heartbeat-interval",
                str(HEARTBEAT),
                "--stall-timeout",
                "3",
                "--connect-timeout",
                "3",
                # The test HTTP and SFTP servers listen on 127.0.0.1, which agents refuse by
                # default (contract section 9); short backoffs keep retried failures quick.
                "--allow-networks",
                "127.0.0.1/32",
                "--retry-backoff",
                "0.05",
                *extra,
            ],
            self.workdir / f"agent-{name}.log",
        )
        proc.start()
        agent = Agent(proc, root, name)
        self.agents.append(agent)
        if wait:
            await self.wait_connected(agent)
        return agent

    async def wait_connected(self, agent: Agent, timeout: float = 20) -> dict[str, Any]:
        identity = agent.root / ".agent" / "identity.json"

        async def connected() -> dict[str, Any] | None:
            if not agent.uuid and identity.exists():
                with contextlib.suppress(ValueError):
                    agent.uuid = json.loads(identity.read_text())["uuid"]
            if not agent.uuid:
                return None
            return await self.bs_status(agent.uuid, "Connected")

        result: dict[str, Any] = await wait_for(connected, timeout)
        return result

    async def bs_status(self, bs_uuid: str, status: str) -> dict[str, Any] | None:
        reply = await self.client.call(
            "QueryBackupStorage",
            {"conditions": [{"name": "uuid", "op": "=", "value": bs_uuid}]},
            timeout=10,
        )
        inventories = reply.get("inventories") or []
        if inventories and inventories[0]["status"] == status:
            return dict(inventories[0])
        return None

    async def call(
        self, api: str, params: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        kw.setdefault("timeout", 60)
        return await self.client.call(api, params or {}, **kw)

    async def add_image(self, url: str, agents: list[Agent], **params: Any) -> dict[str, Any]:
        body = {
            "name": params.pop("name", "image"),
            "url": url,
            "format": params.pop("format", "raw"),
            "backupStorageUuids": [a.uuid for a in agents],
            **params,
        }
        return await self.call("AddImage", body)

    async def publish_event(self, routing_key: str, body: bytes | dict[str, Any]) -> None:
        """Publish on `NS.events` as the volume service would (a body given as bytes is sent
        as it is, to test malformed events)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.names.events)
            await exchange.publish(
                aio_pika.Message(
                    data,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=routing_key,
                timeout=10,
            )

    async def stop_processes(self) -> None:
        """Kill every agent and replica (printing their logs with TEST_SHOW_LOGS=1) and close
        the database connection: the teardown every deployment fixture shares."""
        for agent in self.agents:
            agent.proc.kill()
        for proc in self.services:
            proc.kill()
        if os.environ.get("TEST_SHOW_LOGS"):
            for proc in [*self.services, *(a.proc for a in self.agents)]:
                print(f"===== {proc.name}\n{proc.log()}")
        if self.db is not None:
            with contextlib.suppress(Exception):
                await self.db.close()

    async def image_row(self, image_uuid: str) -> asyncpg.Record | None:
        return await self.db.fetchrow("SELECT * FROM image WHERE uuid = $1", image_uuid)


# --- databases ---------------------------------------------------------------------------


def _template_name() -> str:
    """Named after the migrations it holds: a changed migration makes a new template."""
    digest = hashlib.sha256()
    for migration in available_migrations():
        digest.update(migration.sql.encode())
    return f"zimage_template_{digest.hexdigest()[:12]}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template_database() -> str:
    """A database migrated once per run (per set of migrations); every test's database is a
    copy of it (`CREATE DATABASE ... TEMPLATE`), which takes milliseconds instead of running
    the migrations again. Built under another name and renamed when complete, so a run that
    dies half way never leaves a half-migrated template behind."""
    name = _template_name()
    admin = await asyncpg.connect(f"{PG_URL}/postgres")
    try:
        if await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return name
        building = f"{name}_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{building}"')
        conn = await asyncpg.connect(f"{PG_URL}/{building}")
        try:
            await migrate(conn)
        finally:
            await conn.close()
        try:
            await admin.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
            await admin.execute(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE true')
        except asyncpg.exceptions.DuplicateDatabaseError:  # another run was quicker
            await admin.execute(f'DROP DATABASE "{building}"')
        return name
    finally:
        await admin.close()


async def clone_database(template: str, dbname: str) -> str:
    """A fresh database for one test, copied from the migrated template; returns its url."""
    admin = await asyncpg.connect(f"{PG_URL}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{dbname}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return f"{PG_URL}/{dbname}"


@dataclass
class PgStack:
    """The service's database and its read-only APIs, without broker or processes: for tests
    of the query language, which need only PostgreSQL. `call` runs an API through the same
    envelope parsing, validation, handler and reply shape as the service (JSON round trip
    included); only the transport is missing."""

    database_url: str
    db: asyncpg.Connection
    store: Store

    async def call(
        self, api: str, params: dict[str, Any] | None = None, **_: Any
    ) -> dict[str, Any]:
        envelope = parse_envelope(json.dumps({"api": api, "params": params or {}}).encode())
        if envelope.api in APIS and not APIS[envelope.api].read_only:
            raise AssertionError(f"{api} needs agents or the outbox: use the `stack` fixture")
        pipeline = Pipeline(
            Transactions(self.store, Names("unused")),
            None,  # type: ignore[arg-type]
            APIS,
            settle=_no_settling,
        )
        async with self.store.autocommit() as tx:
            ctx = Ctx(tx, None, f"local-{uuid.uuid4().hex}")  # type: ignore[arg-type]
            reply = await pipeline._run(ctx, envelope, isolated=False)
        return dict(json.loads(encode(reply)))


async def _no_settling(ctx: Ctx, message_id: str) -> None:
    raise AssertionError("a read-only API never waits for agents")


@pytest_asyncio.fixture(loop_scope="session")
async def pg(template_database: str) -> AsyncIterator[PgStack]:
    """A fresh migrated database and the read-only APIs on it (no broker)."""
    dbname = f"images_pg{uuid.uuid4().hex[:12]}"
    database_url = await clone_database(template_database, dbname)
    store = await Store.open(database_url, min_size=1, max_size=2)
    db = await asyncpg.connect(database_url)
    try:
        yield PgStack(database_url, db, store)
    finally:
        await db.close()
        await store.close()
        await _drop_database(dbname)


# --- the whole deployment ------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def stack(tmp_path: Path, template_database: str) -> AsyncIterator[Stack]:
    """A fresh deployment with one service replica running and no agents yet."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    dbname = f"images_{namespace}"
    database_url = await clone_database(template_database, dbname)
    http = FileServer(tmp_path / "www")
    http.directory.mkdir()
    await http.start()
    stack_: Stack | None = None
    client = ApiClient(AMQP_URL, Names(namespace))
    await client.connect()
    try:
        service_proc_stack = Stack(
            namespace,
            database_url,
            tmp_path,
            http,
            client,
            None,  # type: ignore[arg-type]
        )
        service_proc_stack.start_service()
        db = await asyncpg.connect(database_url)
        service_proc_stack.db = db
        # The service consumes the API queue last, after migrating and declaring its topology:
        # only then is a request sure to be served rather than dropped as unroutable.
        await wait_for(lambda: _api_consumed(namespace), timeout=30)
        stack_ = service_proc_stack
        yield stack_
    finally:
        if stack_ is not None:
            await stack_.stop_processes()
        await client.close()
        await http.stop()
        await _drop_namespace(namespace, [a.uuid for a in (stack_.agents if stack_ else [])])
        await _drop_database(dbname)


async def _try_connect(url: str) -> asyncpg.Connection | None:
    try:
        return await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError):
        return None


async def _schema_ready(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT to_regclass('public.user_tag') IS NOT NULL"))


async def _api_consumed(namespace: str) -> bool:
    try:
        connection = await aio_pika.connect(AMQP_URL)
    except Exception:
        return False
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(Names(namespace).api, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return bool(queue.declaration_result.consumer_count)


async def _drop_database(dbname: str) -> None:
    with contextlib.suppress(Exception):
        admin = await asyncpg.connect(f"{PG_URL}/postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        finally:
            await admin.close()


async def _drop_namespace(namespace: str, agent_uuids: list[str]) -> None:
    names = Names(namespace)
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            for queue in [
                names.api,
                names.results,
                names.heartbeats,
                names.dead_letters,
                names.volume_events,
                *(names.agent(u) for u in agent_uuids if u),
            ]:
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for exchange in (names.events, names.dead_letters):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)


@pytest.fixture
def events_recorder() -> Callable[[], EventRecorder]:
    return EventRecorder


class EventRecorder:
    """Collects events from `NS.events` (subscribe via `stack.client.subscribe`)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, key: str, body: dict[str, Any]) -> None:
        self.events.append((key, body))

    def keys(self) -> list[str]:
        return [k for k, _ in self.events]

    def of(self, prefix: str) -> list[dict[str, Any]]:
        return [b for k, b in self.events if k.startswith(prefix)]
