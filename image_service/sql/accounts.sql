-- Accounts and sessions of the HTTP portal (contract section 11).
-- Loaded by image_service.store.accounts; parameters are :named.

-- name: account_ensure
-- The first start's account; an existing one (and its password) is left alone.
INSERT INTO account (uuid, name, password_hash)
VALUES (:uuid, :name, :password_hash)
ON CONFLICT (name) DO NOTHING;

-- name: account_set_password
-- A new password unlocks the account; its sessions are ended by session_end_account.
UPDATE account
SET password_hash = :password_hash, failed_logins = 0, locked_until = NULL, last_op_at = now()
WHERE name = :name
RETURNING uuid;

-- name: account_create
INSERT INTO account (uuid, name, password_hash)
VALUES (:uuid, :name, :password_hash)
ON CONFLICT (name) DO NOTHING
RETURNING uuid;

-- name: account_attempt
-- One login attempt, counted as a failure until account_succeeded says otherwise, so that
-- attempts made at once, in any replica, are all counted. From the :allowed-th failure on the
-- account is locked for 1, 2, 4 ... seconds (at most :max_lock); a locked account returns no row
-- and its password is not even checked.
UPDATE account
SET failed_logins = failed_logins + 1,
    locked_until = CASE
        WHEN failed_logins + 1 >= :allowed THEN now() + make_interval(
            secs => least(:max_lock::float8, power(2, failed_logins + 1 - :allowed)))
        END
WHERE name = :name AND (locked_until IS NULL OR locked_until <= now())
RETURNING uuid, password_hash;

-- name: account_locked_for
-- Seconds the named account stays locked (NULL: no such account, or not locked).
SELECT extract(epoch FROM locked_until - now())::float8
FROM account WHERE name = :name AND locked_until > now();

-- name: account_succeeded
UPDATE account SET failed_logins = 0, locked_until = NULL WHERE uuid = :uuid;

-- name: session_create
INSERT INTO session (uuid, account_uuid, expires_at)
VALUES (:uuid, :account_uuid, now() + make_interval(secs => :timeout))
RETURNING uuid, account_uuid, created_at, expires_at;

-- name: session_use
-- A session in use lives `timeout` seconds more; an expired one is not revived.
UPDATE session
SET last_used_at = now(), expires_at = now() + make_interval(secs => :timeout)
WHERE uuid = :uuid AND expires_at > now()
RETURNING uuid, account_uuid, created_at, expires_at;

-- name: session_valid
SELECT uuid FROM session WHERE uuid = :uuid AND expires_at > now();

-- name: session_end
DELETE FROM session WHERE uuid = :uuid;

-- name: session_end_account
DELETE FROM session WHERE account_uuid = :account_uuid;

-- name: session_prune
DELETE FROM session WHERE expires_at < now();
