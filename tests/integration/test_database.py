"""The database on its own (PostgreSQL only, no broker): the state machines against the
schema's ENUMs, versioned migrations, and the lock order on images."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from image_service.lifecycle import DB_ENUMS, MACHINES, ImageStatus
from image_service.store import LATEST_VERSION, SchemaTooNew
from image_service.store.migrations import available_migrations, current_version, migrate
from tests.conftest import PG_URL, PgStack, _drop_database, wait_for


@pytest_asyncio.fixture(loop_scope="session")
async def empty_db() -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A database with no schema at all."""
    dbname = f"images_empty{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{PG_URL}/postgres")
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    conn = await asyncpg.connect(f"{PG_URL}/{dbname}")
    try:
        yield f"{PG_URL}/{dbname}", conn
    finally:
        await conn.close()
        await _drop_database(dbname)


# --- the state machines and the schema -----------------------------------------------------


async def enum_labels(db: asyncpg.Connection, type_name: str) -> list[str]:
    rows = await db.fetch(
        "SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid"
        " WHERE t.typname = $1 ORDER BY e.enumsortorder",
        type_name,
    )
    return [row[0] for row in rows]


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
async def test_every_state_machine_matches_its_enum(pg: PgStack, machine) -> None:  # type: ignore[no-untyped-def]
    labels = await enum_labels(pg.db, machine.db_type)
    assert labels, f"no ENUM {machine.db_type}"
    assert set(labels) == {s.value for s in machine.states}


async def test_other_enums_match(pg: PgStack) -> None:
    for type_name, enum in DB_ENUMS.items():
        assert set(await enum_labels(pg.db, type_name)) == {e.value for e in enum}


async def test_every_status_column_uses_a_machine_type(pg: PgStack) -> None:
    """No state is kept in a column the machines do not describe."""
    columns = await pg.db.fetch(
        "SELECT table_name, column_name, udt_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND column_name IN ('status', 'state')"
    )
    known = {m.db_type for m in MACHINES}
    assert columns
    for row in columns:
        assert row["udt_name"] in known, dict(row)


async def test_the_guard_refuses_what_the_table_forbids(pg: PgStack) -> None:
    """The database enforces the same transitions: a Ready image does not become Ready again,
    a finished op does not finish twice."""
    image = uuid.uuid4().hex
    await pg.db.execute(
        "INSERT INTO image (uuid, name, status, url, media_type, platform, format, size, md5_sum)"
        " VALUES ($1, 'x', 'Ready', 'http://h/x', 'RootVolumeTemplate', 'Linux', 'raw', 1, $2)",
        image,
        "0" * 32,
    )
    async with pg.store.transaction() as tx:
        marked = await tx.images.mark_stored(
            status=ImageStatus.Ready,
            uuid=image,
            size=2,
            actual_size=2,
            virtual_size=2,
            md5_sum="1" * 32,
            sha256_sum=None,
        )
        assert not marked
    assert await pg.db.fetchval("SELECT size FROM image WHERE uuid = $1", image) == 1


async def insert_downloading_image(db: asyncpg.Connection, **columns: Any) -> str:
    image = uuid.uuid4().hex
    names = ", ".join(columns)
    values = ", ".join(f"${i}" for i in range(2, len(columns) + 2))
    await db.execute(
        "INSERT INTO image (uuid, name, status, url, media_type, platform, format"
        f"{', ' if columns else ''}{names}) VALUES ($1, 'x', 'Downloading', 'http://h/x',"
        f" 'RootVolumeTemplate', 'Linux', 'raw'{', ' if columns else ''}{values})",
        image,
        *columns.values(),
    )
    return image


SHA = "0123456789abcdef" * 4


async def test_mark_ready_records_the_sha256_and_the_inventory_shows_it(pg: PgStack) -> None:
    """Contract section 9: the statement that marks an image Ready sets `sha256_sum` with
    `md5_sum`; an agent that reports md5 only leaves it NULL, and the image is Ready all the
    same."""
    with_sha = await insert_downloading_image(pg.db)
    without = await insert_downloading_image(pg.db)
    async with pg.store.transaction() as tx:
        for image, sha in ((with_sha, SHA), (without, None)):
            assert await tx.images.mark_stored(
                status=ImageStatus.Ready,
                uuid=image,
                size=1,
                actual_size=1,
                virtual_size=1,
                md5_sum="1" * 32,
                sha256_sum=sha,
            )
    async with pg.store.transaction() as tx:
        rows = {row["uuid"]: row for row in await tx.images.inventory_rows([with_sha, without])}
    assert (rows[with_sha]["sha256_sum"], rows[without]["sha256_sum"]) == (SHA, None)
    assert rows[without]["md5_sum"] == "1" * 32
    statuses = await pg.db.fetch("SELECT DISTINCT status::text FROM image")
    assert [r[0] for r in statuses] == ["Ready"]
    found = await pg.call(
        "QueryImage", {"conditions": [{"name": "sha256Sum", "op": "=", "value": SHA}]}
    )
    assert [inv["uuid"] for inv in found["inventories"]] == [with_sha]
    assert found["inventories"][0]["sha256Sum"] == SHA
    unknown = await pg.call("QueryImage", {"conditions": [{"name": "sha256Sum", "op": "is null"}]})
    assert [inv["sha256Sum"] for inv in unknown["inventories"]] == [None]


async def test_a_ready_image_keeps_its_sha256(pg: PgStack) -> None:
    """The guard that keeps a Ready image from turning Ready again keeps its sha256 too."""
    image = await insert_downloading_image(pg.db)
    async with pg.store.transaction() as tx:
        assert await tx.images.mark_stored(
            status=ImageStatus.Ready,
            uuid=image,
            size=1,
            actual_size=1,
            virtual_size=1,
            md5_sum="1" * 32,
            sha256_sum=SHA,
        )
        assert not await tx.images.mark_stored(
            status=ImageStatus.Ready,
            uuid=image,
            size=2,
            actual_size=2,
            virtual_size=2,
            md5_sum="2" * 32,
            sha256_sum="f" * 64,
        )
    assert await pg.db.fetchval("SELECT sha256_sum FROM image WHERE uuid = $1", image) == SHA


@pytest.mark.parametrize("column", ["sha256_sum", "expected_sha256"])
@pytest.mark.parametrize(
    "bad",
    [SHA.upper(), SHA[:-1], SHA + "0", "g" + SHA[1:], SHA + "\n", "", "1" * 32],
    ids=["uppercase", "63", "65", "non-hex", "newline", "empty", "md5"],
)
async def test_the_sha256_columns_hold_64_lowercase_hex_or_null(
    pg: PgStack, column: str, bad: str
) -> None:
    constraint = {
        "sha256_sum": "image_sha256_sum_hex",
        "expected_sha256": "image_expected_sha256_hex",
    }[column]
    with pytest.raises(asyncpg.CheckViolationError) as excinfo:
        await insert_downloading_image(pg.db, **{column: bad})
    assert excinfo.value.constraint_name == constraint
    await insert_downloading_image(pg.db, **{column: SHA})
    await insert_downloading_image(pg.db, **{column: None})


# --- migrations ---------------------------------------------------------------------------


FIRST_RELEASE_ROWS = """
INSERT INTO backup_storage (uuid, name, url, hostname, status, total_capacity,
                            available_capacity, last_heartbeat)
VALUES ('b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1', 'bs1', '/srv/bs1', 'h1', 'Connected', 100, 50, now());
INSERT INTO deleted_backup_storage (uuid) VALUES ('dddddddddddddddddddddddddddddddd');
INSERT INTO image (uuid, name, description, status, url, media_type, platform, format, size,
                   actual_size, virtual_size, md5_sum)
VALUES ('a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1', 'CentOS7', 'golden', 'Ready', 'http://h/c.qcow2',
        'RootVolumeTemplate', 'Linux', 'qcow2', 10, 8, 64, '0123456789abcdef0123456789abcdef'),
       ('a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2', 'ubuntu', NULL, 'Downloading', 'http://h/u.raw',
        'RootVolumeTemplate', 'Linux', 'raw', NULL, NULL, NULL, NULL);
INSERT INTO image_backup_storage_ref (image_uuid, backup_storage_uuid, install_path, status)
VALUES ('a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1', 'b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1',
        '/srv/bs1/templates/a1/CentOS7.template', 'Ready'),
       ('a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2', 'b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1',
        '/srv/bs1/templates/a2/ubuntu.template', 'Downloading');
INSERT INTO op (op_id, kind, message_id, image_uuid, backup_storage_uuid, command)
VALUES ('11111111-1111-1111-1111-111111111111', 'download', 'm1',
        'a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2', 'b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1',
        '{"command": "download", "opId": "11111111-1111-1111-1111-111111111111"}');
INSERT INTO op (op_id, kind, status, image_uuid, backup_storage_uuid, command, finished_at)
VALUES ('22222222-2222-2222-2222-222222222222', 'delete', 'Succeeded',
        'a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1', 'b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1', '{}', now());
INSERT INTO inbox (message_id, api, reply_to, correlation_id, image_uuid)
VALUES ('m1', 'AddImage', 'amq.gen-x', 'c1', 'a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2a2');
INSERT INTO inbox (message_id, api, reply, finished_at)
VALUES ('m0', 'QueryImage', '{"success": true, "api": "QueryImage", "inventories": []}', now());
INSERT INTO inbox_waiter (message_id, reply_to, correlation_id) VALUES ('m1', 'amq.gen-y', 'c2');
INSERT INTO outbox (exchange, routing_key, body, persistent)
VALUES ('image.events', 'image.status.a2', '{"uuid": "a2"}', false);
INSERT INTO user_tag (uuid, resource_uuid, tag)
VALUES ('c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1', 'a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1', 'golden-image');
INSERT INTO volume (uuid, name, type, root_image_uuid, install_path, format, size)
VALUES ('e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1', 'root', 'Root', 'a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1',
        'file:///v/root.qcow2', 'qcow2', 64);
INSERT INTO volume_snapshot (uuid, volume_uuid, install_path, format, size)
VALUES ('f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1f1', 'e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1',
        'file:///v/snap.qcow2', 'qcow2', 64);
"""


async def dump(db: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, as a JSON object, in a stable order."""
    tables = [
        row[0]
        for row in await db.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_version' ORDER BY tablename"
        )
    ]
    return {
        table: [
            json.loads(r[0])
            for r in await db.fetch(f"SELECT to_jsonb(t)::text FROM {table} t ORDER BY t::text")
        ]
        for table in tables
    }


def without_new_columns(
    after: dict[str, list[dict[str, Any]]], before: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """`after` without the columns that migrations added, each of which must be NULL."""
    kept: dict[str, list[dict[str, Any]]] = {}
    for table, rows in after.items():
        old = set(before[table][0]) if before.get(table) else None
        kept[table] = []
        for row in rows:
            new = {k: v for k, v in row.items() if old is not None and k not in old}
            assert all(v is None for v in new.values()), f"{table}: {new} filled in"
            kept[table].append({k: v for k, v in row.items() if k not in new})
    return kept


async def test_a_first_release_database_is_migrated_without_losing_a_row(
    empty_db: tuple[str, asyncpg.Connection],
) -> None:
    _, db = empty_db
    # What the first release did at every start: run its unversioned schema.sql (migration 1).
    await db.execute(available_migrations()[0].sql)
    await db.execute(FIRST_RELEASE_ROWS)
    before = await dump(db)
    assert sum(len(rows) for rows in before.values()) == 15

    applied = await migrate(db)

    assert applied == list(range(2, LATEST_VERSION + 1)), "version 1 is adopted, not re-run"
    assert await current_version(db) == LATEST_VERSION
    after = await dump(db)
    # Tables that migrations created hold only what they insert themselves.
    assert set(after) - set(before) == {"global_config", "account", "session", "login_failure"}
    assert {r["id"] for r in after.pop("global_config")} == {
        "image.deletionPolicy",
        "image.expungePeriod",
    }
    # The portal's admin account is made by the service at start, not by a migration.
    assert after.pop("account") == [] and after.pop("session") == []
    assert after.pop("login_failure") == []
    assert without_new_columns(after, before) == before
    indexes = {
        r[0] for r in await db.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'op'")
    }
    assert "op_status_sent_idx" in indexes and "op_pending_idx" not in indexes
    assert await migrate(db) == [], "a second run finds nothing to do"
    images = {r["uuid"]: r for r in await db.fetch("SELECT * FROM image")}
    assert all(r["sha256_sum"] is None and r["expected_sha256"] is None for r in images.values())


async def test_migration_4_can_run_again(pg: PgStack) -> None:
    """Its statements are idempotent, as those of the migrations before it: running the file on
    a database that has it changes nothing (its constraints are not added twice)."""

    async def constraints() -> list[str]:
        rows = await pg.db.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'image'::regclass ORDER BY 1"
        )
        return [r[0] for r in rows]

    before = await constraints()
    assert {"image_sha256_sum_hex", "image_expected_sha256_hex"} <= set(before)
    await pg.db.execute(available_migrations()[3].sql)
    assert await constraints() == before


async def test_adopting_a_first_release_database_completes_it(
    empty_db: tuple[str, asyncpg.Connection],
) -> None:
    """An early build of the first release lacked tables and indexes its every start would
    have added: adopting its database as version 1 adds them too."""
    _, db = empty_db
    await db.execute(available_migrations()[0].sql)
    await db.execute("DROP TABLE volume_snapshot; DROP INDEX image_status_idx")
    await migrate(db)
    assert await db.fetchval("SELECT to_regclass('volume_snapshot') IS NOT NULL")
    assert await db.fetchval("SELECT to_regclass('image_status_idx') IS NOT NULL")


async def test_a_schema_of_its_own_is_migrated_once(
    empty_db: tuple[str, asyncpg.Connection],
) -> None:
    """A role whose tables live in a schema of its own (first on its search_path): the
    second start finds the version there, as the first left it."""
    _, db = empty_db
    await db.execute("CREATE SCHEMA images_app; SET search_path TO images_app")
    assert await migrate(db) == list(range(1, LATEST_VERSION + 1))
    assert await migrate(db) == []
    assert await db.fetchval("SELECT to_regclass('images_app.schema_version') IS NOT NULL")
    assert not await db.fetchval("SELECT to_regclass('public.image') IS NOT NULL")


async def test_replicas_that_start_together_migrate_once(
    empty_db: tuple[str, asyncpg.Connection],
) -> None:
    url, db = empty_db
    conns = [await asyncpg.connect(url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in conns))
    finally:
        for conn in conns:
            await conn.close()
    assert sorted(results, key=len) == [[], [], [], list(range(1, LATEST_VERSION + 1))]
    versions = [r[0] for r in await db.fetch("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == list(range(1, LATEST_VERSION + 1))


async def test_a_database_newer_than_the_code_is_refused(pg: PgStack) -> None:
    await pg.db.execute(
        "INSERT INTO schema_version (version, name, checksum) VALUES ($1, 'future', 'x')",
        LATEST_VERSION + 1,
    )
    before = await dump(pg.db)
    with pytest.raises(SchemaTooNew, match=f"version {LATEST_VERSION + 1}, newer"):
        await migrate(pg.db)
    for command in ("migrate", "run"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "image_service.main",
                command,
                "--database-url",
                pg.database_url,
                "--amqp-url",
                "amqp://guest:guest@127.0.0.1:1/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("image-service: the database schema is at version"), done.stderr
        assert "Traceback" not in done.stderr
    assert await dump(pg.db) == before


async def test_migrate_creates_a_missing_database() -> None:
    dbname = f"images_new{uuid.uuid4().hex[:12]}"
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "image_service.main",
                "migrate",
                "--database-url",
                f"{PG_URL}/{dbname}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        db = await asyncpg.connect(f"{PG_URL}/{dbname}")
        try:
            assert await current_version(db) == LATEST_VERSION
        finally:
            await db.close()
    finally:
        await _drop_database(dbname)


async def test_database_url_tls_parameters_reach_the_driver() -> None:
    """Contract section 8: a database url keeps its `sslmode` (and certificate parameters). This
    machine's PostgreSQL has TLS off, so `sslmode=require` must fail, including on the path
    that creates a missing database, while `sslmode=disable` works: the parameter was used."""
    dbname = f"images_ssl{uuid.uuid4().hex[:12]}"

    def migrate_with(query: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "image_service.main", "migrate",
             "--database-url", f"{PG_URL}/{dbname}?{query}"],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip

    try:
        refused = migrate_with("sslmode=require")
        assert refused.returncode != 0
        assert "SSL" in refused.stderr or "ssl" in refused.stderr, refused.stderr[-2000:]
        admin = await asyncpg.connect(f"{PG_URL}/postgres")
        try:
            missing = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname)
        finally:
            await admin.close()
        assert missing is None, "nothing was created without the TLS the url asked for"
        done = migrate_with("sslmode=disable")
        assert done.returncode == 0, done.stderr
    finally:
        await _drop_database(dbname)


# --- lock order -----------------------------------------------------------------------------


async def test_images_are_locked_in_uuid_order_whatever_the_order_asked(pg: PgStack) -> None:
    """`lock_many` takes its row locks in uuid order, not in the order asked nor in the order
    the rows lie on disk: while another transaction holds the image with the greatest uuid
    (written first, so a scan in disk order would reach it first), a `lock_many` of all the
    images waits for that one only after it has locked every other."""
    uuids = sorted(uuid.uuid4().hex for _ in range(50))
    last = uuids[-1]
    for u in [last, *uuids[:-1]]:
        await pg.db.execute(
            "INSERT INTO image (uuid, name, status, url, media_type, platform, format)"
            " VALUES ($1, 'x', 'Downloading', 'http://h/x', 'RootVolumeTemplate', 'Linux', 'raw')",
            u,
        )
    holder = await asyncpg.connect(pg.database_url)
    held = holder.transaction()
    await held.start()
    await holder.execute("SELECT 1 FROM image WHERE uuid = $1 FOR UPDATE", last)

    async def lock_all() -> int:
        async with pg.store.transaction() as tx:
            return len(await tx.images.lock_many(uuids[::-1]))

    locking = asyncio.create_task(lock_all())
    try:

        async def waiting_for_a_row_lock() -> bool:
            return bool(
                await pg.db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
            )

        await wait_for(waiting_for_a_row_lock, timeout=10)
        unlocked = await pg.db.fetch("SELECT uuid FROM image FOR UPDATE SKIP LOCKED")
        assert unlocked == [], f"{len(unlocked)} rows not locked yet: not in uuid order"
    finally:
        await held.rollback()
        await holder.close()
    assert await asyncio.wait_for(locking, timeout=10) == 50
