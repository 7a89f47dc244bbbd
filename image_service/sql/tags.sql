-- User tags on images.

-- name: tag_insert
INSERT INTO user_tag (uuid, resource_uuid, tag) VALUES (:uuid, :resource_uuid, :tag)
ON CONFLICT (uuid) DO NOTHING
RETURNING uuid, resource_type, resource_uuid, tag, type, create_date, last_op_date;

-- name: tag_delete
DELETE FROM user_tag WHERE uuid = :uuid RETURNING uuid;

-- name: tag_inventories
SELECT uuid, resource_type, resource_uuid, tag, type, create_date, last_op_date
FROM user_tag WHERE uuid = ANY(:uuids::bpchar[]);
