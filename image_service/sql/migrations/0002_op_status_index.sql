-- Migration 2: the op statuses the reconciler looks for are bound parameters now (fed from
-- image_service.lifecycle), and a partial index on a literal 'Pending' cannot serve a generic
-- plan of `status = $1`. One index on (status, last_sent_at) serves both plans.
DROP INDEX IF EXISTS op_pending_idx;
CREATE INDEX IF NOT EXISTS op_status_sent_idx ON op (status, last_sent_at);
