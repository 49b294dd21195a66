-- botflow schema, version 1: accounts and keys, chatbots, versioned workflows,
-- executions and their steps.

CREATE TABLE accounts (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Keys are stored as a public prefix (to find the row) and the SHA-256 of the whole
-- key (compared in constant time); the key itself is shown once, at creation.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    prefix      text NOT NULL UNIQUE,
    key_hash    bytea NOT NULL,
    role        text NOT NULL CHECK (role IN ('ingest', 'admin', 'operator')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_account_idx ON api_keys (account_id);

CREATE TABLE chatbots (
    id              uuid PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- signs webhook requests of this chatbot's workflows (HMAC-SHA256)
    webhook_secret  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chatbots_account_idx ON chatbots (account_id);

-- The current version of each workflow; every version ever saved is kept in
-- workflow_versions so an execution always runs the definition it started with.
CREATE TABLE workflows (
    id          uuid PRIMARY KEY,
    chatbot_id  uuid NOT NULL REFERENCES chatbots (id) ON DELETE CASCADE,
    name        text NOT NULL,
    version     integer NOT NULL CHECK (version >= 1),
    enabled     boolean NOT NULL DEFAULT true,
    definition  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- deleted workflows stay (executions reference them) but never match again
    deleted_at  timestamptz
);
CREATE INDEX workflows_chatbot_idx ON workflows (chatbot_id) WHERE deleted_at IS NULL;

CREATE TABLE workflow_versions (
    workflow_id  uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    version      integer NOT NULL,
    definition   jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, version)
);

CREATE TABLE executions (
    id                uuid PRIMARY KEY,
    chatbot_id        uuid NOT NULL,
    workflow_id       uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    workflow_version  integer NOT NULL,
    event_id          text NOT NULL,
    event_type        text NOT NULL,
    conversation_id   text NOT NULL,
    -- the event as received: the input of every step, kept for resume and replay
    event             jsonb NOT NULL,
    status            text NOT NULL CHECK (status IN
                        ('queued', 'running', 'retrying', 'succeeded', 'failed', 'dead', 'cancelled')),
    attempt           integer NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    duration_ms       double precision,
    error             text,
    UNIQUE (workflow_id, event_id)
);
-- history of a chatbot, newest first (the admin API pages on (created_at, id))
CREATE INDEX executions_chatbot_time_idx ON executions (chatbot_id, created_at DESC, id DESC);
-- history filtered by status, and the unfinished ones recovery looks for
CREATE INDEX executions_chatbot_status_idx ON executions (chatbot_id, status, created_at DESC);
CREATE INDEX executions_unfinished_idx ON executions (status)
    WHERE status IN ('queued', 'running', 'retrying');

CREATE TABLE execution_steps (
    execution_id  uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    step_index    integer NOT NULL,
    attempt       integer NOT NULL DEFAULT 1,
    step_id       text NOT NULL,
    action        text NOT NULL,
    status        text NOT NULL CHECK (status IN ('succeeded', 'failed')),
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    output        jsonb,
    error         text,
    PRIMARY KEY (execution_id, step_index, attempt)
);
