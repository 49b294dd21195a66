-- The per-minute rollups of V5 start empty: executions created before V5 were never
-- counted, so analytics read from the rollups missed them. Recount every execution
-- once, the way the journal counts them: `created` for every execution, the outcome
-- and the duration bucket for those that ended.
--
-- TRUNCATE locks both tables until this commits: a daemon writing meanwhile waits, and
-- its executions (not yet committed, so not recounted here) are counted by its own
-- write after this commits.
TRUNCATE execution_stats, execution_durations;

INSERT INTO execution_stats (chatbot_id, workflow_id, minute, created, succeeded, failed, dead)
SELECT chatbot_id, workflow_id, date_trunc('minute', created_at), count(*),
       count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status = 'dead')
FROM executions
GROUP BY 1, 2, 3;

INSERT INTO execution_durations (chatbot_id, workflow_id, minute, bucket, count)
SELECT chatbot_id, workflow_id, date_trunc('minute', created_at),
       CASE WHEN duration_ms < 1 THEN 0
            ELSE least(191, floor(8 * log(duration_ms) / log(2.0::float8))::int + 1) END,
       count(*)
FROM executions
WHERE status IN ('succeeded', 'failed', 'dead') AND duration_ms IS NOT NULL
GROUP BY 1, 2, 3, 4;
