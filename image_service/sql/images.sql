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

-- name: image_mark_ready
-- `sha256_sum` is NULL when the agent that stored the file reports md5 only.
UPDATE image
SET status = :ready, size = :size, actual_size = :actual_size, virtual_size = :virtual_size,
    md5_sum = :md5_sum, sha256_sum = :sha256_sum, last_op_date = now()
WHERE uuid = :uuid AND status = ANY(:allowed::image_status[])
RETURNING uuid;

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

-- name: refs_of_image
SELECT r.backup_storage_uuid, r.install_path, r.status::text AS status,
       bs.status::text AS bs_status, bs.hostname
FROM image_backup_storage_ref r JOIN backup_storage bs ON bs.uuid = r.backup_storage_uuid
WHERE r.image_uuid = :image_uuid
ORDER BY r.create_date, r.backup_storage_uuid;

-- name: refs_of_bs
SELECT image_uuid, install_path
FROM image_backup_storage_ref WHERE backup_storage_uuid = :backup_storage_uuid
ORDER BY image_uuid;

-- name: ref_ready_at_path
SELECT 1 FROM image_backup_storage_ref
WHERE backup_storage_uuid = :backup_storage_uuid AND install_path = :install_path
  AND status = :ready;
