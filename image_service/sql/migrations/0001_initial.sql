-- Migration 1: the schema of the first release, as its unversioned schema.sql created it.
-- A database made by that release has no schema_version table; `image-service migrate` records
-- it as version 1 without running this file again (image_service/store/migrations.py).

DO $$ BEGIN
    CREATE TYPE image_state AS ENUM ('Enabled', 'Disabled');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE image_status AS ENUM ('Creating', 'Downloading', 'Ready');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE bs_state AS ENUM ('Enabled', 'Disabled');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE bs_status AS ENUM ('Connecting', 'Connected', 'Disconnected');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE op_kind AS ENUM ('download', 'create', 'delete');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE op_status AS ENUM ('Pending', 'Succeeded', 'Failed');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

CREATE TABLE IF NOT EXISTS backup_storage (
    uuid               char(32) PRIMARY KEY CHECK (uuid ~ '^[0-9a-f]{32}$'),
    name               text NOT NULL,
    description        text,
    url                text NOT NULL,
    hostname           text NOT NULL,
    type               text NOT NULL DEFAULT 'LocalDirectory',
    state              bs_state NOT NULL DEFAULT 'Enabled',
    status             bs_status NOT NULL DEFAULT 'Connecting',
    total_capacity     bigint NOT NULL DEFAULT 0 CHECK (total_capacity >= 0),
    available_capacity bigint NOT NULL DEFAULT 0 CHECK (available_capacity >= 0),
    heartbeat_interval double precision NOT NULL DEFAULT 10 CHECK (heartbeat_interval > 0),
    last_heartbeat     timestamptz,
    create_date        timestamptz NOT NULL DEFAULT now(),
    last_op_date       timestamptz NOT NULL DEFAULT now()
);

-- A deleted backup storage stays deleted even though its agent keeps sending heartbeats.
CREATE TABLE IF NOT EXISTS deleted_backup_storage (
    uuid       char(32) PRIMARY KEY,
    deleted_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS image (
    uuid          char(32) PRIMARY KEY CHECK (uuid ~ '^[0-9a-f]{32}$'),
    name          text NOT NULL,
    description   text,
    state         image_state NOT NULL DEFAULT 'Enabled',
    status        image_status NOT NULL,
    size          bigint CHECK (size >= 0),
    actual_size   bigint CHECK (actual_size >= 0),
    virtual_size  bigint CHECK (virtual_size >= 0),
    url           text NOT NULL,
    media_type    text NOT NULL CHECK (media_type IN ('RootVolumeTemplate', 'DataVolumeTemplate', 'ISO')),
    guest_os_type text,
    platform      text NOT NULL CHECK (platform IN ('Linux', 'Windows', 'Paravirtualization', 'Other')),
    system        boolean NOT NULL DEFAULT false,
    format        text NOT NULL CHECK (format IN ('qcow2', 'raw', 'iso')),
    md5_sum       text,
    expected_md5  text,
    type          text NOT NULL DEFAULT 'zstack',
    create_date   timestamptz NOT NULL DEFAULT now(),
    last_op_date  timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'Ready' OR (size IS NOT NULL AND md5_sum IS NOT NULL)),
    CHECK (NOT (media_type = 'ISO' AND system))
);
CREATE INDEX IF NOT EXISTS image_create_date_idx ON image (create_date, uuid);
-- Substring searches on names (`name~=%cent%`, the commonest query of a console) use a trigram
-- index where the pg_trgm extension can be created (a trusted extension, contrib); elsewhere
-- they scan, and the service works the same.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX IF NOT EXISTS image_name_trgm_idx ON image USING gin (name gin_trgm_ops);
    -- Finer statistics of names: the planner estimates a `LIKE '%x%'` from the histogram, and
    -- with the default one it may prefer walking createDate order to the trigram index.
    ALTER TABLE image ALTER COLUMN name SET STATISTICS 1000;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pg_trgm unavailable (%): substring searches on image names will scan', SQLERRM;
END
$$;
CREATE INDEX IF NOT EXISTS image_status_idx ON image (status);

-- One row per (image, backup storage) that holds or is receiving the image. A failed or
-- deleted reference is removed in the same statement that records its operation's outcome.
CREATE TABLE IF NOT EXISTS image_backup_storage_ref (
    image_uuid          char(32) NOT NULL REFERENCES image (uuid) ON DELETE CASCADE,
    backup_storage_uuid char(32) NOT NULL REFERENCES backup_storage (uuid) ON DELETE CASCADE,
    install_path        text NOT NULL,
    status              image_status NOT NULL,
    create_date         timestamptz NOT NULL DEFAULT now(),
    last_op_date        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_uuid, backup_storage_uuid)
);
CREATE INDEX IF NOT EXISTS ref_bs_idx ON image_backup_storage_ref (backup_storage_uuid);

-- Work sent to an agent. A row is the lease on that work: the reconciler re-sends the command of
-- a Pending op until the agent's result (keyed by op_id) arrives; agents are idempotent per op_id.
CREATE TABLE IF NOT EXISTS op (
    op_id               uuid PRIMARY KEY,
    kind                op_kind NOT NULL,
    status              op_status NOT NULL DEFAULT 'Pending',
    message_id          text,
    image_uuid          char(32) NOT NULL,
    backup_storage_uuid char(32) NOT NULL,
    command             jsonb NOT NULL,
    result              jsonb,
    error_code          text,
    error_details       text,
    attempts            integer NOT NULL DEFAULT 1,
    last_sent_at        timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);
CREATE INDEX IF NOT EXISTS op_pending_idx ON op (last_sent_at) WHERE status = 'Pending';
CREATE INDEX IF NOT EXISTS op_message_idx ON op (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS op_image_idx ON op (image_uuid);

-- Inbox: a message id is executed at most once. `reply` is set when the operation has finished.
CREATE TABLE IF NOT EXISTS inbox (
    message_id     text PRIMARY KEY,
    api            text NOT NULL,
    reply_to       text,
    correlation_id text,
    image_uuid     char(32),
    reply          json,
    received_at    timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE INDEX IF NOT EXISTS inbox_finished_idx ON inbox (finished_at);

-- Further callers of a still-running message (a re-sent duplicate with its own reply_to).
CREATE TABLE IF NOT EXISTS inbox_waiter (
    message_id     text NOT NULL REFERENCES inbox (message_id) ON DELETE CASCADE,
    reply_to       text NOT NULL,
    correlation_id text,
    PRIMARY KEY (message_id, reply_to)
);

-- Outbox: everything that must be published once the transaction that decided it commits.
CREATE TABLE IF NOT EXISTS outbox (
    id             bigserial PRIMARY KEY,
    exchange       text NOT NULL DEFAULT '',
    routing_key    text NOT NULL,
    body           json NOT NULL,
    correlation_id text,
    message_id     text,
    persistent     boolean NOT NULL DEFAULT true,
    rejections     integer NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS user_tag (
    uuid          char(32) PRIMARY KEY,
    resource_type text NOT NULL DEFAULT 'ImageVO' CHECK (resource_type = 'ImageVO'),
    resource_uuid char(32) NOT NULL REFERENCES image (uuid) ON DELETE CASCADE,
    tag           text NOT NULL,
    type          text NOT NULL DEFAULT 'User',
    create_date   timestamptz NOT NULL DEFAULT now(),
    last_op_date  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS user_tag_resource_idx ON user_tag (resource_uuid);

-- The read model of volumes and snapshots, kept from the volume service's events (§7).
-- A deleted row stays as a tombstone so that a late or replayed `created` cannot revive it.
CREATE TABLE IF NOT EXISTS volume (
    uuid                 char(32) PRIMARY KEY,
    name                 text,
    type                 text CHECK (type IN ('Root', 'Data')),
    vm_instance_uuid     char(32),
    root_image_uuid      char(32),
    primary_storage_uuid char(32),
    install_path         text,
    format               text,
    size                 bigint,
    deleted              boolean NOT NULL DEFAULT false,
    create_date          timestamptz NOT NULL DEFAULT now(),
    last_op_date         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS volume_root_image_idx ON volume (root_image_uuid) WHERE NOT deleted;
CREATE INDEX IF NOT EXISTS volume_vm_idx ON volume (vm_instance_uuid) WHERE NOT deleted;

CREATE TABLE IF NOT EXISTS volume_snapshot (
    uuid         char(32) PRIMARY KEY,
    volume_uuid  char(32),
    install_path text,
    format       text,
    size         bigint,
    deleted      boolean NOT NULL DEFAULT false,
    create_date  timestamptz NOT NULL DEFAULT now(),
    last_op_date timestamptz NOT NULL DEFAULT now()
);

-- Stored replies and outbox bodies can be large (a query's page of inventories): lz4 compresses
-- them about five times faster than the default pglz. Only when not set yet (the ALTER locks
-- the table; a replica restarting must not stall the others), and through EXECUTE, so that a
-- server without lz4 or older than PostgreSQL 14 only keeps pglz.
DO $$
DECLARE
    target record;
BEGIN
    IF current_setting('server_version_num')::int < 140000 THEN
        RETURN;
    END IF;
    FOR target IN
        SELECT c.relname, a.attname
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        WHERE c.relnamespace = 'public'::regnamespace
          AND (c.relname, a.attname) IN (('inbox', 'reply'), ('outbox', 'body'))
          AND a.attcompression IS DISTINCT FROM 'l'
    LOOP
        PERFORM set_config('lock_timeout', '5s', true);
        EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET COMPRESSION lz4',
                       target.relname, target.attname);
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'lz4 compression not set (%): replies are compressed with pglz', SQLERRM;
END
$$;
