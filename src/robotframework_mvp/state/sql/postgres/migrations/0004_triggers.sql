-- Work that starts later or on its own: delayed robots, cron schedules and robot chains.
-- Robots learn where they came from (a parent robot, or a schedule) and what follows them.

-- The robot whose completion created this one, and which follow-up of it (on_success or
-- on_failure). One child per (parent, trigger): a completion written twice never
-- creates two.
ALTER TABLE robots ADD COLUMN parent_id text COLLATE "C";
ALTER TABLE robots ADD COLUMN parent_trigger text;
-- The schedule that fired this robot (its scheduled_at is the due time).
ALTER TABLE robots ADD COLUMN schedule_id text COLLATE "C";
-- {"on_success": {"kind", "payload"}, "on_failure": {...}}: created when this robot ends.
ALTER TABLE robots ADD COLUMN followups jsonb;
CREATE UNIQUE INDEX robots_parent_trigger ON robots (parent_id, parent_trigger)
    WHERE parent_id IS NOT NULL;
-- Listing by due time (GET /robots?order=due), per tenant and for admins.
CREATE INDEX robots_tenant_due ON robots (tenant, scheduled_at, id);
CREATE INDEX robots_due ON robots (scheduled_at, id);
-- Ended parents whose follow-up may still be missing (see parents_missing_followups).
CREATE INDEX robots_followups ON robots (finished_at) WHERE followups IS NOT NULL;

CREATE TABLE schedules (
    id             text COLLATE "C" PRIMARY KEY,
    owner          text NOT NULL,
    tenant         text NOT NULL,
    cron           text NOT NULL,
    timezone       text NOT NULL,
    kind           text NOT NULL,
    payload        jsonb NOT NULL,
    priority       integer NOT NULL DEFAULT 0,
    misfire_policy text NOT NULL,
    misfire_limit  integer NOT NULL,
    paused         boolean NOT NULL DEFAULT false,
    -- Every due time up to here has been decided (fired or skipped); advanced only by a
    -- compare-and-set in the transaction that fires, so one process decides each interval.
    last_due_at    timestamptz NOT NULL,
    -- The first due time after last_due_at: what the scheduler loops wait for.
    next_due_at    timestamptz NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_due_at) WHERE NOT paused;
CREATE INDEX schedules_tenant ON schedules (tenant, id);

-- One row per schedule and due time: the primary key is what makes each due time fire
-- at most one robot, whatever the number of processes.
CREATE TABLE schedule_fires (
    schedule_id text COLLATE "C" NOT NULL,
    due_at      timestamptz NOT NULL,
    robot_id    text COLLATE "C" NOT NULL,
    fired_at    timestamptz NOT NULL,
    -- fired after its misfire grace (a catch-up of run_once or run_all)
    late        boolean NOT NULL DEFAULT false,
    -- how many missed due times this robot stands for (run_once), else 1
    covers      integer NOT NULL DEFAULT 1,
    PRIMARY KEY (schedule_id, due_at)
);
