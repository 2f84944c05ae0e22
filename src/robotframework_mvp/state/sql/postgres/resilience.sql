-- Queued robots whose module cannot take them (circuit open, unhealthy, no live process):
-- moved to another module of their kind, or failed once they waited past the deadline
-- (robotframework_mvp.queue_guard). Both are conditional on status and module, so two
-- processes doing the same never move or fail a robot twice; SKIP LOCKED lets them and
-- the claimers run side by side. The robots_queue index serves both. Each UPDATE joins
-- on the id alone, as claim_robots does and for the same reason: the rows it changes are
-- locked, with that status and module, by the CTE.

-- name: reassign_queued_robots
WITH moving AS MATERIALIZED (
    SELECT id FROM robots
    WHERE status = 'queued' AND module = %(module)s AND kind = %(kind)s
    ORDER BY priority DESC, scheduled_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE robots r SET module = %(to_module)s, updated_at = %(now)s
    FROM moving
    WHERE r.id = moving.id
    RETURNING r.id
), wake AS (
    SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM moved)
)
SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM wake) AS woken;

-- name: fail_queued_robots
WITH due AS MATERIALIZED (
    SELECT id FROM robots
    WHERE status = 'queued' AND module = %(module)s AND kind = %(kind)s
      AND scheduled_at <= %(due_before)s
    ORDER BY scheduled_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE robots r
SET status = 'failed', error = %(error)s::jsonb, finished_at = %(now)s, updated_at = %(now)s
FROM due
WHERE r.id = due.id
RETURNING r.id, r.kind, r.payload, r.owner, r.tenant, r.status, r.module, r.progress,
          r.progress_message, r.attempts, r.max_attempts, r.priority, r.idempotency_key,
          r.result, r.error, r.created_at, r.updated_at, r.started_at, r.finished_at,
          r.scheduled_at, r.lease_token, r.lease_expires_at,
          r.parent_id, r.parent_trigger, r.schedule_id, r.followups;
