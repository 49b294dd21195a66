-- botflow schema, version 3: per-chatbot rate limit overrides, and every change to them.

-- NULL in a column: the daemon's default from [limits] (or [executor] for max_concurrent).
CREATE TABLE chatbot_limits (
    chatbot_id             uuid PRIMARY KEY REFERENCES chatbots (id) ON DELETE CASCADE,
    events_per_second      integer CHECK (events_per_second > 0),
    burst                  integer CHECK (burst > 0),
    executions_per_second  integer CHECK (executions_per_second > 0),
    max_concurrent         integer CHECK (max_concurrent > 0),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    updated_by             text NOT NULL
);

-- Who changed which limits when, with the values before and after.
CREATE TABLE limit_changes (
    id          bigserial PRIMARY KEY,
    chatbot_id  uuid NOT NULL REFERENCES chatbots (id) ON DELETE CASCADE,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    changed_by  text NOT NULL,
    old_limits  jsonb NOT NULL,
    new_limits  jsonb NOT NULL
);
CREATE INDEX limit_changes_chatbot_idx ON limit_changes (chatbot_id, changed_at DESC);
