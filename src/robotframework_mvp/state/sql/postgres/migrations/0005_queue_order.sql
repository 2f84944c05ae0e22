-- The queue index in the claim's full order (priority, due time, then id), so a claim
-- reads only the rows it takes: before, the id tie-break made it sort every queued robot
-- of the module (8 ms per claim with 20,000 queued).
DROP INDEX robots_queue;
CREATE INDEX robots_queue ON robots (module, priority DESC, scheduled_at, id)
    WHERE status = 'queued';
