-- The audit trail's own retention (RFMVP_AUDIT_RETENTION_DAYS) and its newest records.

-- name: purge_audit_prefix
-- Delete the oldest records, always a contiguous run from the start of the chain, so
-- what remains still verifies from its first record's prev_hash: everything before the
-- first record written at or after :before (records may be written slightly out of time
-- order by batching processes). The newest record is always kept, so the chain goes on.
DELETE FROM audit_log
WHERE seq < COALESCE((SELECT MIN(seq) FROM audit_log WHERE ts >= :before),
                     (SELECT MAX(seq) FROM audit_log));

-- name: tail_audit
SELECT * FROM (SELECT * FROM audit_log ORDER BY seq DESC LIMIT :limit) ORDER BY seq;
