"""The pools, the transaction, and what a lost database looks like."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import asyncpg.pool
import orjson

from image_service.store.accounts import Accounts
from image_service.store.backup_storages import BackupStorages
from image_service.store.config import GlobalConfig
from image_service.store.group import Connection, Record
from image_service.store.images import Images
from image_service.store.inbox import Inbox
from image_service.store.migrations import migrate
from image_service.store.ops import Ops
from image_service.store.outbox import OutboxTable
from image_service.store.stats import Stats
from image_service.store.tags import Tags
from image_service.store.volumes import Volumes

log = logging.getLogger(__name__)

# Errors that mean "the database is unreachable now", as opposed to a bug in a statement.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
)


def _encode_json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # integers beyond 64 bits
        return json.dumps(value)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=_encode_json, decoder=orjson.loads, schema="pg_catalog"
        )


async def ensure_database(database_url: str) -> None:
    """Create the service's database when it does not exist yet (contract section 1)."""
    parts = urlsplit(database_url)
    dbname = parts.path.lstrip("/") or "images"
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    try:
        conn = await asyncpg.connect(database_url)
    except asyncpg.exceptions.InvalidCatalogNameError:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{dbname.replace(chr(34), "")}"')
        except asyncpg.exceptions.DuplicateDatabaseError:
            pass  # another replica created it first
        finally:
            await admin.close()
    else:
        await conn.close()


class Tx:
    """One transaction (or, from `Store.autocommit`, one connection without one)."""

    __slots__ = (
        "accounts",
        "backup_storages",
        "config",
        "conn",
        "images",
        "inbox",
        "ops",
        "outbox",
        "stats",
        "tags",
        "volumes",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.inbox = Inbox(conn)
        self.outbox = OutboxTable(conn)
        self.images = Images(conn)
        self.ops = Ops(conn)
        self.backup_storages = BackupStorages(conn)
        self.volumes = Volumes(conn)
        self.tags = Tags(conn)
        self.config = GlobalConfig(conn)
        self.accounts = Accounts(conn)
        self.stats = Stats(conn)

    async def fetch_sql(self, sql: str, args: Sequence[Any]) -> list[Record]:
        """Run SQL compiled by `image_service.query` (identifiers whitelisted, values bound)."""
        return list(await self.conn.fetch(sql, *args))

    async def fetchval_sql(self, sql: str, args: Sequence[Any]) -> Any:
        """The one value of SQL compiled by `image_service.query` (a count)."""
        return await self.conn.fetchval(sql, *args)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[Tx]:
        async with self.conn.transaction():
            yield self


# Seconds between checks that a LISTEN connection is still alive.
KEEPALIVE = 30.0
_LISTEN_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    TimeoutError,
)


async def _listen_on(
    conn: asyncpg.Connection, channels: list[str], on_notify: Callable[[str], None]
) -> None:
    """Serve one LISTEN connection until it is lost."""
    lost = asyncio.Event()
    conn.add_termination_listener(lambda _conn: lost.set())
    for channel in channels:
        await conn.add_listener(
            channel, lambda _conn, _pid, _channel, payload: on_notify(str(payload))
        )
    on_notify("")
    while not lost.is_set():
        # A connection can die without a word (its host gone): ask now and then.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KEEPALIVE):
                await lost.wait()
        if not lost.is_set():
            await conn.fetchval("SELECT 1", timeout=10)


class Store:
    def __init__(self, pool: asyncpg.Pool, read_pool: asyncpg.Pool, database_url: str) -> None:
        self.pool = pool
        self.read_pool = read_pool
        self.database_url = database_url

    @classmethod
    async def open(cls, database_url: str, *, min_size: int = 2, max_size: int = 10) -> Store:
        await ensure_database(database_url)
        pool = await asyncpg.create_pool(
            database_url, min_size=min_size, max_size=max_size, init=_init_connection
        )
        assert pool is not None
        read_pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=max_size,
            init=_init_connection,
            # Custom plans: a generic plan cannot see the value of `name LIKE $1` and may
            # walk the whole createDate index instead of using the trigram index.
            server_settings={"synchronous_commit": "off", "plan_cache_mode": "force_custom_plan"},
        )
        assert read_pool is not None
        return cls(pool, read_pool, database_url)

    async def close(self) -> None:
        await self.read_pool.close()
        await self.pool.close()

    async def listen(self, channels: list[str], on_notify: Callable[[str], None]) -> None:
        """LISTEN on `channels` for as long as the task runs, calling `on_notify` with the
        payload of every notification, and with "" after every (re)connection: notifications
        sent while the connection was down are lost, so a listener must then look again."""
        delay = 0.5
        while True:
            try:
                conn = await asyncpg.connect(self.database_url, timeout=10)
            except _LISTEN_ERRORS as exc:
                log.warning("LISTEN connection failed (%r); retrying in %g s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5
            try:
                await _listen_on(conn, channels, on_notify)
            except _LISTEN_ERRORS as exc:
                log.warning("LISTEN connection lost (%r); reconnecting", exc)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=5))

    async def migrate(self) -> list[int]:
        async with self.pool.acquire() as conn:
            return await migrate(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield Tx(conn)

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[Tx]:
        """No transaction: every statement commits on its own, and without waiting for the
        WAL flush. For the read-only APIs, whose one write (their reply, kept for duplicates)
        costs only a re-run of a read if a database crash forgets it."""
        async with self.read_pool.acquire() as conn:
            yield Tx(conn)
