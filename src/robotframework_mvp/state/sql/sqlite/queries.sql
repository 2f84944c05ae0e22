-- name: insert_robot
-- Insert a robot unless its (owner, idempotency_key) exists already.
-- A chain's child whose (parent_id, parent_trigger) exists is skipped the same way.
INSERT INTO robots (id, kind, payload, owner, tenant, status, module, progress, progress_message,
                    attempts, max_attempts, priority, idempotency_key, created_at, updated_at,
                    scheduled_at, parent_id, parent_trigger, schedule_id, followups)
VALUES (:id, :kind, :payload, :owner, :tenant, :status, :module, 0, NULL, 0, :max_attempts,
        :priority, :idempotency_key, :created_at, :updated_at, :scheduled_at, :parent_id,
        :parent_trigger, :schedule_id, :followups)
ON CONFLICT DO NOTHING;

-- name: insert_claimed_robot
-- A new robot that this process's worker has a free slot for: created running under the
-- lease :lease_token (its execution is inserted next, in the same transaction), so no
-- other worker ever sees it queued. Nothing is written if the id exists.
INSERT INTO robots (id, kind, payload, owner, tenant, status, module, progress, progress_message,
                    attempts, max_attempts, priority, idempotency_key, created_at, updated_at,
                    started_at, scheduled_at, lease_token, lease_expires_at, parent_id,
                    parent_trigger, schedule_id, followups)
VALUES (:id, :kind, :payload, :owner, :tenant, 'running', :module, 0, NULL, 1, :max_attempts,
        :priority, NULL, :created_at, :now, :now, :scheduled_at, :lease_token,
        :lease_expires_at, :parent_id, :parent_trigger, :schedule_id, :followups)
ON CONFLICT DO NOTHING;

-- name: get_robot
SELECT * FROM robots WHERE id = :id;

-- name: get_robots
-- :ids is a JSON array of robot ids.
SELECT * FROM robots WHERE id IN (SELECT value FROM json_each(:ids));

-- name: get_robot_by_idempotency_key
SELECT * FROM robots WHERE owner = :owner AND idempotency_key = :idempotency_key;

-- name: list_robots
-- Newest first; NULL filters match everything.
SELECT * FROM robots
WHERE (:tenant IS NULL OR tenant = :tenant)
  AND (:status IS NULL OR status = :status)
  AND (:kind IS NULL OR kind = :kind)
  AND (:before_id IS NULL OR id < :before_id)
ORDER BY id DESC
LIMIT :limit;

-- name: claim_due_robots
-- Claim up to :limit due robots of a module in one statement, under the write lock of
-- BEGIN IMMEDIATE. Each gets a fresh UUIDv7 lease token built here: the millisecond
-- timestamp comes in as hex (:ms_hex8, :ms_hex4), then version 7, the variant, and 74
-- random bits. Tokens are execution ids, which the leader's scoring reads by time range.
UPDATE robots
SET status = 'running', attempts = attempts + 1,
    lease_token = :ms_hex8 || '-' || :ms_hex4 || '-7' || substr(lower(hex(randomblob(2))), 2)
        || '-' || substr('89ab', 1 + (random() & 3), 1) || substr(lower(hex(randomblob(2))), 2)
        || '-' || lower(hex(randomblob(6))),
    lease_expires_at = :lease_expires_at, started_at = COALESCE(started_at, :now),
    updated_at = :now
WHERE id IN (SELECT id FROM robots
             WHERE status = 'queued' AND module = :module AND scheduled_at <= :now
             ORDER BY priority DESC, scheduled_at, id
             LIMIT :limit)
RETURNING *;

-- name: insert_claimed_executions
-- The running execution of each robot just claimed (:ids, a JSON array); its id is the
-- robot's lease token.
INSERT INTO executions (id, robot_id, module, attempt, status, worker, started_at)
SELECT lease_token, id, :module, attempts, 'running', :worker, :now
FROM robots WHERE id IN (SELECT value FROM json_each(:ids));

-- name: insert_execution
INSERT INTO executions (id, robot_id, module, attempt, status, worker, started_at)
VALUES (:id, :robot_id, :module, :attempt, 'running', :worker, :started_at);

-- name: renew_lease
UPDATE robots SET lease_expires_at = :lease_expires_at
WHERE id = :id AND lease_token = :lease_token AND status = 'running'
RETURNING id;

-- name: update_progress
UPDATE robots
SET progress = MAX(progress, :progress), progress_message = :message, updated_at = :now
WHERE id = :id AND lease_token = :lease_token AND status = 'running'
RETURNING *;

-- name: update_progress_many
-- update_progress for a batch: :reports is a JSON array of [id, lease_token, progress,
-- message]. Ids are unique within a batch; the unary + keeps the planner on the key.
UPDATE robots
SET progress = MAX(progress, json_extract(p.value, '$[2]')),
    progress_message = json_extract(p.value, '$[3]'), updated_at = :now
FROM json_each(:reports) AS p
WHERE robots.id = json_extract(p.value, '$[0]')
  AND robots.lease_token = json_extract(p.value, '$[1]')
  AND +robots.status = 'running'
RETURNING *;

-- name: complete_robots
-- End a batch of attempts, each with a terminal status or back to queued for a retry:
-- :completions is a JSON array of [id, lease_token, status, result, error, now,
-- scheduled_at, module], result and error as JSON text. Ids are unique within a batch.
-- The unary + keeps the planner on the primary key (the status index would scan every
-- running robot per completion). It returns only what the caller cannot know: the rest
-- of each row is as its claim returned it (see finish_robots).
UPDATE robots
SET status = json_extract(c.value, '$[2]'),
    result = json_extract(c.value, '$[3]'),
    error = json_extract(c.value, '$[4]'),
    progress = CASE WHEN json_extract(c.value, '$[2]') = 'succeeded' THEN 100 ELSE progress END,
    finished_at = CASE WHEN json_extract(c.value, '$[2]') = 'queued' THEN NULL
                       ELSE json_extract(c.value, '$[5]') END,
    scheduled_at = COALESCE(json_extract(c.value, '$[6]'), scheduled_at),
    module = COALESCE(json_extract(c.value, '$[7]'), module),
    lease_token = NULL,
    lease_expires_at = NULL,
    updated_at = json_extract(c.value, '$[5]')
FROM json_each(:completions) AS c
WHERE robots.id = json_extract(c.value, '$[0]')
  AND robots.lease_token = json_extract(c.value, '$[1]')
  AND +robots.status = 'running'
RETURNING robots.id, robots.progress, robots.progress_message, robots.result;

-- name: finish_robots
-- complete_robots for a batch without retries (every status terminal, no scheduled_at or
-- module; the caller checks): scheduled_at and module stay out of SET, as SQLite rewrites the entries of
-- every index over a column that SET assigns, even to the value it had (three indexes).
UPDATE robots
SET status = json_extract(c.value, '$[2]'),
    result = json_extract(c.value, '$[3]'),
    error = json_extract(c.value, '$[4]'),
    progress = CASE WHEN json_extract(c.value, '$[2]') = 'succeeded' THEN 100 ELSE progress END,
    finished_at = json_extract(c.value, '$[5]'),
    lease_token = NULL,
    lease_expires_at = NULL,
    updated_at = json_extract(c.value, '$[5]')
FROM json_each(:completions) AS c
WHERE robots.id = json_extract(c.value, '$[0]')
  AND robots.lease_token = json_extract(c.value, '$[1]')
  AND +robots.status = 'running'
RETURNING robots.id, robots.progress, robots.progress_message, robots.result;

-- name: finish_executions
-- finish_execution for a batch: :executions is a JSON array of
-- [id, status, finished_at, duration_ms, error].
UPDATE executions
SET status = json_extract(e.value, '$[1]'), finished_at = json_extract(e.value, '$[2]'),
    duration_ms = json_extract(e.value, '$[3]'), error = json_extract(e.value, '$[4]')
FROM json_each(:executions) AS e
WHERE executions.id = json_extract(e.value, '$[0]') AND +executions.status = 'running';

-- name: cancel_robot
UPDATE robots
SET status = 'cancelled', finished_at = :now, updated_at = :now, lease_token = NULL,
    lease_expires_at = NULL,
    error = '{"type": "cancelled", "message": "cancelled by request"}'
WHERE id = :id AND status IN ('pending', 'queued', 'running')
RETURNING *;

-- name: cancel_executions
UPDATE executions
SET status = 'cancelled', finished_at = :now,
    duration_ms = (:now - started_at) * 1000.0
WHERE robot_id = :robot_id AND status = 'running';

-- name: release_robot
-- Graceful stop: back to the queue, and the attempt is not charged.
UPDATE robots
SET status = 'queued', attempts = attempts - 1, lease_token = NULL, lease_expires_at = NULL,
    scheduled_at = :now, updated_at = :now
WHERE id = :id AND lease_token = :lease_token AND status = 'running'
RETURNING id;

-- name: mark_execution
UPDATE executions
SET status = :status, finished_at = :now, duration_ms = (:now - started_at) * 1000.0,
    error = :error
WHERE id = :id AND status = 'running';

-- name: select_expired_leases
SELECT id, lease_token FROM robots
WHERE status = 'running' AND lease_expires_at < :now
LIMIT 1000;

-- name: reap_robot
-- A worker died holding this robot: retry it, or fail it when out of attempts.
UPDATE robots
SET status = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END,
    error = CASE WHEN attempts < max_attempts THEN error ELSE :error END,
    finished_at = CASE WHEN attempts < max_attempts THEN NULL ELSE :now END,
    scheduled_at = :now, lease_token = NULL, lease_expires_at = NULL, updated_at = :now
WHERE id = :id AND lease_token = :lease_token AND status = 'running'
RETURNING *;

-- name: requeue_robot
UPDATE robots
SET status = 'queued', max_attempts = attempts + :extra_attempts, error = NULL, result = NULL,
    finished_at = NULL, progress = 0, progress_message = NULL, scheduled_at = :now,
    updated_at = :now
WHERE id = :id AND status IN ('failed', 'timed_out')
RETURNING *;

-- name: next_due_at
SELECT MIN(scheduled_at) AS due FROM robots
WHERE status = 'queued' AND module IN (SELECT value FROM json_each(:modules));

-- name: list_executions
SELECT * FROM executions WHERE robot_id = :robot_id ORDER BY attempt, started_at;

-- name: upsert_module
INSERT INTO modules (name, kinds, capacity, health, last_check_at, score, success_rate,
                     latency_ewma_ms, circuit_state, load, max_attempts, updated_at)
VALUES (:name, :kinds, :capacity, :health, :last_check_at, :score, :success_rate,
        :latency_ewma_ms, :circuit_state, :load, :max_attempts, :now)
ON CONFLICT (name) DO UPDATE SET
    kinds = excluded.kinds, capacity = excluded.capacity, health = excluded.health,
    last_check_at = excluded.last_check_at, score = excluded.score,
    success_rate = excluded.success_rate, latency_ewma_ms = excluded.latency_ewma_ms,
    circuit_state = excluded.circuit_state, load = excluded.load,
    max_attempts = excluded.max_attempts, updated_at = excluded.updated_at;

-- name: list_modules
SELECT * FROM modules ORDER BY name;

-- name: last_audit_hash
SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1;

-- name: insert_audit
-- A batch of chained records in one statement, as one JSON array of records, each
-- [ts, principal, action, target, outcome, client, request_id, details, prev_hash, hash]
-- (details as JSON text): SQLite inserts them all in one step. seq follows the order.
INSERT INTO audit_log (ts, principal, action, target, outcome, client, request_id, details,
                       prev_hash, hash)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       json_extract(value, '$[6]'), json_extract(value, '$[7]'), json_extract(value, '$[8]'),
       json_extract(value, '$[9]')
FROM json_each(:records)
ORDER BY key;

-- name: list_audit
SELECT * FROM audit_log WHERE seq > :after_seq ORDER BY seq LIMIT :limit;

-- name: count_robots
SELECT kind, status, COUNT(*) AS n FROM robots GROUP BY kind, status;

-- name: queue_stats
SELECT COUNT(*) AS n, MIN(scheduled_at) AS oldest FROM robots
WHERE status = 'queued' AND scheduled_at <= :now;

-- name: purge_executions
DELETE FROM executions WHERE robot_id IN (
    SELECT id FROM robots WHERE finished_at IS NOT NULL AND finished_at < :before);

-- name: purge_robots
DELETE FROM robots WHERE finished_at IS NOT NULL AND finished_at < :before;

-- name: recent_outcomes
-- Finished attempts since an execution id (UUIDv7: time-ordered, so the primary key
-- index serves the range), newest first: what the leader scores modules from.
SELECT module, status, duration_ms FROM executions
WHERE id >= :since_id AND duration_ms IS NOT NULL
  AND status IN ('succeeded', 'failed', 'timed_out')
ORDER BY id DESC LIMIT :limit;
