-- The robots, their executions, module records and the audit chain.
-- Every object lives in the connection's search_path (no schema is named here), so one
-- database can hold several independent installations (and tests isolate by schema).
-- Ids are UUIDv7 text compared bytewise (COLLATE "C"): time order, cheap comparisons.

CREATE TABLE robots (
    id               text COLLATE "C" PRIMARY KEY,
    kind             text NOT NULL,
    payload          jsonb NOT NULL,
    owner            text NOT NULL,
    tenant           text NOT NULL,
    status           text NOT NULL,
    module           text,
    progress         double precision NOT NULL DEFAULT 0,
    progress_message text,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    priority         integer NOT NULL DEFAULT 0,
    idempotency_key  text,
    result           jsonb,
    error            jsonb,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    scheduled_at     timestamptz NOT NULL,
    lease_token      text,
    lease_expires_at timestamptz
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
    id          text COLLATE "C" PRIMARY KEY,
    robot_id    text COLLATE "C" NOT NULL,
    module      text NOT NULL,
    attempt     integer NOT NULL,
    status      text NOT NULL,
    worker      text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    duration_ms double precision,
    error       jsonb
);
CREATE INDEX executions_robot ON executions (robot_id, attempt);

CREATE TABLE modules (
    name            text PRIMARY KEY,
    kinds           jsonb NOT NULL,
    capacity        integer NOT NULL,
    health          text NOT NULL,
    last_check_at   timestamptz,
    score           double precision NOT NULL,
    success_rate    double precision NOT NULL,
    latency_ewma_ms double precision,
    circuit_state   text NOT NULL,
    load            integer NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL
);

CREATE TABLE audit_log (
    seq        bigserial PRIMARY KEY,
    ts         timestamptz NOT NULL,
    principal  text,
    action     text NOT NULL,
    target     text,
    outcome    text NOT NULL,
    client     text,
    request_id text NOT NULL,
    details    jsonb NOT NULL,
    prev_hash  text,
    hash       text NOT NULL
);
CREATE INDEX audit_log_ts ON audit_log (ts);
