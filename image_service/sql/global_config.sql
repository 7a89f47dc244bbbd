-- Global configuration (contract section 10): one row per option, inserted by migration 5.

-- name: config_value
-- FOR SHARE: an UpdateGlobalConfig waits for the transactions that act on the old value, and
-- every transaction after it sees the new one; so a change holds from its commit.
SELECT value FROM global_config WHERE id = :id FOR SHARE;

-- name: config_update
-- The NOTIFY is delivered when the transaction commits (and not at all if it rolls back): every
-- replica's listener learns of the change together with its effect.
WITH updated AS (
    UPDATE global_config SET value = :value, last_op_date = now()
    WHERE id = :id
    RETURNING id, category, name, value
)
SELECT id, pg_notify(:channel, json_build_object('category', category, 'name', name,
                                                 'value', value)::text) IS NOT NULL AS notified
FROM updated;

-- name: config_inventories
SELECT id, category, name, value, default_value, description
FROM global_config WHERE id = ANY(:ids::text[]);
