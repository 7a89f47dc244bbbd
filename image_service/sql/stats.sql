-- What /metrics reports from the database (contract section 11): read at each scrape, so
-- every replica reports the same figures. Loaded by image_service.store.stats.

-- name: ops_in_flight
-- Every kind, those with no op in flight at 0 (a series that vanishes at zero misleads).
SELECT k::text AS kind, count(op.op_id)::bigint AS count
FROM unnest(enum_range(NULL::op_kind)) AS k
LEFT JOIN op ON op.kind = k AND op.status = 'Pending'
GROUP BY k ORDER BY k;

-- name: backup_storages
SELECT uuid, name, status::text AS status, state::text AS state,
       total_capacity, available_capacity
FROM backup_storage ORDER BY uuid;

-- name: outbox_depth
SELECT count(*)::bigint FROM outbox;

-- name: ping
SELECT 1;
