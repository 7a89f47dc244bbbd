-- Ops: one row per command sent to an agent, the lease on that work (docs/DESIGN.md 3).
-- Statuses are bound parameters fed from image_service.lifecycle.

-- name: op_insert
INSERT INTO op (op_id, kind, message_id, image_uuid, backup_storage_uuid, command)
VALUES (:op_id, :kind, :message_id, :image_uuid, :backup_storage_uuid, :command);

-- name: op_insert_failed
INSERT INTO op (op_id, kind, status, message_id, image_uuid, backup_storage_uuid, command,
                error_code, error_details, finished_at)
VALUES (:op_id, :kind, :failed, :message_id, :image_uuid, :backup_storage_uuid, '{}'::jsonb,
        :error_code, :error_details, now());

-- name: op_finish
UPDATE op
SET status = :status, result = :result, error_code = :error_code,
    error_details = :error_details, finished_at = now()
WHERE op_id = :op_id AND status = ANY(:allowed::op_status[])
RETURNING op_id, kind::text AS kind, message_id, image_uuid, backup_storage_uuid, command;

-- name: op_get
SELECT op_id, kind::text AS kind, message_id, image_uuid, backup_storage_uuid, command
FROM op WHERE op_id = :op_id;

-- name: ops_pending_of_image
SELECT op_id, kind::text AS kind, message_id, image_uuid, backup_storage_uuid, command
FROM op WHERE image_uuid = :image_uuid AND status = :pending
ORDER BY created_at, op_id;

-- name: ops_pending_of_bs
SELECT op_id, kind::text AS kind, message_id, image_uuid, backup_storage_uuid, command
FROM op WHERE backup_storage_uuid = :backup_storage_uuid AND status = :pending
ORDER BY image_uuid, created_at, op_id;

-- name: ops_count_pending_for_message
SELECT count(*) FROM op WHERE message_id = :message_id AND status = :pending;

-- name: ops_failed_for_message
SELECT backup_storage_uuid, error_code, error_details
FROM op WHERE message_id = :message_id AND status = :failed AND kind <> :delete
ORDER BY created_at, backup_storage_uuid;

-- name: ops_succeeded_for_message
SELECT backup_storage_uuid, result
FROM op WHERE message_id = :message_id AND status = :succeeded AND kind <> :delete
ORDER BY finished_at, backup_storage_uuid;

-- name: op_error
-- What the agent last reported for a Pending op (a delete that failed there and is retried).
SELECT error_code, error_details FROM op WHERE op_id = :op_id AND status = :pending;

-- name: op_detach_message
UPDATE op SET message_id = NULL WHERE op_id = :op_id;

-- name: op_note_failure
-- A delete that failed on the agent stays Pending (the reconciler retries it) but stops
-- holding up the caller that asked for it.
UPDATE op SET error_code = :error_code, error_details = :error_details, message_id = NULL
WHERE op_id = :op_id AND status = :pending
RETURNING op_id;

-- name: ops_stranded
-- Pending ops whose backup storage went away after their request saw it there: those of a
-- deleted backup storage, and of a Disconnected one those that cannot wait for it (downloads,
-- creations, inspections) or still hold their caller (deletes). `gone`: deleted.
SELECT o.op_id, o.kind::text AS kind, o.message_id, o.image_uuid, o.backup_storage_uuid,
       o.command, bs.uuid IS NULL AS gone
FROM op o LEFT JOIN backup_storage bs ON bs.uuid = o.backup_storage_uuid
WHERE o.status = :pending
  AND (bs.uuid IS NULL
       OR (bs.status = :disconnected AND (o.kind <> :delete OR o.message_id IS NOT NULL)))
ORDER BY o.image_uuid, o.op_id
LIMIT 100;

-- name: ops_due_for_resend
-- The lease: a Pending op whose command was last sent more than :after seconds ago is sent
-- again (agents are idempotent per op id). Only ops of Connected agents; the rest wait for them.
UPDATE op SET last_sent_at = now(), attempts = attempts + 1
WHERE op_id IN (
    SELECT o.op_id FROM op o JOIN backup_storage bs ON bs.uuid = o.backup_storage_uuid
    WHERE o.status = :pending AND bs.status = :connected
      AND o.last_sent_at < now() - make_interval(secs => :after)
    ORDER BY o.last_sent_at
    FOR UPDATE OF o SKIP LOCKED
    LIMIT 100)
RETURNING op_id, kind::text AS kind, message_id, image_uuid, backup_storage_uuid, command;

-- name: ops_resend_now
UPDATE op SET last_sent_at = '-infinity'
WHERE backup_storage_uuid = :backup_storage_uuid AND status = :pending;

-- name: ops_prune
DELETE FROM op
WHERE status = ANY(:final::op_status[])
  AND finished_at < now() - make_interval(secs => :older_than);
