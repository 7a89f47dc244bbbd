-- Migration 5 (contract section 10): deleting, expunging and recovering images.
--
-- Images and references gain the status Deleted: under the Delay and Never deletion policies
-- DeleteImage keeps the file and marks its reference Deleted; ExpungeImage (or the expunger,
-- `expungePeriod` after `deleted_at`) removes it, RecoverImage makes it Ready again once its
-- agent has confirmed the file. A new op kind, `inspect`, asks an agent to measure (and for a
-- recovery, hash) a stored file.
--
-- ALTER TYPE ... ADD VALUE may run inside the migration's transaction, but the new values
-- cannot be used in that transaction: nothing below (nor in a later migration applied in the
-- same run) may name 'Deleted' or 'inspect' as a literal. The guards of the statements that
-- use them are bound parameters, which is all the code needs.
ALTER TYPE image_status ADD VALUE IF NOT EXISTS 'Deleted';
ALTER TYPE op_kind ADD VALUE IF NOT EXISTS 'inspect';

-- When the reference turned Deleted (NULL while it is not): the expunger removes it
-- `expungePeriod` seconds later.
ALTER TABLE image_backup_storage_ref ADD COLUMN IF NOT EXISTS deleted_at timestamptz;
-- The op (a delete that expunges it, or an inspect that recovers it) now working on a Deleted
-- reference; NULL when none. A reference is claimed by one op at a time: the guard that sets
-- it (`... AND ref_op IS NULL`) is what makes each reference expunged exactly once, whichever
-- replica tries.
ALTER TABLE image_backup_storage_ref ADD COLUMN IF NOT EXISTS ref_op uuid;
CREATE INDEX IF NOT EXISTS ref_deleted_idx ON image_backup_storage_ref (deleted_at)
    WHERE deleted_at IS NOT NULL;

-- A backup storage's capacity comes from heartbeats and from every agent result; each
-- measurement carries the agent's sequence number, and only a newer one replaces the figures
-- (a heartbeat measured before an op must not undo the result measured after it).
ALTER TABLE backup_storage ADD COLUMN IF NOT EXISTS capacity_seq bigint;

-- Global configuration (QueryGlobalConfig, UpdateGlobalConfig). `image_service.globalconfig`
-- defines each option (its default, description and validation); a test checks that these
-- rows agree with it.
CREATE TABLE IF NOT EXISTS global_config (
    id            text PRIMARY KEY,  -- category.name
    category      text NOT NULL,
    name          text NOT NULL,
    value         text NOT NULL,
    default_value text NOT NULL,
    description   text NOT NULL,
    create_date   timestamptz NOT NULL DEFAULT now(),
    last_op_date  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (category, name),
    CHECK (id = category || '.' || name)
);
INSERT INTO global_config (id, category, name, value, default_value, description) VALUES
    ('image.deletionPolicy', 'image', 'deletionPolicy', 'Direct', 'Direct',
     'What DeleteImage does with the files: Direct removes them at once; Delay keeps them'
     ' (status Deleted) until ExpungeImage or expungePeriod seconds later; Never keeps them'
     ' until ExpungeImage.'),
    ('image.expungePeriod', 'image', 'expungePeriod', '86400', '86400',
     'Seconds a Deleted image reference is kept before the expunger removes it (under every'
     ' deletion policy but Never).')
ON CONFLICT (id) DO NOTHING;
