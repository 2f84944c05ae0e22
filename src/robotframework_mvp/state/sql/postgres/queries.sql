-- Named queries of the PostgreSQL driver (psycopg named parameters).
-- Each robot transition is one conditional statement (WHERE status / lease_token), so a
-- retry after an ambiguous failure finds the condition false and changes nothing.
-- Statements that queue work end with pg_notify on %(channel)s (delivered at commit) so
-- LISTENing workers wake up; the "woken" column only forces the notify CTE to run.

-- name: insert_robots
-- Insert a batch; rows whose id or (owner, idempotency_key) exist already are skipped.
-- Only the ids come back: an inserted row is exactly the robot the caller passed.
-- The batch is one JSON array of rows, each [id, kind, payload, owner, tenant, status,
-- module, max_attempts, priority, idempotency_key, created_at, updated_at, scheduled_at,
-- parent_id, parent_trigger, schedule_id, followups]: one parameter, encoded at once,
-- instead of seventeen arrays whose every element is adapted on its own.
WITH input AS (
    SELECT r ->> 0 AS id, r ->> 1 AS kind, r -> 2 AS payload, r ->> 3 AS owner,
           r ->> 4 AS tenant, r ->> 5 AS status, r ->> 6 AS module,
           (r ->> 7)::integer AS max_attempts, (r ->> 8)::integer AS priority,
           r ->> 9 AS idempotency_key, (r ->> 10)::timestamptz AS created_at,
           (r ->> 11)::timestamptz AS updated_at, (r ->> 12)::timestamptz AS scheduled_at,
           r ->> 13 AS parent_id, r ->> 14 AS parent_trigger, r ->> 15 AS schedule_id,
           NULLIF(r -> 16, 'null'::jsonb) AS followups, n
    FROM jsonb_array_elements(%(robots)s::jsonb) WITH ORDINALITY AS t(r, n)
), ins AS (
    INSERT INTO robots (id, kind, payload, owner, tenant, status, module, max_attempts,
                        priority, idempotency_key, created_at, updated_at, scheduled_at,
                        parent_id, parent_trigger, schedule_id, followups)
    SELECT id, kind, payload, owner, tenant, status, module, max_attempts, priority,
           idempotency_key, created_at, updated_at, scheduled_at, parent_id, parent_trigger,
           schedule_id, followups
    FROM input ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING id, status
), wake AS (
    SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM ins WHERE status = 'queued')
)
SELECT ins.id, (SELECT count(*) FROM wake) AS woken FROM ins;

-- name: insert_claimed_robot
-- A new robot that this process's worker has a free slot for: created and started under a
-- fresh lease in one statement, with its execution; no other worker ever sees it queued.
-- The lease token (the execution's id) comes from the driver, a UUIDv7 as the claims
-- make. Nothing comes back: the driver builds the claim from the robot it wrote
-- (driver.created_claim). An id that exists (a retried call whose first try committed)
-- fails with a unique violation, which the driver takes for "nothing written": no ON
-- CONFLICT, whose speculative insertion costs an index probe and a WAL record each time.
WITH ins AS (
    INSERT INTO robots (id, kind, payload, owner, tenant, status, module, attempts,
                        max_attempts, priority, created_at, updated_at, started_at,
                        scheduled_at, lease_token, lease_expires_at, parent_id,
                        parent_trigger, schedule_id, followups)
    VALUES (%(id)s, %(kind)s, %(payload)s, %(owner)s, %(tenant)s, 'running', %(module)s, 1,
            %(max_attempts)s, %(priority)s, %(created_at)s, %(now)s, %(now)s,
            %(scheduled_at)s, %(lease_token)s, %(lease_expires_at)s, %(parent_id)s,
            %(parent_trigger)s, %(schedule_id)s, %(followups)s)
    RETURNING id, module, lease_token
)
INSERT INTO executions (id, robot_id, module, attempt, status, worker, started_at)
SELECT lease_token, id, module, 1, 'running', %(worker)s, %(now)s FROM ins;

-- name: insert_claimed_robots
-- insert_claimed_robot for a batch, in one statement: one JSON array of rows, each [id,
-- kind, payload, owner, tenant, module, max_attempts, priority, created_at, scheduled_at,
-- parent_id, parent_trigger, schedule_id, followups, lease_token]. A row whose id exists
-- is skipped and comes back absent.
WITH input AS (
    SELECT r ->> 0 AS id, r ->> 1 AS kind, r -> 2 AS payload, r ->> 3 AS owner,
           r ->> 4 AS tenant, r ->> 5 AS module, (r ->> 6)::integer AS max_attempts,
           (r ->> 7)::integer AS priority, (r ->> 8)::timestamptz AS created_at,
           (r ->> 9)::timestamptz AS scheduled_at, r ->> 10 AS parent_id,
           r ->> 11 AS parent_trigger, r ->> 12 AS schedule_id,
           NULLIF(r -> 13, 'null'::jsonb) AS followups, r ->> 14 AS lease_token, n
    FROM jsonb_array_elements(%(robots)s::jsonb) WITH ORDINALITY AS t(r, n)
), ins AS (
    INSERT INTO robots (id, kind, payload, owner, tenant, status, module, attempts,
                        max_attempts, priority, created_at, updated_at, started_at,
                        scheduled_at, lease_token, lease_expires_at, parent_id,
                        parent_trigger, schedule_id, followups)
    SELECT id, kind, payload, owner, tenant, 'running', module, 1, max_attempts, priority,
           created_at, %(now)s, %(now)s, scheduled_at, lease_token,
           %(lease_expires_at)s, parent_id, parent_trigger, schedule_id, followups
    FROM input ORDER BY n
    ON CONFLICT DO NOTHING
    RETURNING id, module, lease_token
), execution AS (
    INSERT INTO executions (id, robot_id, module, attempt, status, worker, started_at)
    SELECT lease_token, id, module, 1, 'running', %(worker)s, %(now)s FROM ins
)
SELECT id, lease_token FROM ins;

-- name: get_stored_robots
-- After a skipped insert: the robots stored under these ids or (owner, idempotency_key).
SELECT id, kind, payload, owner, tenant, status, module, progress, progress_message, attempts,
       max_attempts, priority, idempotency_key, result, error, created_at, updated_at,
       started_at, finished_at, scheduled_at, lease_token, lease_expires_at, parent_id,
       parent_trigger, schedule_id, followups
FROM robots WHERE id = ANY(%(ids)b::text[])
UNION ALL
SELECT id, kind, payload, owner, tenant, status, module, progress, progress_message, attempts,
       max_attempts, priority, idempotency_key, result, error, created_at, updated_at,
       started_at, finished_at, scheduled_at, lease_token, lease_expires_at, parent_id,
       parent_trigger, schedule_id, followups
FROM robots
WHERE (owner, idempotency_key) IN (
    SELECT * FROM unnest(%(owners)b::text[], %(idempotency_keys)b::text[]))
  AND NOT id = ANY(%(ids)b::text[]);

-- name: get_robot
SELECT id, kind, payload, owner, tenant, status, module, progress, progress_message, attempts,
       max_attempts, priority, idempotency_key, result, error, created_at, updated_at,
       started_at, finished_at, scheduled_at, lease_token, lease_expires_at, parent_id,
       parent_trigger, schedule_id, followups
FROM robots WHERE id = %(id)s;

-- name: get_robots
SELECT id, kind, payload, owner, tenant, status, module, progress, progress_message, attempts,
       max_attempts, priority, idempotency_key, result, error, created_at, updated_at,
       started_at, finished_at, scheduled_at, lease_token, lease_expires_at, parent_id,
       parent_trigger, schedule_id, followups
FROM robots WHERE id = ANY(%(ids)s::text[]);

-- name: list_robots
-- Newest first; NULL filters match everything.
SELECT id, kind, payload, owner, tenant, status, module, progress, progress_message, attempts,
       max_attempts, priority, idempotency_key, result, error, created_at, updated_at,
       started_at, finished_at, scheduled_at, lease_token, lease_expires_at, parent_id,
       parent_trigger, schedule_id, followups
FROM robots
WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
  AND (%(before_id)s::text IS NULL OR id < %(before_id)s::text)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: claim_robots
-- Take due robots with SKIP LOCKED (concurrent claimers never wait on nor share a row),
-- start them under a fresh lease token each and write their executions, in one statement.
-- The UPDATE joins on the id alone: the rows are locked, queued, by `due`, and nothing
-- else can change them first. A status test there too would let a plan made while the
-- table was empty (psycopg prepares it, PostgreSQL keeps the generic plan) walk every
-- queued robot through robots_queue for each one claimed: 20-200 ms a claim at 20,000
-- queued, until the next ANALYZE. Without it the only cheap plan is by robots_pkey.
WITH due AS MATERIALIZED (
    SELECT id FROM robots
    WHERE status = 'queued' AND module = %(module)s AND scheduled_at <= %(now)s
    ORDER BY priority DESC, scheduled_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE robots r
    SET status = 'running', attempts = r.attempts + 1,
        -- A UUIDv7 (time-ordered) like every execution id: the leader's scoring reads the
        -- recent executions by id range (background.execution_id_floor).
        lease_token = encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing
        substring(int8send((extract(epoch FROM %(now)s::timestamptz) * 1000)::bigint) FROM 3)
        FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid::text,
        lease_expires_at = %(lease_expires_at)s, started_at = COALESCE(r.started_at, %(now)s),
        updated_at = %(now)s
    FROM due
    WHERE r.id = due.id
    RETURNING r.id, r.kind, r.payload, r.owner, r.tenant, r.status, r.module, r.progress,
              r.progress_message, r.attempts, r.max_attempts, r.priority, r.idempotency_key,
              r.result, r.error, r.created_at, r.updated_at, r.started_at, r.finished_at,
              r.scheduled_at, r.lease_token, r.lease_expires_at,
              r.parent_id, r.parent_trigger, r.schedule_id, r.followups
), execution AS (
    INSERT INTO executions (id, robot_id, module, attempt, status, worker, started_at)
    SELECT lease_token, id, %(module)s, attempts, 'running', %(worker)s, %(now)s FROM claimed
)
SELECT * FROM claimed ORDER BY priority DESC, scheduled_at, id;

-- name: renew_leases
UPDATE robots r SET lease_expires_at = %(lease_expires_at)s
FROM unnest(%(ids)b::text[], %(tokens)b::text[]) AS l(id, token)
WHERE r.id = l.id AND r.lease_token = l.token AND r.status = 'running'
RETURNING r.id;

-- name: update_progress
UPDATE robots
SET progress = GREATEST(progress, %(progress)s), progress_message = %(message)s,
    updated_at = %(now)s
WHERE id = %(id)s AND lease_token = %(lease_token)s AND status = 'running'
RETURNING id, kind, payload, owner, tenant, status, module, progress, progress_message,
              attempts, max_attempts, priority, idempotency_key, result, error, created_at,
              updated_at, started_at, finished_at, scheduled_at, lease_token,
              lease_expires_at, parent_id, parent_trigger, schedule_id, followups;

-- name: update_progress_many
-- update_progress for a batch: each parameter is the array of update_progress's parameter
-- of the same name. Ids are unique within a batch.
UPDATE robots r
SET progress = GREATEST(r.progress, i.progress), progress_message = i.message,
    updated_at = %(now)s
FROM unnest(%(id)b::text[], %(lease_token)b::text[], %(progress)b::float8[],
            %(message)b::text[]) AS i(id, token, progress, message)
WHERE r.id = i.id AND r.lease_token = i.token AND r.status = 'running'
RETURNING r.id, r.kind, r.payload, r.owner, r.tenant, r.status, r.module, r.progress,
          r.progress_message, r.attempts, r.max_attempts, r.priority, r.idempotency_key,
          r.result, r.error, r.created_at, r.updated_at, r.started_at, r.finished_at,
          r.scheduled_at, r.lease_token, r.lease_expires_at, r.parent_id, r.parent_trigger,
          r.schedule_id, r.followups;

-- name: complete_robots
-- End a batch of attempts in one statement: each robot to its terminal status, or back
-- to queued for a retry; its execution; a chain's follow-up. A row whose lease is gone
-- (cancelled, reaped, completed already) matches nothing and comes back absent.
-- The batch is one JSON array, each [id, lease_token, status, execution_status, result,
-- error, now, duration_ms, scheduled_at, module, child_id, child_kind, child_payload,
-- child_module, child_max_attempts, child_trigger]: one parameter, encoded at once.
-- Only what the caller cannot know comes back (progress, its message, the result as
-- stored): the rest of each row is as its claim returned it (state.driver.ended_robot).
WITH input AS (
    SELECT c ->> 0 AS id, c ->> 1 AS token, c ->> 2 AS status, c ->> 3 AS execution_status,
           NULLIF(c -> 4, 'null'::jsonb) AS result, NULLIF(c -> 5, 'null'::jsonb) AS error,
           (c ->> 6)::timestamptz AS now, (c ->> 7)::float8 AS duration_ms,
           (c ->> 8)::timestamptz AS scheduled_at, c ->> 9 AS module, c ->> 10 AS child_id,
           c ->> 11 AS child_kind, c -> 12 AS child_payload, c ->> 13 AS child_module,
           (c ->> 14)::integer AS child_max_attempts, c ->> 15 AS child_trigger
    FROM jsonb_array_elements(%(completions)s::jsonb) AS t(c)
), done AS (
    UPDATE robots r
    SET status = i.status,
        result = i.result,
        error = i.error,
        progress = CASE WHEN i.status = 'succeeded' THEN 100 ELSE r.progress END,
        finished_at = CASE WHEN i.status = 'queued' THEN NULL ELSE i.now END,
        scheduled_at = COALESCE(i.scheduled_at, r.scheduled_at),
        module = COALESCE(i.module, r.module),
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = i.now
    FROM input i
    WHERE r.id = i.id AND r.lease_token = i.token AND r.status = 'running'
    RETURNING r.id, r.status, r.owner, r.tenant, r.priority, r.progress, r.progress_message,
              r.result
), execution AS (
    UPDATE executions e
    SET status = i.execution_status, finished_at = i.now, duration_ms = i.duration_ms,
        error = i.error
    FROM input i JOIN done ON done.id = i.id
    WHERE e.id = i.token AND e.status = 'running'
), child AS (
    -- A chain's follow-up, created with the completion or not at all; the unique
    -- (parent_id, parent_trigger) index makes a duplicate completion create nothing.
    INSERT INTO robots (id, kind, payload, owner, tenant, status, module, max_attempts,
                        priority, created_at, updated_at, scheduled_at, parent_id,
                        parent_trigger)
    SELECT i.child_id, i.child_kind, i.child_payload, done.owner, done.tenant, 'queued',
           i.child_module, i.child_max_attempts, done.priority, i.now, i.now, i.now,
           done.id, i.child_trigger
    FROM input i JOIN done ON done.id = i.id
    WHERE i.child_id IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING id
), wake AS (
    SELECT pg_notify(%(channel)s, '')
    WHERE EXISTS (SELECT 1 FROM done WHERE status = 'queued') OR EXISTS (SELECT 1 FROM child)
)
SELECT done.id, done.progress, done.progress_message, done.result,
       (SELECT count(*) FROM wake) AS woken, (SELECT count(*) FROM child) AS children
FROM done;

-- name: complete_robot
-- complete_robots for one attempt (the common case when idle), without the JSON batch:
-- the same writes, planned and run faster for a single row. Keep the two in step. Like
-- complete_robots it returns only what the completion did not set (driver.ended_robot).
WITH done AS (
    UPDATE robots
    SET status = %(status)s::text,
        result = %(result)s::jsonb,
        error = %(error)s::jsonb,
        progress = CASE WHEN %(status)s::text = 'succeeded' THEN 100 ELSE progress END,
        finished_at = CASE WHEN %(status)s::text = 'queued' THEN NULL ELSE %(now)s END,
        scheduled_at = COALESCE(%(scheduled_at)s::timestamptz, scheduled_at),
        module = COALESCE(%(module)s::text, module),
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = %(now)s
    WHERE id = %(id)s AND lease_token = %(lease_token)s AND status = 'running'
    RETURNING id, kind, payload, owner, tenant, status, module, progress, progress_message,
              attempts, max_attempts, priority, idempotency_key, result, error, created_at,
              updated_at, started_at, finished_at, scheduled_at, lease_token,
              lease_expires_at, parent_id, parent_trigger, schedule_id, followups
), execution AS (
    UPDATE executions
    SET status = %(execution_status)s, finished_at = %(now)s, duration_ms = %(duration_ms)s,
        error = %(error)s::jsonb
    WHERE id = %(lease_token)s AND status = 'running' AND EXISTS (SELECT 1 FROM done)
), child AS (
    -- The follow-up of a chain, created with the completion or not at all; the unique
    -- (parent_id, parent_trigger) index makes a duplicate completion create nothing.
    INSERT INTO robots (id, kind, payload, owner, tenant, status, module, max_attempts,
                        priority, created_at, updated_at, scheduled_at, parent_id,
                        parent_trigger)
    SELECT %(child_id)s::text, %(child_kind)s::text, %(child_payload)s::jsonb,
           done.owner, done.tenant, 'queued', %(child_module)s::text,
           %(child_max_attempts)s::integer, done.priority, %(now)s, %(now)s, %(now)s,
           done.id, %(child_trigger)s::text
    FROM done WHERE %(child_id)s::text IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING id
), wake AS (
    SELECT pg_notify(%(channel)s, '')
    WHERE EXISTS (SELECT 1 FROM done WHERE status = 'queued') OR EXISTS (SELECT 1 FROM child)
)
SELECT done.id, done.progress, done.progress_message, done.result,
       (SELECT count(*) FROM wake) AS woken, (SELECT count(*) FROM child) AS children
FROM done;

-- name: cancel_robot
WITH cancelled AS (
    UPDATE robots
    SET status = 'cancelled', finished_at = %(now)s, updated_at = %(now)s, lease_token = NULL,
        lease_expires_at = NULL,
        error = '{"type": "cancelled", "message": "cancelled by request"}'::jsonb
    WHERE id = %(id)s AND status IN ('pending', 'queued', 'running')
    RETURNING id, kind, payload, owner, tenant, status, module, progress, progress_message,
              attempts, max_attempts, priority, idempotency_key, result, error, created_at,
              updated_at, started_at, finished_at, scheduled_at, lease_token,
              lease_expires_at, parent_id, parent_trigger, schedule_id, followups
), execution AS (
    UPDATE executions
    SET status = 'cancelled', finished_at = %(now)s,
        duration_ms = EXTRACT(EPOCH FROM (%(now)s - started_at)) * 1000.0
    WHERE robot_id = %(id)s AND status = 'running' AND EXISTS (SELECT 1 FROM cancelled)
)
SELECT * FROM cancelled;

-- name: release_robots
-- Graceful stop: back to the queue, and the attempt is not charged.
WITH released AS (
    UPDATE robots r
    SET status = 'queued', attempts = r.attempts - 1, lease_token = NULL,
        lease_expires_at = NULL, scheduled_at = %(now)s, updated_at = %(now)s
    FROM unnest(%(ids)b::text[], %(tokens)b::text[]) AS l(id, token)
    WHERE r.id = l.id AND r.lease_token = l.token AND r.status = 'running'
    RETURNING l.token
), execution AS (
    UPDATE executions e
    SET status = 'released', finished_at = %(now)s,
        duration_ms = EXTRACT(EPOCH FROM (%(now)s - e.started_at)) * 1000.0, error = NULL
    FROM released
    WHERE e.id = released.token AND e.status = 'running'
), wake AS (
    SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM released)
)
SELECT (SELECT count(*) FROM released) AS released, (SELECT count(*) FROM wake) AS woken;

-- name: reap_expired_leases
-- Workers died holding these robots: retry each, or fail it when out of attempts.
-- SKIP LOCKED lets several reapers (and workers renewing) run side by side.
WITH expired AS MATERIALIZED (
    SELECT id, lease_token FROM robots
    WHERE status = 'running' AND lease_expires_at < %(now)s
    ORDER BY lease_expires_at
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
), reaped AS (
    UPDATE robots r
    SET status = CASE WHEN r.attempts < r.max_attempts THEN 'queued' ELSE 'failed' END,
        error = CASE WHEN r.attempts < r.max_attempts THEN r.error ELSE %(error)s::jsonb END,
        finished_at = CASE WHEN r.attempts < r.max_attempts THEN NULL ELSE %(now)s END,
        scheduled_at = %(now)s, lease_token = NULL, lease_expires_at = NULL,
        updated_at = %(now)s
    FROM expired
    WHERE r.id = expired.id AND r.lease_token = expired.lease_token AND r.status = 'running'
    RETURNING r.id, r.kind, r.payload, r.owner, r.tenant, r.status, r.module, r.progress,
              r.progress_message, r.attempts, r.max_attempts, r.priority, r.idempotency_key,
              r.result, r.error, r.created_at, r.updated_at, r.started_at, r.finished_at,
              r.scheduled_at, r.lease_token, r.lease_expires_at,
              r.parent_id, r.parent_trigger, r.schedule_id, r.followups,
              expired.lease_token AS reaped_token
), execution AS (
    UPDATE executions e
    SET status = 'lost', finished_at = %(now)s,
        duration_ms = EXTRACT(EPOCH FROM (%(now)s - e.started_at)) * 1000.0,
        error = %(error)s::jsonb
    FROM reaped
    WHERE e.id = reaped.reaped_token AND e.status = 'running'
), wake AS (
    SELECT pg_notify(%(channel)s, '')
    WHERE EXISTS (SELECT 1 FROM reaped WHERE status = 'queued')
)
SELECT reaped.*, (SELECT count(*) FROM wake) AS woken FROM reaped ORDER BY reaped.id;

-- name: requeue_robot
WITH requeued AS (
    UPDATE robots
    SET status = 'queued', max_attempts = attempts + %(extra_attempts)s, error = NULL,
        result = NULL, finished_at = NULL, progress = 0, progress_message = NULL,
        scheduled_at = %(now)s, updated_at = %(now)s
    WHERE id = %(id)s AND status IN ('failed', 'timed_out')
    RETURNING id, kind, payload, owner, tenant, status, module, progress, progress_message,
              attempts, max_attempts, priority, idempotency_key, result, error, created_at,
              updated_at, started_at, finished_at, scheduled_at, lease_token,
              lease_expires_at, parent_id, parent_trigger, schedule_id, followups
), wake AS (
    SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM requeued)
)
SELECT requeued.*, (SELECT count(*) FROM wake) AS woken FROM requeued;

-- name: next_due_at
SELECT MIN(scheduled_at) AS due FROM robots
WHERE status = 'queued' AND module = ANY(%(modules)b::text[]);

-- name: list_executions
SELECT id, robot_id, module, attempt, status, worker, started_at, finished_at, duration_ms,
       error
FROM executions WHERE robot_id = %(robot_id)s ORDER BY attempt, started_at;

-- name: upsert_module
INSERT INTO modules (name, kinds, capacity, health, last_check_at, score, success_rate,
                     latency_ewma_ms, circuit_state, load, max_attempts, updated_at)
VALUES (%(name)s, %(kinds)s, %(capacity)s, %(health)s, %(last_check_at)s, %(score)s,
        %(success_rate)s, %(latency_ewma_ms)s, %(circuit_state)s, %(load)s, %(max_attempts)s, %(now)s)
ON CONFLICT (name) DO UPDATE SET
    kinds = excluded.kinds, capacity = excluded.capacity, health = excluded.health,
    last_check_at = excluded.last_check_at, score = excluded.score,
    success_rate = excluded.success_rate, latency_ewma_ms = excluded.latency_ewma_ms,
    circuit_state = excluded.circuit_state, load = excluded.load,
    max_attempts = excluded.max_attempts, updated_at = excluded.updated_at;

-- name: list_modules
SELECT name, kinds, capacity, health, last_check_at, score, success_rate, latency_ewma_ms,
       circuit_state, load, max_attempts, updated_at
FROM modules ORDER BY name;

-- name: lock_audit_chain
-- Serialises appends to the chain across processes until the transaction ends. It must be
-- its own statement: a statement's snapshot is taken before it waits for the lock, so the
-- last hash has to be read by the next statement.
SELECT pg_advisory_xact_lock(%(lock_class)s::integer,
                             hashtext(COALESCE(current_schema(), '')));

-- name: last_audit_hash
SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1;

-- name: audit_hash_exists
-- Did an earlier attempt of this append commit after all? (ts narrows to the index.)
SELECT 1 AS found FROM audit_log WHERE ts = %(ts)s AND hash = %(hash)s;

-- name: insert_audit
-- A batch of chained records in one statement, as one JSON array of records, each
-- [ts, principal, action, target, outcome, client, request_id, details, prev_hash, hash]:
-- one parameter to encode instead of ten arrays of a value each. seq follows the order.
INSERT INTO audit_log (ts, principal, action, target, outcome, client, request_id, details,
                       prev_hash, hash)
SELECT (r ->> 0)::timestamptz, r ->> 1, r ->> 2, r ->> 3, r ->> 4, r ->> 5, r ->> 6, r -> 7,
       r ->> 8, r ->> 9
FROM jsonb_array_elements(%(records)s::jsonb) WITH ORDINALITY AS t(r, n)
ORDER BY n;

-- name: list_audit
SELECT seq, ts, principal, action, target, outcome, client, request_id, details, prev_hash,
       hash
FROM audit_log WHERE seq > %(after_seq)s ORDER BY seq LIMIT %(limit)s;

-- name: count_robots
SELECT kind, status, COUNT(*) AS n FROM robots GROUP BY kind, status;

-- name: queue_stats
SELECT COUNT(*) AS n, MIN(scheduled_at) AS oldest FROM robots
WHERE status = 'queued' AND scheduled_at <= %(now)s;

-- name: purge
-- Finished robots older than the cutoff with their executions, and
-- old schedule fires (a schedule's last_due_at keeps it from firing those again).
WITH fires_gone AS (
    DELETE FROM schedule_fires WHERE fired_at < %(before)s
), robots_gone AS (
    DELETE FROM robots WHERE finished_at IS NOT NULL AND finished_at < %(before)s
    RETURNING id
), executions_gone AS (
    DELETE FROM executions WHERE robot_id IN (SELECT id FROM robots_gone)
)
SELECT count(*) AS n FROM robots_gone;

-- name: lock_migrations
-- Serialises migrations of this schema across processes until the transaction ends.
SELECT pg_advisory_xact_lock(%(lock_class)s::integer,
                             hashtext(COALESCE(current_schema(), '')));

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migration_applied
SELECT 1 AS found FROM schema_migrations WHERE version = %(version)s;

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: current_schema
SELECT current_schema() AS schema;

-- name: recent_outcomes
-- Finished attempts since an execution id (UUIDv7: time-ordered, so the primary key
-- index serves the range), newest first: what the leader scores modules from.
SELECT module, status, duration_ms FROM executions
WHERE id >= %(since_id)s AND duration_ms IS NOT NULL
  AND status IN ('succeeded', 'failed', 'timed_out')
ORDER BY id DESC LIMIT %(limit)s;
