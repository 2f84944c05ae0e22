-- Store-backed API keys (`rfmvp keys`). The key is never stored: `prefix` (public, shown
-- in `rfmvp keys list`) finds the row, `digest` is the HMAC-SHA-256 of the secret under
-- the server pepper (RFMVP_SECRET_KEY). Times are UNIX epoch seconds; scopes a JSON array.

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    prefix       TEXT NOT NULL UNIQUE,
    digest       TEXT NOT NULL,
    principal    TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    scopes       TEXT NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL,
    revoked_at   REAL,
    rate_limit   TEXT,
    last_used_at REAL,
    description  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX api_keys_principal ON api_keys (principal, created_at);
