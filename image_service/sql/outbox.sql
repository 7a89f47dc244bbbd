-- The outbox: what a transaction decided to publish, published by the relay after commit.

-- name: outbox_put
INSERT INTO outbox (exchange, routing_key, body, correlation_id, message_id, persistent)
VALUES (:exchange, :routing_key, :body, :correlation_id, :message_id, :persistent);

-- name: outbox_take
SELECT id, exchange, routing_key, body, correlation_id, message_id, persistent
FROM outbox ORDER BY id
FOR UPDATE SKIP LOCKED
LIMIT :limit;

-- name: outbox_rejected
-- The broker refused this row; the relay gives up on it at the second refusal.
UPDATE outbox SET rejections = rejections + 1 WHERE id = :id
RETURNING rejections, routing_key;

-- name: outbox_delete
DELETE FROM outbox WHERE id = ANY(:ids::bigint[]);
