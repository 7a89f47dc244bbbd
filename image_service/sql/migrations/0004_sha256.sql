-- Migration 4 (contract section 9): AddImage takes an optional expected SHA-256 beside md5Sum,
-- and the image inventory gains `sha256Sum`, the real SHA-256 of the file that the agent
-- computes in the same pass as md5. Both are NULL for images made before this migration, and
-- `sha256_sum` stays NULL for an image whose first stored file came from an agent that reports
-- md5 only: a Ready image need not have one.
ALTER TABLE image ADD COLUMN IF NOT EXISTS sha256_sum text
    CONSTRAINT image_sha256_sum_hex CHECK (sha256_sum IS NULL OR sha256_sum ~ '^[0-9a-f]{64}$');
ALTER TABLE image ADD COLUMN IF NOT EXISTS expected_sha256 text
    CONSTRAINT image_expected_sha256_hex
    CHECK (expected_sha256 IS NULL OR expected_sha256 ~ '^[0-9a-f]{64}$');
