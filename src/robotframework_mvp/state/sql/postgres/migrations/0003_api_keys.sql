-- Store-backed API keys (`rfmvp keys`). The key is never stored: `prefix` (public, shown
-- in `rfmvp keys list`) finds the row, `digest` is the HMAC-SHA-256 of the secret under
-- the server pepper (RFMVP_SECRET_KEY).

CREATE TABLE api_keys (
    id           text COLLATE "C" PRIMARY KEY,
    prefix       text COLLATE "C" NOT NULL UNIQUE,
    digest       text NOT NULL,
    principal    text NOT NULL,
    tenant       text NOT NULL,
    scopes       jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    rate_limit   text,
    last_used_at timestamptz,
    description  text NOT NULL DEFAULT ''
);
CREATE INDEX api_keys_principal ON api_keys (principal, created_at);
