-- Named queries, loaded by image_service.store. Each block starts with `-- name: NAME`.
-- State changes are single guarded statements: zero rows returned means a stale or
-- duplicate transition that the caller logs and ignores.

-- name: inbox_claim
INSERT INTO inbox (message_id, api, reply_to, correlation_id)
VALUES ($1, $2, $3, $4)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id;

-- name: inbox_record
-- A read-only API's message id and its reply, in one statement; no row back means that the id
-- was seen before (its first reply is the answer).
-- $5 is the reply already encoded (text), the very bytes that are published.
INSERT INTO inbox (message_id, api, reply_to, correlation_id, reply, finished_at)
VALUES ($1, $2, $3, $4, $5::text::json, now())
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id;

-- name: inbox_get
SELECT message_id, api, reply_to, correlation_id, image_uuid, reply
FROM inbox WHERE message_id = $1;

-- name: inbox_lock
SELECT message_id, api, reply_to, correlation_id, image_uuid, reply
FROM inbox WHERE message_id = $1 FOR UPDATE;

-- name: inbox_set_image
UPDATE inbox SET image_uuid = $2 WHERE message_id = $1;

-- name: inbox_add_waiter
INSERT INTO inbox_waiter (message_id, reply_to, correlation_id)
VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING;

-- name: inbox_finish
UPDATE inbox SET reply = $2, finished_at = now()
WHERE message_id = $1 AND reply IS NULL
RETURNING reply_to, correlation_id;

-- name: inbox_waiters
SELECT reply_to, correlation_id FROM inbox_waiter WHERE message_id = $1;

-- name: inbox_prune
DELETE FROM inbox WHERE finished_at < now() - make_interval(secs => $1);

-- name: outbox_put
INSERT INTO outbox (exchange, routing_key, body, correlation_id, message_id, persistent)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: outbox_take
SELECT id, exchange, routing_key, body, correlation_id, message_id, persistent
FROM outbox ORDER BY id
FOR UPDATE SKIP LOCKED
LIMIT $1;

-- name: outbox_rejected
-- The broker refused this row; the relay gives up on it at the second refusal.
UPDATE outbox SET rejections = rejections + 1 WHERE id = $1
RETURNING rejections, routing_key;

-- name: outbox_delete
DELETE FROM outbox WHERE id = ANY($1::bigint[]);

-- name: bs_status_for_update
-- Read (and lock) the status before a heartbeat's upsert, so the caller publishes a status
-- event only on a real change. A CTE cannot do this: the upsert runs first and a locking read
-- of a row the same statement modified sees nothing.
SELECT status::text AS status FROM backup_storage WHERE uuid = $1 FOR UPDATE;

-- name: bs_heartbeat
-- Registers an agent on its first heartbeat and marks it Connected on every one. `inserted`
-- tells a registration from an update (xmax is 0 only on a row this statement inserted): two
-- first heartbeats handled at once both read no previous status, and only one inserts.
INSERT INTO backup_storage AS bs (uuid, name, url, hostname, total_capacity,
                                  available_capacity, heartbeat_interval, status,
                                  last_heartbeat)
SELECT $1, $2, $3, $4, $5, $6, $7, 'Connected', now()
WHERE NOT EXISTS (SELECT 1 FROM deleted_backup_storage d WHERE d.uuid = $1)
ON CONFLICT (uuid) DO UPDATE SET
    name = EXCLUDED.name,
    url = EXCLUDED.url,
    hostname = EXCLUDED.hostname,
    total_capacity = EXCLUDED.total_capacity,
    available_capacity = EXCLUDED.available_capacity,
    heartbeat_interval = EXCLUDED.heartbeat_interval,
    status = 'Connected',
    last_heartbeat = now(),
    last_op_date = CASE WHEN bs.status <> 'Connected' THEN now() ELSE bs.last_op_date END
RETURNING uuid, (xmax = 0) AS inserted;

-- name: bs_mark_disconnected
-- $1 missed heartbeats, $2 seconds since this replica could last rely on having consumed the
-- heartbeats: since it started, or since its database came back. That moment counts as a
-- heartbeat: the heartbeats (and results) sent while it could not consume them are still in
-- their queues, so silence before it says nothing about the agent.
UPDATE backup_storage
SET status = 'Disconnected', last_op_date = now()
WHERE status IN ('Connected', 'Connecting')
  AND last_heartbeat IS NOT NULL
  AND greatest(last_heartbeat, now() - make_interval(secs => $2))
      < now() - make_interval(secs => heartbeat_interval * $1)
RETURNING uuid;

-- name: bs_get_many
SELECT * FROM backup_storage WHERE uuid = ANY($1::bpchar[]);

-- name: bs_all
SELECT * FROM backup_storage ORDER BY uuid;

-- name: bs_lock
SELECT * FROM backup_storage WHERE uuid = $1 FOR UPDATE;

-- name: bs_change_state
UPDATE backup_storage SET state = $2, last_op_date = now()
WHERE uuid = $1 AND state <> $2
RETURNING uuid;

-- name: bs_delete
DELETE FROM backup_storage WHERE uuid = $1 RETURNING uuid;

-- name: bs_tombstone
INSERT INTO deleted_backup_storage (uuid) VALUES ($1) ON CONFLICT DO NOTHING;

-- name: bs_inventories
SELECT * FROM backup_storage WHERE uuid = ANY($1::bpchar[]);

-- name: image_insert
INSERT INTO image (uuid, name, description, status, url, media_type, guest_os_type, platform,
                   system, format, expected_md5, type)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (uuid) DO NOTHING
RETURNING uuid;

-- name: image_lock
SELECT * FROM image WHERE uuid = $1 FOR UPDATE;

-- name: image_mark_ready
UPDATE image
SET status = 'Ready', size = $2, actual_size = $3, virtual_size = $4, md5_sum = $5,
    last_op_date = now()
WHERE uuid = $1 AND status = ANY($6::image_status[])
RETURNING uuid;

-- name: image_change_state
UPDATE image SET state = $2, last_op_date = now()
WHERE uuid = $1 AND state <> $2
RETURNING uuid;

-- name: image_update
-- $2.. are NULL for "leave unchanged"; the CHECKs of the table enforce ISO rules.
UPDATE image SET
    name = COALESCE($2, name),
    description = COALESCE($3, description),
    guest_os_type = COALESCE($4, guest_os_type),
    platform = COALESCE($5, platform),
    media_type = COALESCE($6, media_type),
    system = COALESCE($7, system),
    last_op_date = now()
WHERE uuid = $1
RETURNING uuid;

-- name: image_delete
DELETE FROM image WHERE uuid = $1 RETURNING uuid;

-- name: image_inventories
-- Dates are formatted here, as for the references: formatting hundreds of them in Python showed
-- in the profile of queries returning many inventories.
SELECT i.*,
       to_char(i.create_date AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_iso,
       to_char(i.last_op_date AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS last_op_iso,
       COALESCE((
           SELECT json_agg(json_build_object(
                      'imageUuid', r.image_uuid,
                      'backupStorageUuid', r.backup_storage_uuid,
                      'installPath', r.install_path,
                      'status', r.status,
                      'createDate', to_char(r.create_date AT TIME ZONE 'UTC',
                                            'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                      'lastOpDate', to_char(r.last_op_date AT TIME ZONE 'UTC',
                                            'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
                  ORDER BY r.create_date, r.backup_storage_uuid)
           FROM image_backup_storage_ref r WHERE r.image_uuid = i.uuid
       ), '[]'::json) AS refs
FROM image i WHERE i.uuid = ANY($1::bpchar[]);

-- name: ref_insert
INSERT INTO image_backup_storage_ref (image_uuid, backup_storage_uuid, install_path, status)
VALUES ($1, $2, $3, $4);

-- name: ref_mark_ready
UPDATE image_backup_storage_ref
SET status = 'Ready', install_path = $3, last_op_date = now()
WHERE image_uuid = $1 AND backup_storage_uuid = $2 AND status = ANY($4::image_status[])
RETURNING image_uuid;

-- name: ref_delete
DELETE FROM image_backup_storage_ref
WHERE image_uuid = $1 AND backup_storage_uuid = $2
RETURNING install_path, status::text;

-- name: refs_of_image
SELECT r.backup_storage_uuid, r.install_path, r.status::text AS status,
       bs.status::text AS bs_status, bs.hostname
FROM image_backup_storage_ref r JOIN backup_storage bs ON bs.uuid = r.backup_storage_uuid
WHERE r.image_uuid = $1
ORDER BY r.create_date, r.backup_storage_uuid;

-- name: refs_of_bs
SELECT image_uuid, install_path, status::text AS status
FROM image_backup_storage_ref WHERE backup_storage_uuid = $1;

-- name: op_insert
INSERT INTO op (op_id, kind, message_id, image_uuid, backup_storage_uuid, command)
VALUES ($1, $2, $3, $4, $5, $6);

-- name: op_finish
UPDATE op
SET status = $2, result = $3, error_code = $4, error_details = $5, finished_at = now()
WHERE op_id = $1 AND status = 'Pending'
RETURNING op_id, kind::text, message_id, image_uuid, backup_storage_uuid, command;

-- name: op_get
SELECT op_id, kind::text, status::text, message_id, image_uuid, backup_storage_uuid, command
FROM op WHERE op_id = $1;

-- name: ops_pending_of_image
SELECT op_id, kind::text, message_id, image_uuid, backup_storage_uuid, command
FROM op WHERE image_uuid = $1 AND status = 'Pending';

-- name: ops_pending_of_bs
SELECT op_id, kind::text, message_id, image_uuid, backup_storage_uuid, command
FROM op WHERE backup_storage_uuid = $1 AND status = 'Pending';

-- name: ops_count_pending_for_message
SELECT count(*) FROM op WHERE message_id = $1 AND status = 'Pending';

-- name: ops_failed_for_message
SELECT backup_storage_uuid, error_code, error_details
FROM op WHERE message_id = $1 AND status = 'Failed' AND kind <> 'delete'
ORDER BY created_at, backup_storage_uuid;

-- name: op_detach_message
UPDATE op SET message_id = NULL WHERE op_id = $1;

-- name: ops_due_for_resend
-- The lease: a Pending op whose command was last sent more than $1 seconds ago is sent again
-- (agents are idempotent per op id). Only ops of Connected agents; the rest wait for them.
UPDATE op SET last_sent_at = now(), attempts = attempts + 1
WHERE op_id IN (
    SELECT o.op_id FROM op o JOIN backup_storage bs ON bs.uuid = o.backup_storage_uuid
    WHERE o.status = 'Pending' AND bs.status = 'Connected'
      AND o.last_sent_at < now() - make_interval(secs => $1)
    ORDER BY o.last_sent_at
    FOR UPDATE OF o SKIP LOCKED
    LIMIT 100)
RETURNING op_id, backup_storage_uuid, command;

-- name: ops_prune
DELETE FROM op WHERE status <> 'Pending' AND finished_at < now() - make_interval(secs => $1);

-- name: tag_insert
INSERT INTO user_tag (uuid, resource_uuid, tag) VALUES ($1, $2, $3)
ON CONFLICT (uuid) DO NOTHING
RETURNING *;

-- name: tag_delete
DELETE FROM user_tag WHERE uuid = $1 RETURNING uuid;

-- name: tag_inventories
SELECT * FROM user_tag WHERE uuid = ANY($1::bpchar[]);

-- name: op_insert_failed
INSERT INTO op (op_id, kind, status, message_id, image_uuid, backup_storage_uuid, command,
                error_code, error_details, finished_at)
VALUES ($1, $2, 'Failed', $3, $4, $5, '{}'::jsonb, $6, $7, now());

-- name: ops_succeeded_for_message
SELECT backup_storage_uuid, result
FROM op WHERE message_id = $1 AND status = 'Succeeded' AND kind <> 'delete'
ORDER BY finished_at, backup_storage_uuid;

-- name: op_note_failure
-- A delete that failed on the agent stays Pending (the reconciler retries it) but stops
-- holding up the caller that asked for it.
UPDATE op SET error_code = $2, error_details = $3, message_id = NULL
WHERE op_id = $1 AND status = 'Pending'
RETURNING op_id, message_id;

-- name: ops_resend_now
UPDATE op SET last_sent_at = '-infinity'
WHERE backup_storage_uuid = $1 AND status = 'Pending';

-- name: ref_of_path_exists
SELECT 1 FROM image_backup_storage_ref
WHERE backup_storage_uuid = $1 AND install_path = $2 AND status = 'Ready';

-- name: volume_upsert
-- created/updated: insert or refresh, never reviving a tombstone.
INSERT INTO volume AS v (uuid, name, type, vm_instance_uuid, root_image_uuid,
                         primary_storage_uuid, install_path, format, size)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (uuid) DO UPDATE SET
    name = EXCLUDED.name,
    type = EXCLUDED.type,
    vm_instance_uuid = EXCLUDED.vm_instance_uuid,
    root_image_uuid = EXCLUDED.root_image_uuid,
    primary_storage_uuid = EXCLUDED.primary_storage_uuid,
    install_path = EXCLUDED.install_path,
    format = EXCLUDED.format,
    size = EXCLUDED.size,
    last_op_date = now()
WHERE NOT v.deleted
RETURNING uuid;

-- name: volume_tombstone
INSERT INTO volume AS v (uuid, deleted) VALUES ($1, true)
ON CONFLICT (uuid) DO UPDATE SET deleted = true, last_op_date = now()
WHERE NOT v.deleted
RETURNING uuid;

-- name: snapshot_upsert
INSERT INTO volume_snapshot AS s (uuid, volume_uuid, install_path, format, size)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (uuid) DO UPDATE SET
    volume_uuid = EXCLUDED.volume_uuid,
    install_path = EXCLUDED.install_path,
    format = EXCLUDED.format,
    size = EXCLUDED.size,
    last_op_date = now()
WHERE NOT s.deleted
RETURNING uuid;

-- name: snapshot_tombstone
INSERT INTO volume_snapshot AS s (uuid, deleted) VALUES ($1, true)
ON CONFLICT (uuid) DO UPDATE SET deleted = true, last_op_date = now()
WHERE NOT s.deleted
RETURNING uuid;

-- name: volume_get
SELECT * FROM volume WHERE uuid = $1 AND NOT deleted;

-- name: snapshot_get
SELECT * FROM volume_snapshot WHERE uuid = $1 AND NOT deleted;
