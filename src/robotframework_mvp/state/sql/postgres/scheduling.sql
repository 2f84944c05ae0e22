-- Named queries of robots that run later, on a schedule or in chains (docs/scheduling.md).

-- name: list_robots_by_due
-- Earliest due first (scheduled_at, then id); the cursor is the last (scheduled_at, id).
SELECT id, kind, payload, owner, tenant, status, module, progress, progress_message, attempts,
       max_attempts, priority, idempotency_key, result, error, created_at, updated_at,
       started_at, finished_at, scheduled_at, lease_token, lease_expires_at, parent_id,
       parent_trigger, schedule_id, followups
FROM robots
WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
  AND (%(after_id)s::text IS NULL
       OR (scheduled_at, id) > (%(after_at)s::timestamptz, %(after_id)s::text))
ORDER BY scheduled_at, id
LIMIT %(limit)s;

-- name: insert_followups
-- Children of ended parents (the reaper's path); an existing (parent, trigger) is skipped.
WITH ins AS (
    INSERT INTO robots (id, kind, payload, owner, tenant, status, module, max_attempts,
                        priority, created_at, updated_at, scheduled_at, parent_id,
                        parent_trigger)
    SELECT * FROM unnest(
        %(ids)b::text[], %(kinds)b::text[], %(payloads)b::jsonb[], %(owners)b::text[],
        %(tenants)b::text[], %(statuses)b::text[], %(modules)b::text[],
        %(max_attempts)b::integer[], %(priorities)b::integer[],
        %(created_at)b::timestamptz[], %(updated_at)b::timestamptz[],
        %(scheduled_at)b::timestamptz[], %(parent_ids)b::text[], %(parent_triggers)b::text[])
    ON CONFLICT DO NOTHING
    RETURNING id, kind, payload, owner, tenant, status, module, progress, progress_message,
              attempts, max_attempts, priority, idempotency_key, result, error, created_at,
              updated_at, started_at, finished_at, scheduled_at, lease_token,
              lease_expires_at, parent_id, parent_trigger, schedule_id, followups
), wake AS (
    SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT ins.*, (SELECT count(*) FROM wake) AS woken FROM ins;

-- name: insert_schedule
INSERT INTO schedules (id, owner, tenant, cron, timezone, kind, payload, priority,
                       misfire_policy, misfire_limit, paused, last_due_at, next_due_at,
                       created_at, updated_at)
VALUES (%(id)s, %(owner)s, %(tenant)s, %(cron)s, %(timezone)s, %(kind)s, %(payload)s,
        %(priority)s, %(misfire_policy)s, %(misfire_limit)s, %(paused)s, %(last_due_at)s,
        %(next_due_at)s, %(created_at)s, %(updated_at)s)
RETURNING *;

-- name: get_schedule
SELECT * FROM schedules WHERE id = %(id)s;

-- name: list_schedules
SELECT * FROM schedules
WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)
  AND (%(after_id)s::text IS NULL OR id > %(after_id)s::text)
ORDER BY id
LIMIT %(limit)s;

-- name: pause_schedule
UPDATE schedules SET paused = true, updated_at = %(now)s
WHERE id = %(id)s
RETURNING *;

-- name: resume_schedule
-- Due times that passed while paused are not owed: the schedule restarts from now.
UPDATE schedules
SET paused = false, last_due_at = %(last_due_at)s, next_due_at = %(next_due_at)s,
    updated_at = %(now)s
WHERE id = %(id)s AND paused
RETURNING *;

-- name: delete_schedule
WITH gone AS (
    DELETE FROM schedules WHERE id = %(id)s RETURNING id
), fires_gone AS (
    DELETE FROM schedule_fires WHERE schedule_id IN (SELECT id FROM gone)
)
SELECT count(*) AS n FROM gone;

-- name: due_schedules
SELECT * FROM schedules
WHERE NOT paused AND next_due_at <= %(now)s
ORDER BY next_due_at
LIMIT %(limit)s;

-- name: next_schedule_due_at
SELECT MIN(next_due_at) AS due FROM schedules WHERE NOT paused;

-- name: advance_schedule
-- Compare-and-set: only the process that read this last_due_at decides what fires now.
-- Concurrent callers wait on the row lock, then find the condition false.
UPDATE schedules
SET last_due_at = %(last_due_at)s, next_due_at = %(next_due_at)s, updated_at = %(now)s
WHERE id = %(id)s AND last_due_at = %(expected_last_due_at)s AND NOT paused
RETURNING id;

-- name: insert_fires
-- One row per (schedule, due time): the primary key makes each due time fire at most one
-- robot. Only the robots whose fire row went in are inserted, in the same statement.
WITH input AS (
    SELECT * FROM unnest(
        %(due_at)b::timestamptz[], %(robot_ids)b::text[], %(late)b::boolean[],
        %(covers)b::integer[], %(kinds)b::text[], %(payloads)b::jsonb[], %(owners)b::text[],
        %(tenants)b::text[], %(modules)b::text[], %(max_attempts)b::integer[],
        %(priorities)b::integer[]
    ) AS t(due_at, robot_id, late, covers, kind, payload, owner, tenant, module,
           max_attempts, priority)
), fired AS (
    INSERT INTO schedule_fires (schedule_id, due_at, robot_id, fired_at, late, covers)
    SELECT %(schedule_id)s, due_at, robot_id, %(now)s, late, covers FROM input
    ON CONFLICT DO NOTHING
    RETURNING robot_id
), ins AS (
    INSERT INTO robots (id, kind, payload, owner, tenant, status, module, max_attempts,
                        priority, created_at, updated_at, scheduled_at, schedule_id)
    SELECT i.robot_id, i.kind, i.payload, i.owner, i.tenant, 'queued', i.module,
           i.max_attempts, i.priority, %(now)s, %(now)s, i.due_at, %(schedule_id)s
    FROM input i JOIN fired f ON f.robot_id = i.robot_id
    RETURNING id, kind, payload, owner, tenant, status, module, progress, progress_message,
              attempts, max_attempts, priority, idempotency_key, result, error, created_at,
              updated_at, started_at, finished_at, scheduled_at, lease_token,
              lease_expires_at, parent_id, parent_trigger, schedule_id, followups
), wake AS (
    SELECT pg_notify(%(channel)s, '') WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT ins.*, (SELECT count(*) FROM wake) AS woken FROM ins ORDER BY scheduled_at;

-- name: list_schedule_fires
SELECT schedule_id, due_at, robot_id, fired_at, late, covers FROM schedule_fires
WHERE schedule_id = %(schedule_id)s
ORDER BY due_at DESC
LIMIT %(limit)s;
