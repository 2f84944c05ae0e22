-- The audit trail's own retention (RFMVP_AUDIT_RETENTION_DAYS) and its newest records.

-- name: purge_audit_prefix
-- Delete the oldest records, always a contiguous run from the start of the chain, so
-- what remains still verifies from its first record's prev_hash: everything before the
-- first record written at or after the cutoff (batching processes may write records
-- slightly out of time order). The newest record is always kept, so the chain goes on.
-- Run under the audit chain's lock, so no append is half-way when the cutoff is read.
WITH gone AS (
    DELETE FROM audit_log
    WHERE seq < COALESCE((SELECT MIN(seq) FROM audit_log WHERE ts >= %(before)s),
                         (SELECT MAX(seq) FROM audit_log))
    RETURNING 1
)
SELECT count(*) AS n FROM gone;

-- name: tail_audit
SELECT * FROM (
    SELECT seq, ts, principal, action, target, outcome, client, request_id, details,
           prev_hash, hash
    FROM audit_log ORDER BY seq DESC LIMIT %(limit)s
) newest ORDER BY seq;
