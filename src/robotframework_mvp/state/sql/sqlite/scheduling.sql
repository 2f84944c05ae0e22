-- Named queries of robots that run later, on a schedule or in chains (docs/scheduling.md).

-- name: purge_fires
-- A schedule's last_due_at keeps it from firing these due times again.
DELETE FROM schedule_fires WHERE fired_at < :before;

-- name: list_robots_by_due
-- Earliest due first (scheduled_at, then id); the cursor is the last (scheduled_at, id).
SELECT * FROM robots
WHERE (:tenant IS NULL OR tenant = :tenant)
  AND (:status IS NULL OR status = :status)
  AND (:kind IS NULL OR kind = :kind)
  AND (:after_id IS NULL OR scheduled_at > :after_at
       OR (scheduled_at = :after_at AND id > :after_id))
ORDER BY scheduled_at, id
LIMIT :limit;

-- name: insert_schedule
INSERT INTO schedules (id, owner, tenant, cron, timezone, kind, payload, priority,
                       misfire_policy, misfire_limit, paused, last_due_at, next_due_at,
                       created_at, updated_at)
VALUES (:id, :owner, :tenant, :cron, :timezone, :kind, :payload, :priority, :misfire_policy,
        :misfire_limit, :paused, :last_due_at, :next_due_at, :created_at, :updated_at)
RETURNING *;

-- name: get_schedule
SELECT * FROM schedules WHERE id = :id;

-- name: list_schedules
SELECT * FROM schedules
WHERE (:tenant IS NULL OR tenant = :tenant) AND (:after_id IS NULL OR id > :after_id)
ORDER BY id
LIMIT :limit;

-- name: pause_schedule
UPDATE schedules SET paused = 1, updated_at = :now WHERE id = :id RETURNING *;

-- name: resume_schedule
-- Due times that passed while paused are not owed: the schedule restarts from now.
UPDATE schedules
SET paused = 0, last_due_at = :last_due_at, next_due_at = :next_due_at, updated_at = :now
WHERE id = :id AND paused = 1
RETURNING *;

-- name: delete_schedule
DELETE FROM schedules WHERE id = :id;

-- name: delete_schedule_fires
DELETE FROM schedule_fires WHERE schedule_id = :id;

-- name: due_schedules
SELECT * FROM schedules
WHERE paused = 0 AND next_due_at <= :now
ORDER BY next_due_at
LIMIT :limit;

-- name: next_schedule_due_at
SELECT MIN(next_due_at) AS due FROM schedules WHERE paused = 0;

-- name: advance_schedule
-- Compare-and-set: only the process that read this last_due_at decides what fires now.
UPDATE schedules
SET last_due_at = :last_due_at, next_due_at = :next_due_at, updated_at = :now
WHERE id = :id AND last_due_at = :expected_last_due_at AND paused = 0
RETURNING id;

-- name: insert_fire
-- The primary key (schedule_id, due_at) makes each due time fire at most one robot.
INSERT INTO schedule_fires (schedule_id, due_at, robot_id, fired_at, late, covers)
VALUES (:schedule_id, :due_at, :robot_id, :now, :late, :covers)
ON CONFLICT DO NOTHING;

-- name: list_schedule_fires
SELECT * FROM schedule_fires WHERE schedule_id = :schedule_id ORDER BY due_at DESC
LIMIT :limit;
