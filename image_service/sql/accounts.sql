-- Accounts and sessions of the HTTP portal (contract section 11).
-- Loaded by image_service.store.accounts; parameters are :named.

-- name: account_ensure
-- The first start's account; an existing one (and its password) is left alone.
INSERT INTO account (uuid, name, password_hash)
VALUES (:uuid, :name, :password_hash)
ON CONFLICT (name) DO NOTHING;

-- name: account_set_password
UPDATE account SET password_hash = :password_hash, last_op_at = now()
WHERE name = :name
RETURNING uuid;

-- name: account_create
INSERT INTO account (uuid, name, password_hash)
VALUES (:uuid, :name, :password_hash)
ON CONFLICT (name) DO NOTHING
RETURNING uuid;

-- name: account_by_name
SELECT uuid, password_hash FROM account WHERE name = :name;

-- name: login_locked_for
-- Seconds the name stays locked for the address (NULL: not locked).
SELECT extract(epoch FROM locked_until - now())::float8
FROM login_failure
WHERE account_name = :name AND address = :address AND locked_until > now();

-- name: login_failed
-- One more failure in a row: from the :allowed-th on, the name is locked for the address for
-- 1, 2, 4 ... seconds, at most :max_lock (the exponent is capped before power() can overflow).
INSERT INTO login_failure AS f (account_name, address, failures, locked_until)
VALUES (:name, :address, 1,
        CASE WHEN 1 >= :allowed THEN now() + make_interval(secs => 1) END)
ON CONFLICT (account_name, address) DO UPDATE
SET failures = f.failures + 1,
    last_failure = now(),
    locked_until = CASE
        WHEN f.failures + 1 >= :allowed THEN now() + make_interval(
            secs => least(:max_lock::float8, power(2, least(f.failures + 1 - :allowed, 30))))
        END
RETURNING failures;

-- name: login_succeeded
DELETE FROM login_failure WHERE account_name = :name AND address = :address;

-- name: login_failures_clear
-- A new password: the name's runs of failures (and locks) end, from every address.
DELETE FROM login_failure WHERE account_name = :name;

-- name: login_failures_prune
DELETE FROM login_failure
WHERE last_failure < now() - make_interval(secs => :older_than)
  AND (locked_until IS NULL OR locked_until < now());

-- name: session_create
-- Only while the password checked is still the account's: a login that checked the old
-- password while set-password ran gets no session.
INSERT INTO session (uuid, account_uuid, expires_at)
SELECT :uuid, a.uuid, now() + make_interval(secs => :timeout)
FROM account a WHERE a.uuid = :account_uuid AND a.password_hash = :password_hash
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
