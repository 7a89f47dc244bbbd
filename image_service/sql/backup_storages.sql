-- Backup storages: registered and refreshed by their agents' heartbeats.

-- name: bs_owner_for_update
-- Read (and lock) the status and the owning broker user before a heartbeat's upsert, so the
-- caller publishes a status event only on a real change, and refuses another user's heartbeat.
-- A CTE cannot do this: the upsert runs first and a locking read of a row the same statement
-- modified sees nothing.
SELECT status::text AS status, agent_user FROM backup_storage WHERE uuid = :uuid FOR UPDATE;

-- name: bs_agent_user
SELECT agent_user FROM backup_storage WHERE uuid = :uuid;

-- name: bs_heartbeat
-- Registers an agent on its first heartbeat and marks it :connected on every one (from the
-- statuses in :connected_from; a Connected one stays so). `inserted` tells a registration from
-- an update (xmax is 0 only on a row this statement inserted): two first heartbeats handled at
-- once both read no previous status, and only one inserts. Only the broker user that owns the
-- row (or the first one, for a row that has none yet) changes it: another's gets no row back.
-- Capacity is taken only from a measurement newer than the one recorded (`capacity_seq`, see
-- bs_record_capacity); a heartbeat without one (an agent from before contract section 10)
-- always counts.
INSERT INTO backup_storage AS bs (uuid, name, url, hostname, total_capacity,
                                  available_capacity, heartbeat_interval, status,
                                  last_heartbeat, agent_user, capacity_seq)
SELECT :uuid, :name, :url, :hostname, :total_capacity, :available_capacity,
       :heartbeat_interval, :connected, now(), :agent_user, :capacity_seq::bigint
WHERE NOT EXISTS (SELECT 1 FROM deleted_backup_storage d WHERE d.uuid = :uuid)
ON CONFLICT (uuid) DO UPDATE SET
    agent_user = EXCLUDED.agent_user,
    name = EXCLUDED.name,
    url = EXCLUDED.url,
    hostname = EXCLUDED.hostname,
    total_capacity = CASE WHEN EXCLUDED.capacity_seq IS NULL OR bs.capacity_seq IS NULL
                               OR EXCLUDED.capacity_seq > bs.capacity_seq
                          THEN EXCLUDED.total_capacity ELSE bs.total_capacity END,
    available_capacity = CASE WHEN EXCLUDED.capacity_seq IS NULL OR bs.capacity_seq IS NULL
                                   OR EXCLUDED.capacity_seq > bs.capacity_seq
                              THEN EXCLUDED.available_capacity ELSE bs.available_capacity END,
    capacity_seq = CASE WHEN EXCLUDED.capacity_seq IS NULL OR bs.capacity_seq IS NULL
                             OR EXCLUDED.capacity_seq > bs.capacity_seq
                        THEN EXCLUDED.capacity_seq ELSE bs.capacity_seq END,
    heartbeat_interval = EXCLUDED.heartbeat_interval,
    status = CASE WHEN bs.status = ANY(:connected_from::bs_status[])
                  THEN EXCLUDED.status ELSE bs.status END,
    last_heartbeat = now(),
    last_op_date = CASE WHEN bs.status = ANY(:connected_from::bs_status[])
                        THEN now() ELSE bs.last_op_date END
WHERE bs.agent_user IS NULL OR bs.agent_user = EXCLUDED.agent_user
RETURNING uuid, (xmax = 0) AS inserted;

-- name: bs_record_capacity
-- The capacity an agent measured after an op, stored in the transaction that applies the op's
-- result: the reply and a QueryBackupStorage right after it agree. Only a newer measurement
-- than the recorded one counts (results and heartbeats are measured and delivered
-- concurrently).
UPDATE backup_storage
SET total_capacity = :total_capacity, available_capacity = :available_capacity,
    capacity_seq = :capacity_seq
WHERE uuid = :uuid AND (capacity_seq IS NULL OR capacity_seq < :capacity_seq)
RETURNING uuid;

-- name: bs_mark_disconnected
-- :missed heartbeats; :heard_for seconds since this replica could last rely on having consumed
-- the heartbeats: since it started, or since its database came back. That moment counts as a
-- heartbeat: the heartbeats (and results) sent while it could not consume them are still in
-- their queues, so silence before it says nothing about the agent.
UPDATE backup_storage
SET status = :disconnected, last_op_date = now()
WHERE status = ANY(:allowed::bs_status[])
  AND last_heartbeat IS NOT NULL
  AND greatest(last_heartbeat, now() - make_interval(secs => :heard_for))
      < now() - make_interval(secs => heartbeat_interval * :missed)
RETURNING uuid;

-- name: bs_get_many
SELECT uuid, name, url, hostname, state::text AS state, status::text AS status,
       available_capacity
FROM backup_storage WHERE uuid = ANY(:uuids::bpchar[]) ORDER BY uuid;

-- name: bs_all
SELECT uuid, name, url, hostname, state::text AS state, status::text AS status,
       available_capacity
FROM backup_storage ORDER BY uuid;

-- name: bs_lock
SELECT uuid, name, url, hostname, state::text AS state, status::text AS status,
       available_capacity
FROM backup_storage WHERE uuid = :uuid FOR UPDATE;

-- name: bs_change_state
UPDATE backup_storage SET state = :state, last_op_date = now()
WHERE uuid = :uuid AND state = ANY(:allowed::bs_state[])
RETURNING uuid;

-- name: bs_delete
DELETE FROM backup_storage WHERE uuid = :uuid RETURNING uuid;

-- name: bs_tombstone
INSERT INTO deleted_backup_storage (uuid) VALUES (:uuid) ON CONFLICT DO NOTHING;

-- name: bs_inventories
SELECT uuid, name, description, url, hostname, type, state, status, total_capacity,
       available_capacity, create_date, last_op_date
FROM backup_storage WHERE uuid = ANY(:uuids::bpchar[]);
