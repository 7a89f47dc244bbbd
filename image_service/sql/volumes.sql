-- The read model of volumes and snapshots, kept from the volume service's events.

-- name: volume_upsert
-- created/updated: insert or refresh, never reviving a tombstone.
INSERT INTO volume AS v (uuid, name, type, vm_instance_uuid, root_image_uuid,
                         primary_storage_uuid, install_path, format, size)
VALUES (:uuid, :name, :type, :vm_instance_uuid, :root_image_uuid, :primary_storage_uuid,
        :install_path, :format, :size)
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
INSERT INTO volume AS v (uuid, deleted) VALUES (:uuid, true)
ON CONFLICT (uuid) DO UPDATE SET deleted = true, last_op_date = now()
WHERE NOT v.deleted
RETURNING uuid;

-- name: snapshot_upsert
INSERT INTO volume_snapshot AS s (uuid, volume_uuid, install_path, format, size)
VALUES (:uuid, :volume_uuid, :install_path, :format, :size)
ON CONFLICT (uuid) DO UPDATE SET
    volume_uuid = EXCLUDED.volume_uuid,
    install_path = EXCLUDED.install_path,
    format = EXCLUDED.format,
    size = EXCLUDED.size,
    last_op_date = now()
WHERE NOT s.deleted
RETURNING uuid;

-- name: snapshot_tombstone
INSERT INTO volume_snapshot AS s (uuid, deleted) VALUES (:uuid, true)
ON CONFLICT (uuid) DO UPDATE SET deleted = true, last_op_date = now()
WHERE NOT s.deleted
RETURNING uuid;

-- name: volume_get
SELECT uuid, type, install_path, format, root_image_uuid
FROM volume WHERE uuid = :uuid AND NOT deleted;

-- name: snapshot_get
SELECT s.uuid, v.type, s.install_path, s.format, v.root_image_uuid
FROM volume_snapshot s LEFT JOIN volume v ON v.uuid = s.volume_uuid AND NOT v.deleted
WHERE s.uuid = :uuid AND NOT s.deleted;
