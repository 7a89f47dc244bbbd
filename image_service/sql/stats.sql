-- What /metrics reports from the database (contract section 11): read at each scrape, so
-- every replica reports the same figures. Loaded by image_service.store.stats.

-- name: ops_in_flight
SELECT kind::text AS kind, count(*)::bigint AS count
FROM op WHERE status = 'Pending' GROUP BY kind;

-- name: backup_storages
SELECT uuid, name, status::text AS status, state::text AS state,
       total_capacity, available_capacity
FROM backup_storage ORDER BY uuid;

-- name: outbox_depth
SELECT count(*)::bigint FROM outbox;

-- name: ping
SELECT 1;
