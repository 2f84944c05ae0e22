-- Work that starts later or on its own: delayed robots, cron schedules and robot chains.
-- Robots learn where they came from (a parent robot, or a schedule) and what follows them.

-- The robot whose completion created this one, and which follow-up of it (on_success or
-- on_failure). One child per (parent, trigger): a completion written twice never
-- creates two.
ALTER TABLE robots ADD COLUMN parent_id TEXT;
ALTER TABLE robots ADD COLUMN parent_trigger TEXT;
-- The schedule that fired this robot (its scheduled_at is the due time).
ALTER TABLE robots ADD COLUMN schedule_id TEXT;
-- {"on_success": {"kind", "payload"}, "on_failure": {...}}: created when this robot ends.
ALTER TABLE robots ADD COLUMN followups TEXT;
CREATE UNIQUE INDEX robots_parent_trigger ON robots (parent_id, parent_trigger)
    WHERE parent_id IS NOT NULL;
-- Listing by due time (GET /robots?order=due), per tenant and for admins.
CREATE INDEX robots_tenant_due ON robots (tenant, scheduled_at, id);
CREATE INDEX robots_due ON robots (scheduled_at, id);
-- Ended parents whose follow-up may still be missing (see parents_missing_followups).
CREATE INDEX robots_followups ON robots (finished_at) WHERE followups IS NOT NULL;

CREATE TABLE schedules (
    id             TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    cron           TEXT NOT NULL,
    timezone       TEXT NOT NULL,
    kind           TEXT NOT NULL,
    payload        TEXT NOT NULL,
    priority       INTEGER NOT NULL DEFAULT 0,
    misfire_policy TEXT NOT NULL,
    misfire_limit  INTEGER NOT NULL,
    paused         INTEGER NOT NULL DEFAULT 0,
    -- Every due time up to here has been decided (fired or skipped); advanced only by a
    -- compare-and-set in the transaction that fires, so one process decides each interval.
    last_due_at    REAL NOT NULL,
    -- The first due time after last_due_at: what the scheduler loops wait for.
    next_due_at    REAL NOT NULL,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_due_at) WHERE paused = 0;
CREATE INDEX schedules_tenant ON schedules (tenant, id);

-- One row per schedule and due time: the primary key is what makes each due time fire
-- at most one robot, whatever the number of processes.
CREATE TABLE schedule_fires (
    schedule_id TEXT NOT NULL,
    due_at      REAL NOT NULL,
    robot_id    TEXT NOT NULL,
    fired_at    REAL NOT NULL,
    late        INTEGER NOT NULL DEFAULT 0,
    covers      INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (schedule_id, due_at)
);
