-- Store-backed API keys (see security/keys.py). The secret is never stored: rows are found
-- by their public prefix, and hold only the keyed digest of the secret.

-- name: insert_api_key
INSERT INTO api_keys (id, prefix, digest, principal, tenant, scopes, created_at, expires_at,
                      revoked_at, rate_limit, last_used_at, description)
VALUES (:id, :prefix, :digest, :principal, :tenant, :scopes, :created_at, :expires_at,
        :revoked_at, :rate_limit, :last_used_at, :description);

-- name: get_api_key_by_prefix
SELECT * FROM api_keys WHERE prefix = :prefix;

-- name: get_api_keys_by_prefixes
-- get_api_key_by_prefix for the keys of requests that arrived together (:prefixes is a
-- JSON array): one read.
SELECT * FROM api_keys WHERE prefix IN (SELECT value FROM json_each(:prefixes));

-- name: list_api_keys
-- Oldest first; a NULL principal lists every key.
SELECT * FROM api_keys
WHERE (:principal IS NULL OR principal = :principal)
ORDER BY created_at, id;

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = :now
WHERE prefix = :prefix AND revoked_at IS NULL
RETURNING *;

-- name: expire_api_key
-- Rotation: the old key stops working at :expires_at, or earlier if it already would.
UPDATE api_keys
SET expires_at = CASE WHEN expires_at IS NULL OR expires_at > :expires_at THEN :expires_at
                      ELSE expires_at END
WHERE prefix = :prefix AND revoked_at IS NULL
RETURNING *;

-- name: touch_api_key
-- Last use only moves forward (batches from several processes may arrive out of order).
UPDATE api_keys SET last_used_at = :used_at
WHERE prefix = :prefix AND (last_used_at IS NULL OR last_used_at < :used_at);
