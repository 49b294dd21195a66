-- botflow schema, version 2: durable execution. Leases (owner node, epoch) with node
-- heartbeats on PostgreSQL's clock, persisted retry/delay times, resume points, the
-- command outbox and dead letters.

-- One row per running daemon; its heartbeat keeps the leases it holds alive.
CREATE TABLE nodes (
    id            uuid PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE executions DROP CONSTRAINT executions_status_check;
ALTER TABLE executions ADD CONSTRAINT executions_status_check CHECK (status IN
    ('queued', 'running', 'retrying', 'waiting', 'succeeded', 'failed', 'dead', 'cancelled'));

ALTER TABLE executions
    -- when a queued, retrying or waiting (delayed) execution may run next
    ADD COLUMN run_after    timestamptz NOT NULL DEFAULT now(),
    -- the next step to run, and the outputs of the steps before it
    ADD COLUMN step_index   integer NOT NULL DEFAULT 0,
    ADD COLUMN outputs      jsonb NOT NULL DEFAULT '{}',
    -- the node running (or holding) the execution; NULL: free for any node to claim
    ADD COLUMN lease_owner  uuid,
    -- bumped on every claim: a write carrying an older epoch is refused
    ADD COLUMN lease_epoch  bigint NOT NULL DEFAULT 0;

-- Unfinished executions by chatbot and due time: claims, the scheduler's scan, takeovers.
-- Small: a row leaves it when the execution finishes.
DROP INDEX executions_unfinished_idx;
CREATE INDEX executions_unfinished_idx ON executions (chatbot_id, run_after) INCLUDE (lease_owner)
    WHERE status IN ('queued', 'running', 'retrying', 'waiting');

-- Commands for chat services (reply, tag, handoff), kept until a client acks them.
CREATE TABLE outbox (
    command_id       text PRIMARY KEY,
    chatbot_id       uuid NOT NULL,
    conversation_id  text NOT NULL,
    kind             text NOT NULL,
    payload          jsonb NOT NULL,
    execution_id     uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    status           text NOT NULL CHECK (status IN ('pending', 'acked', 'expired')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    acked_at         timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (chatbot_id, created_at) WHERE status = 'pending';
CREATE INDEX outbox_execution_idx ON outbox (execution_id);

-- Executions that used up their attempts, for an operator to replay or discard.
CREATE TABLE dead_letters (
    id                uuid PRIMARY KEY,
    execution_id      uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    chatbot_id        uuid NOT NULL,
    workflow_id       uuid NOT NULL,
    workflow_version  integer NOT NULL,
    event             jsonb NOT NULL,
    last_error        text,
    attempts          integer NOT NULL,
    -- every attempt of every step when the execution died
    history           jsonb NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    replayed_at       timestamptz,
    replayed_by       text,
    discarded_at      timestamptz,
    discarded_by      text
);
CREATE INDEX dead_letters_chatbot_idx ON dead_letters (chatbot_id, created_at DESC);
CREATE INDEX dead_letters_open_idx ON dead_letters (created_at) WHERE replayed_at IS NULL AND discarded_at IS NULL;
