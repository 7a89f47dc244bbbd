-- Images and their references on backup storages.

-- name: image_insert
INSERT INTO image (uuid, name, description, status, url, media_type, guest_os_type, platform,
                   system, format, expected_md5, expected_sha256, type)
VALUES (:uuid, :name, :description, :status, :url, :media_type, :guest_os_type, :platform,
        :system, :format, :expected_md5, :expected_sha256, :type)
ON CONFLICT (uuid) DO NOTHING
RETURNING uuid;

-- name: image_lock
SELECT uuid, name, state::text AS state, status::text AS status, media_type, platform,
       system, format
FROM image WHERE uuid = :uuid FOR UPDATE;

-- name: images_lock
-- Several image rows, locked in uuid order: every transaction that locks more than one image
-- takes them in this one order, so two of them never wait for each other in a cycle. (The
-- rows are sorted before they are locked: LockRows sits above the Sort in the plan.)
SELECT uuid, name, state::text AS state, status::text AS status, media_type, platform,
       system, format
FROM image WHERE uuid = ANY(:uuids::bpchar[])
ORDER BY uuid
FOR UPDATE;

-- name: image_mark_stored
-- The image's first stored file describes it; it turns :status (Ready, or Deleted when every
-- reference was deleted before its creation finished). `sha256_sum` is NULL when the agent
-- that stored the file reports md5 only.
UPDATE image
SET status = :status, size = :size, actual_size = :actual_size, virtual_size = :virtual_size,
    md5_sum = :md5_sum, sha256_sum = :sha256_sum, last_op_date = now()
WHERE uuid = :uuid AND status = ANY(:allowed::image_status[])
RETURNING uuid;

-- name: image_set_status
UPDATE image SET status = :status, last_op_date = now()
WHERE uuid = :uuid AND status = ANY(:allowed::image_status[])
RETURNING uuid;

-- name: image_stored_facts
SELECT size, actual_size, virtual_size, md5_sum, sha256_sum FROM image WHERE uuid = :uuid;

-- name: image_origin
-- What a template inherits from the root image of the volume it is made from.
SELECT status::text AS status, platform, guest_os_type FROM image WHERE uuid = :uuid;

-- name: image_set_sizes
-- SyncImageSize: what the agent measured now. `size` is not among them: the md5 pins it, and
-- a file of another size is not the image's (the sync fails instead).
UPDATE image
SET actual_size = :actual_size, virtual_size = :virtual_size, last_op_date = now()
WHERE uuid = :uuid AND status = :ready
RETURNING uuid;

-- name: images_try_lock
-- Like images_lock, but skipping the rows another transaction holds: for the expunger, which
-- must never wait (it comes back for them) and never lock out of uuid order.
SELECT uuid FROM image WHERE uuid = ANY(:uuids::bpchar[])
ORDER BY uuid
FOR UPDATE SKIP LOCKED;

-- name: image_change_state
UPDATE image SET state = :state, last_op_date = now()
WHERE uuid = :uuid AND state = ANY(:allowed::image_state[])
RETURNING uuid;

-- name: image_update
-- NULL leaves a field unchanged; the CHECKs of the table enforce ISO rules.
UPDATE image SET
    name = COALESCE(:name, name),
    description = COALESCE(:description, description),
    guest_os_type = COALESCE(:guest_os_type, guest_os_type),
    platform = COALESCE(:platform, platform),
    media_type = COALESCE(:media_type, media_type),
    system = COALESCE(:system, system),
    last_op_date = now()
WHERE uuid = :uuid
RETURNING uuid;

-- name: image_delete
DELETE FROM image WHERE uuid = :uuid RETURNING uuid;

-- name: image_inventories
-- Dates are formatted here, as for the references: formatting hundreds of them in Python showed
-- in the profile of queries returning many inventories.
SELECT i.uuid, i.name, i.description, i.state, i.status, i.size, i.actual_size,
       i.virtual_size, i.url, i.media_type, i.guest_os_type, i.platform, i.system, i.format,
       i.md5_sum, i.sha256_sum, i.type,
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
FROM image i WHERE i.uuid = ANY(:uuids::bpchar[]);

-- name: ref_insert
INSERT INTO image_backup_storage_ref (image_uuid, backup_storage_uuid, install_path, status)
VALUES (:image_uuid, :backup_storage_uuid, :install_path, :status);

-- name: ref_mark_ready
UPDATE image_backup_storage_ref
SET status = :ready, install_path = :install_path, last_op_date = now()
WHERE image_uuid = :image_uuid AND backup_storage_uuid = :backup_storage_uuid
  AND status = ANY(:allowed::image_status[])
RETURNING image_uuid;

-- name: ref_delete
DELETE FROM image_backup_storage_ref
WHERE image_uuid = :image_uuid AND backup_storage_uuid = :backup_storage_uuid
RETURNING install_path;

-- name: ref_mark_deleted
-- Delay and Never: the file stays; the expunger (woken by the NOTIFY at commit) removes it
-- `expungePeriod` after `deleted_at`.
WITH deleted AS (
    UPDATE image_backup_storage_ref
    SET status = :deleted, deleted_at = now(), last_op_date = now()
    WHERE image_uuid = :image_uuid AND backup_storage_uuid = :backup_storage_uuid
      AND status = ANY(:allowed::image_status[])
    RETURNING image_uuid
)
SELECT image_uuid, pg_notify(:channel, image_uuid) IS NOT NULL AS notified FROM deleted;

-- name: ref_claim
-- One op at a time works on a Deleted reference (an expunge's delete, a recovery's inspect):
-- whoever sets `ref_op` first has it, and every other claim gets no row. :min_age is how long
-- it must have been Deleted (the expunge period for the expunger, 0 when asked).
UPDATE image_backup_storage_ref
SET ref_op = :op_id, last_op_date = now()
WHERE image_uuid = :image_uuid AND backup_storage_uuid = :backup_storage_uuid
  AND status = :deleted AND ref_op IS NULL
  AND deleted_at <= now() - make_interval(secs => :min_age)
RETURNING install_path;

-- name: ref_release
-- The op that claimed the reference ended without changing it.
UPDATE image_backup_storage_ref SET ref_op = NULL, last_op_date = now()
WHERE image_uuid = :image_uuid AND backup_storage_uuid = :backup_storage_uuid
  AND ref_op = :op_id
RETURNING image_uuid;

-- name: ref_recover
UPDATE image_backup_storage_ref
SET status = :ready, deleted_at = NULL, ref_op = NULL, last_op_date = now()
WHERE image_uuid = :image_uuid AND backup_storage_uuid = :backup_storage_uuid
  AND ref_op = :op_id AND status = ANY(:allowed::image_status[])
RETURNING image_uuid;

-- name: ref_remove_claimed
-- An expunge confirmed by its agent (or a recovery that found the file gone): the reference
-- goes only now, never while its file may still exist.
DELETE FROM image_backup_storage_ref
WHERE image_uuid = :image_uuid AND backup_storage_uuid = :backup_storage_uuid
  AND ref_op = :op_id
RETURNING install_path;

-- name: images_due_for_expunge
SELECT DISTINCT image_uuid FROM image_backup_storage_ref
WHERE deleted_at <= now() - make_interval(secs => :period)
  AND status = :deleted AND ref_op IS NULL
ORDER BY image_uuid
LIMIT :limit;

-- name: expunge_next_due
-- Seconds until the next unclaimed Deleted reference is due (negative: overdue; NULL: none).
SELECT EXTRACT(EPOCH FROM min(deleted_at) + make_interval(secs => :period) - now())::float8
FROM image_backup_storage_ref
WHERE deleted_at IS NOT NULL AND status = :deleted AND ref_op IS NULL;

-- name: refs_of_image
SELECT r.backup_storage_uuid, r.install_path, r.status::text AS status, r.ref_op,
       bs.status::text AS bs_status, bs.hostname
FROM image_backup_storage_ref r JOIN backup_storage bs ON bs.uuid = r.backup_storage_uuid
WHERE r.image_uuid = :image_uuid
ORDER BY r.create_date, r.backup_storage_uuid;

-- name: refs_of_bs
SELECT image_uuid, install_path
FROM image_backup_storage_ref WHERE backup_storage_uuid = :backup_storage_uuid
ORDER BY image_uuid;

-- name: ref_holding_path
-- A Ready reference keeps its file, and so does a Deleted one (until it is expunged).
SELECT 1 FROM image_backup_storage_ref
WHERE backup_storage_uuid = :backup_storage_uuid AND install_path = :install_path
  AND status = ANY(:holding::image_status[]);
