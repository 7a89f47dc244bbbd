-- The inbox: a message id is executed at most once, and its reply is kept for its duplicates.
-- Loaded by image_service.store.inbox; parameters are :named.

-- name: inbox_claim
INSERT INTO inbox (message_id, api, reply_to, correlation_id)
VALUES (:message_id, :api, :reply_to, :correlation_id)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id;

-- name: inbox_record
-- A read-only API's message id and its reply, in one statement; no row back means that the id
-- was seen before (its first reply is the answer). :reply is the reply already encoded (text),
-- the very bytes that are published.
INSERT INTO inbox (message_id, api, reply_to, correlation_id, reply, finished_at)
VALUES (:message_id, :api, :reply_to, :correlation_id, :reply::text::json, now())
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id;

-- name: inbox_get
SELECT message_id, api, reply_to, correlation_id, image_uuid, reply
FROM inbox WHERE message_id = :message_id;

-- name: inbox_lock
SELECT message_id, api, reply_to, correlation_id, image_uuid, reply
FROM inbox WHERE message_id = :message_id FOR UPDATE;

-- name: inbox_set_image
UPDATE inbox SET image_uuid = :image_uuid WHERE message_id = :message_id;

-- name: inbox_add_waiter
INSERT INTO inbox_waiter (message_id, reply_to, correlation_id)
VALUES (:message_id, :reply_to, :correlation_id)
ON CONFLICT DO NOTHING;

-- name: inbox_finish
-- Guarded: a message is finished once; a second completion changes nothing. `elapsed` is the
-- seconds since it was received, on the database's clock (the latency /metrics reports).
UPDATE inbox SET reply = :reply, finished_at = now()
WHERE message_id = :message_id AND reply IS NULL
RETURNING reply_to, correlation_id, api,
          extract(epoch FROM clock_timestamp() - received_at)::float8 AS elapsed;

-- name: inbox_result
-- A portal call as it stands (contract section 11): `reply` is NULL while it runs.
SELECT api, reply, received_at, finished_at FROM inbox WHERE message_id = :message_id;

-- name: inbox_waiters
SELECT reply_to, correlation_id FROM inbox_waiter WHERE message_id = :message_id;

-- name: inbox_prune
DELETE FROM inbox WHERE finished_at < now() - make_interval(secs => :older_than);
