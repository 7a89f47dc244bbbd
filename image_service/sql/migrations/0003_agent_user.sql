-- Migration 3 (contract section 8): a backup storage belongs to the broker user of its first
-- heartbeat; from then on only that user's heartbeats and results count for it. Rows
-- registered before this migration have none and are bound by their next heartbeat.
ALTER TABLE backup_storage ADD COLUMN IF NOT EXISTS agent_user text
    CHECK (agent_user IS NULL OR length(agent_user) BETWEEN 1 AND 255);
