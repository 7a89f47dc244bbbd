-- Migration 6 (contract section 11): accounts and sessions of the HTTP portal, and the
-- notification that a portal call has finished.

-- An account: its password is kept only as a salted, slow hash (scrypt) of the wire form the
-- clients send (the SHA-512 hex of the password), never as that wire form.
CREATE TABLE IF NOT EXISTS account (
    uuid           char(32) PRIMARY KEY,
    name           text NOT NULL UNIQUE,
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_op_at     timestamptz NOT NULL DEFAULT now()
);

-- Failed logins in a row, per account name (existing or not) and client address: past a limit
-- that name is locked for that address until `locked_until` (portal/accounts.py). Per address,
-- so that nobody can lock an account out for everyone else.
CREATE TABLE IF NOT EXISTS login_failure (
    account_name   text NOT NULL,
    address        text NOT NULL,
    failures       integer NOT NULL,
    locked_until   timestamptz,
    last_failure   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_name, address)
);
CREATE INDEX IF NOT EXISTS login_failure_last_idx ON login_failure (last_failure);

-- A session ends `expires_at`: every use moves it to `session timeout` seconds later.
CREATE TABLE IF NOT EXISTS session (
    uuid           char(32) PRIMARY KEY,
    account_uuid   char(32) NOT NULL REFERENCES account (uuid) ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS session_expires_idx ON session (expires_at);
CREATE INDEX IF NOT EXISTS session_account_idx ON session (account_uuid);

-- A portal call is a message of the inbox whose id starts with 'portal-'. When its reply is
-- stored, whichever replica stored it, the replica holding the HTTP request hears it at once.
CREATE OR REPLACE FUNCTION inbox_portal_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('image_portal_finished', NEW.message_id);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS inbox_portal_finished ON inbox;
CREATE TRIGGER inbox_portal_finished
    AFTER UPDATE OF reply ON inbox
    FOR EACH ROW
    WHEN (OLD.reply IS NULL AND NEW.reply IS NOT NULL AND NEW.message_id LIKE 'portal-%')
    EXECUTE FUNCTION inbox_portal_finished();
