"""Versioned migrations: numbered SQL files and a `schema_version` table.

`migrate` applies the pending files in one transaction under a transaction-level advisory lock,
so replicas that start together wait for each other and then find nothing left to do. A database
newer than the code is refused: running old code on a schema it does not know could write rows
the newer code misreads.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg
import asyncpg.pool

log = logging.getLogger(__name__)

SCHEMA_LOCK_KEY = 0x1A6E_5E41
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SchemaTooNew(Exception):
    """The database was migrated by a newer release than this one."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """The migrations shipped with this code, numbered 1, 2, ... without gaps."""
    directory = resources.files("image_service").joinpath("sql", "migrations")
    found: list[Migration] = []
    for entry in directory.iterdir():
        match = _FILE.match(entry.name)
        if match is not None:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise RuntimeError(f"migration {expected:04d} is missing (found {migration.version})")
    return found


LATEST_VERSION = len(available_migrations())

_CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def current_version(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> int:
    # Unqualified, as the migrations' own DDL: found wherever search_path puts the tables.
    if not await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL"):
        return 0
    version: int | None = await conn.fetchval("SELECT max(version) FROM schema_version")
    return version or 0


async def migrate(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> list[int]:
    """Bring the schema up to `LATEST_VERSION`; returns the versions applied."""
    migrations = available_migrations()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
        await conn.execute(_CREATE_VERSION_TABLE)
        current = await current_version(conn)
        if current == 0 and await conn.fetchval("SELECT to_regclass('image') IS NOT NULL"):
            # Made by the first release's unversioned schema.sql, which is migration 1. Its
            # statements are idempotent: running it again completes a database made by an
            # earlier build of that release (a table, an index or lz4 missing), as every start
            # of that release did.
            log.info("adopting an unversioned schema as version 1")
            await conn.execute(migrations[0].sql)
            await _record(conn, migrations[0])
            current = 1
        if current > LATEST_VERSION:
            raise SchemaTooNew(
                f"the database schema is at version {current}, newer than this image-service "
                f"knows ({LATEST_VERSION}): run the release that migrated it, or a newer one"
            )
        applied: list[int] = []
        for migration in migrations[current:]:
            log.info("applying migration %04d_%s", migration.version, migration.name)
            await conn.execute(migration.sql)
            await _record(conn, migration)
            applied.append(migration.version)
        return applied


async def _record(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, migration: Migration
) -> None:
    await conn.execute(
        "INSERT INTO schema_version (version, name, checksum) VALUES ($1, $2, $3)",
        migration.version,
        migration.name,
        migration.checksum,
    )
