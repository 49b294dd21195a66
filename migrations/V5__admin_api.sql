-- botflow schema, version 5: what the admin API reads. Workflow names are unique per
-- chatbot; execution history has keyset-friendly indexes for each filter; per-minute
-- rollups make analytics over millions of executions cheap.

CREATE UNIQUE INDEX workflows_chatbot_name_idx ON workflows (chatbot_id, name) WHERE deleted_at IS NULL;
DROP INDEX chatbots_account_idx;
CREATE INDEX chatbots_account_page_idx ON chatbots (account_id, created_at, id);
CREATE INDEX chatbots_page_idx ON chatbots (created_at, id);
CREATE INDEX workflows_chatbot_page_idx ON workflows (chatbot_id, created_at, id) WHERE deleted_at IS NULL;

-- History pages are (created_at, id) descending within a chatbot, for each filter.
DROP INDEX executions_chatbot_status_idx;
CREATE INDEX executions_chatbot_status_idx ON executions (chatbot_id, status, created_at DESC, id DESC);
CREATE INDEX executions_chatbot_workflow_idx ON executions (chatbot_id, workflow_id, created_at DESC, id DESC);
CREATE INDEX executions_chatbot_conversation_idx ON executions (chatbot_id, conversation_id, created_at DESC, id DESC);
-- Executions with an error, for searching their text.
CREATE INDEX executions_chatbot_errors_idx ON executions (chatbot_id, created_at DESC, id DESC) WHERE error IS NOT NULL;

-- Per workflow and minute (of creation): executions created and how they ended, and
-- how long the finished ones took (a histogram: bucket b counts durations in
-- [2^((b-1)/8), 2^(b/8)) ms, bucket 0 those under 1 ms, 191 the rest). Analytics over a
-- day sum at most 1,440 rows per workflow instead of reading every execution. Kept up
-- to date by the journal, in the same statement as the executions themselves.
CREATE TABLE execution_stats (
    chatbot_id   uuid NOT NULL,
    workflow_id  uuid NOT NULL,
    minute       timestamptz NOT NULL,
    created      bigint NOT NULL DEFAULT 0,
    succeeded    bigint NOT NULL DEFAULT 0,
    failed       bigint NOT NULL DEFAULT 0,
    dead         bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (chatbot_id, workflow_id, minute)
);

CREATE TABLE execution_durations (
    chatbot_id   uuid NOT NULL,
    workflow_id  uuid NOT NULL,
    minute       timestamptz NOT NULL,
    bucket       smallint NOT NULL,
    count        bigint NOT NULL,
    PRIMARY KEY (chatbot_id, workflow_id, minute, bucket)
);

CREATE INDEX dead_letters_chatbot_workflow_idx ON dead_letters (chatbot_id, workflow_id, created_at DESC);
