-- botflow schema, version 9: data retention. A chatbot may keep its history for a
-- time of its own (NULL: the daemon's [retention] default; 0: keep forever), and acked
-- commands are found by age without reading the whole outbox.
CREATE TABLE chatbot_retention (
    chatbot_id           uuid PRIMARY KEY REFERENCES chatbots (id) ON DELETE CASCADE,
    executions_days      integer CHECK (executions_days >= 0),
    dead_letters_days    integer CHECK (dead_letters_days >= 0),
    acked_commands_days  integer CHECK (acked_commands_days >= 0),
    changed_at           timestamptz NOT NULL DEFAULT now(),
    changed_by           text NOT NULL
);

CREATE INDEX outbox_acked_idx ON outbox (chatbot_id, acked_at) WHERE status = 'acked';
