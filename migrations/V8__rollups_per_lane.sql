-- botflow schema, version 8: the per-minute rollups are kept per journal lane
-- (`shard`), so that the lanes writing one busy chatbot's executions never wait for
-- each other's commit on a shared rollup row (or deadlock over two). Readers sum the
-- shards, as they summed minutes. Corrections made outside the lanes (a dead letter
-- replayed) go to shard -1.
ALTER TABLE execution_stats ADD COLUMN shard smallint NOT NULL DEFAULT 0;
ALTER TABLE execution_stats DROP CONSTRAINT execution_stats_pkey,
    ADD PRIMARY KEY (chatbot_id, workflow_id, minute, shard);

ALTER TABLE execution_durations ADD COLUMN shard smallint NOT NULL DEFAULT 0;
ALTER TABLE execution_durations DROP CONSTRAINT execution_durations_pkey,
    ADD PRIMARY KEY (chatbot_id, workflow_id, minute, bucket, shard);
