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

-- name: get_robot
SELECT * FROM robots WHERE id = :id;

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

-- name: select_due_robots
-- Candidates for a claim, taken under the write lock of BEGIN IMMEDIATE.
SELECT id FROM robots
WHERE status = 'queued' AND module = :module AND scheduled_at <= :now
ORDER BY priority DESC, scheduled_at, id
LIMIT :limit;

-- name: claim_robot
UPDATE robots
SET status = 'running', attempts = attempts + 1, lease_token = :lease_token,
    lease_expires_at = :lease_expires_at, started_at = COALESCE(started_at, :now),
    updated_at = :now
WHERE id = :id AND status = 'queued'
RETURNING *;

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

-- name: complete_robot
-- End an attempt: terminal status, or back to queued for a retry.
UPDATE robots
SET status = :status,
    result = :result,
    error = :error,
    progress = CASE WHEN :status = 'succeeded' THEN 100 ELSE progress END,
    finished_at = CASE WHEN :status = 'queued' THEN NULL ELSE :now END,
    scheduled_at = COALESCE(:scheduled_at, scheduled_at),
    module = COALESCE(:module, module),
    lease_token = NULL,
    lease_expires_at = NULL,
    updated_at = :now
WHERE id = :id AND lease_token = :lease_token AND status = 'running'
RETURNING *;

-- name: finish_execution
UPDATE executions
SET status = :status, finished_at = :finished_at, duration_ms = :duration_ms, error = :error
WHERE id = :id AND status = 'running';

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
INSERT INTO audit_log (ts, principal, action, target, outcome, client, request_id, details,
                       prev_hash, hash)
VALUES (:ts, :principal, :action, :target, :outcome, :client, :request_id, :details,
        :prev_hash, :hash);

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
