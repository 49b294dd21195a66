-- botflow schema, version 4: indexes the scheduler and takeovers use, so they read
-- only the rows they need however many executions wait.

-- Free executions by due time: the scheduler's scan reads only those due soon.
CREATE INDEX executions_free_due_idx ON executions (run_after)
    WHERE lease_owner IS NULL AND status IN ('queued', 'running', 'retrying', 'waiting');

-- Unfinished executions by the node holding them: takeovers and lease releases.
CREATE INDEX executions_owner_idx ON executions (lease_owner)
    WHERE status IN ('queued', 'running', 'retrying', 'waiting');

-- At most one open dead letter per execution (a retried write cannot add a second).
CREATE UNIQUE INDEX dead_letters_open_execution_idx ON dead_letters (execution_id)
    WHERE replayed_at IS NULL AND discarded_at IS NULL;
