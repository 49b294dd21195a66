-- botflow schema, version 7: the pending commands of an execution, found without
-- reading the commands of every execution that ever sent one. The journal marks an
-- ended execution's pending commands `expired` in each write; the lanes use one plan
-- for every write, whose look-up per ended execution reads this small index.
CREATE INDEX outbox_pending_execution_idx ON outbox (execution_id) WHERE status = 'pending';
