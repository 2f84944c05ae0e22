-- Queued robots whose module cannot take them: moved to another module of their kind, or
-- failed once they waited past the deadline (robotframework_mvp.queue_guard). Run under
-- BEGIN IMMEDIATE, and conditional on status and module.

-- name: reassign_queued_robots
UPDATE robots SET module = :to_module, updated_at = :now
WHERE id IN (
    SELECT id FROM robots
    WHERE status = 'queued' AND module = :module AND kind = :kind
    ORDER BY priority DESC, scheduled_at, id
    LIMIT :limit
) AND status = 'queued' AND module = :module;

-- name: fail_queued_robots
UPDATE robots
SET status = 'failed', error = :error, finished_at = :now, updated_at = :now
WHERE id IN (
    SELECT id FROM robots
    WHERE status = 'queued' AND module = :module AND kind = :kind
      AND scheduled_at <= :due_before
    ORDER BY scheduled_at, id
    LIMIT :limit
) AND status = 'queued' AND module = :module
RETURNING *;
