-- The robots, their executions, module records and the audit chain.
-- Times are UNIX epoch seconds (REAL); JSON columns are TEXT.

CREATE TABLE robots (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    payload          TEXT NOT NULL,
    owner            TEXT NOT NULL,
    tenant           TEXT NOT NULL,
    status           TEXT NOT NULL,
    module           TEXT,
    progress         REAL NOT NULL DEFAULT 0,
    progress_message TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT,
    result           TEXT,
    error            TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    scheduled_at     REAL NOT NULL,
    lease_token      TEXT,
    lease_expires_at REAL
);

-- One robot per (owner, idempotency key): concurrent submissions race on this index.
CREATE UNIQUE INDEX robots_owner_idempotency_key
    ON robots (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The queue: due robots of a module by priority, then age.
CREATE INDEX robots_queue ON robots (module, priority DESC, scheduled_at) WHERE status = 'queued';
-- The reaper: running robots by lease expiry.
CREATE INDEX robots_leases ON robots (lease_expires_at) WHERE status = 'running';
CREATE INDEX robots_tenant ON robots (tenant, id);
CREATE INDEX robots_status ON robots (status, id);
CREATE INDEX robots_finished ON robots (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE executions (
    id          TEXT PRIMARY KEY,
    robot_id    TEXT NOT NULL,
    module      TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL,
    worker      TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    duration_ms REAL,
    error       TEXT
);
CREATE INDEX executions_robot ON executions (robot_id, attempt);

CREATE TABLE modules (
    name            TEXT PRIMARY KEY,
    kinds           TEXT NOT NULL,
    capacity        INTEGER NOT NULL,
    health          TEXT NOT NULL,
    last_check_at   REAL,
    score           REAL NOT NULL,
    success_rate    REAL NOT NULL,
    latency_ewma_ms REAL,
    circuit_state   TEXT NOT NULL,
    load            INTEGER NOT NULL DEFAULT 0,
    updated_at      REAL NOT NULL
);

CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         REAL NOT NULL,
    principal  TEXT,
    action     TEXT NOT NULL,
    target     TEXT,
    outcome    TEXT NOT NULL,
    client     TEXT,
    request_id TEXT NOT NULL,
    details    TEXT NOT NULL,
    prev_hash  TEXT,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_log_ts ON audit_log (ts);
