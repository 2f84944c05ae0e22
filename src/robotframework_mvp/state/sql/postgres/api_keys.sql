-- Store-backed API keys (see security/keys.py). The secret is never stored: rows are found
-- by their public prefix, and hold only the keyed digest of the secret.

-- name: insert_api_key
INSERT INTO api_keys (id, prefix, digest, principal, tenant, scopes, created_at, expires_at,
                      revoked_at, rate_limit, last_used_at, description)
VALUES (%(id)s, %(prefix)s, %(digest)s, %(principal)s, %(tenant)s, %(scopes)s,
        %(created_at)s, %(expires_at)s, %(revoked_at)s, %(rate_limit)s, %(last_used_at)s,
        %(description)s)
ON CONFLICT (prefix) DO NOTHING
RETURNING id;

-- name: get_api_key_by_prefix
SELECT id, prefix, digest, principal, tenant, scopes, created_at, expires_at, revoked_at,
       rate_limit, last_used_at, description
FROM api_keys WHERE prefix = %(prefix)s;

-- name: get_api_keys_by_prefixes
-- get_api_key_by_prefix for the keys of requests that arrived together: one read.
SELECT id, prefix, digest, principal, tenant, scopes, created_at, expires_at, revoked_at,
       rate_limit, last_used_at, description
FROM api_keys WHERE prefix = ANY(%(prefixes)s::text[]);

-- name: list_api_keys
-- Oldest first; a NULL principal lists every key.
SELECT id, prefix, digest, principal, tenant, scopes, created_at, expires_at, revoked_at,
       rate_limit, last_used_at, description
FROM api_keys
WHERE (%(principal)s::text IS NULL OR principal = %(principal)s::text)
ORDER BY created_at, id;

-- name: revoke_api_key
UPDATE api_keys SET revoked_at = %(now)s
WHERE prefix = %(prefix)s AND revoked_at IS NULL
RETURNING id, prefix, digest, principal, tenant, scopes, created_at, expires_at, revoked_at,
          rate_limit, last_used_at, description;

-- name: expire_api_key
-- Rotation: the old key stops working at expires_at, or earlier if it already would.
UPDATE api_keys
SET expires_at = LEAST(COALESCE(expires_at, %(expires_at)s), %(expires_at)s)
WHERE prefix = %(prefix)s AND revoked_at IS NULL
RETURNING id, prefix, digest, principal, tenant, scopes, created_at, expires_at, revoked_at,
          rate_limit, last_used_at, description;

-- name: touch_api_keys
-- Last use only moves forward (batches from several processes may arrive out of order).
UPDATE api_keys k SET last_used_at = u.used_at
FROM unnest(%(prefixes)b::text[], %(used_at)b::timestamptz[]) AS u(prefix, used_at)
WHERE k.prefix = u.prefix AND (k.last_used_at IS NULL OR k.last_used_at < u.used_at);
