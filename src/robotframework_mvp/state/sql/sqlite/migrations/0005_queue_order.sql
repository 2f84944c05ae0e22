-- The queue index in the claim's full order (priority, due time, then id), so a claim
-- reads only the rows it takes instead of sorting every queued robot of the module.
DROP INDEX robots_queue;
CREATE INDEX robots_queue ON robots (module, priority DESC, scheduled_at, id)
    WHERE status = 'queued';
