-- botflow schema, version 10: the lifecycle of keys and chatbots. A rotated key keeps
-- working until `expires_at`; `last_used_at` is refreshed at most once a minute per
-- daemon. A chatbot's rotated webhook secret still signs beside the new one until
-- `previous_secret_expires_at`. `audit_log` records who did what, when.

ALTER TABLE api_keys
    ADD COLUMN expires_at    timestamptz,
    ADD COLUMN last_used_at  timestamptz,
    -- the key a rotation made in this one's place
    ADD COLUMN replaced_by   uuid;
CREATE INDEX api_keys_account_page_idx ON api_keys (account_id, created_at, id);
CREATE INDEX api_keys_page_idx ON api_keys (created_at, id);

ALTER TABLE chatbots
    ADD COLUMN previous_webhook_secret     text,
    ADD COLUMN previous_secret_expires_at  timestamptz;

-- No foreign keys: the record outlives what it names (a pruned chatbot, a deleted
-- account). `account_id` is the account whose resource was acted on, which is whose
-- admins may read the entry.
CREATE TABLE audit_log (
    id            uuid PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    account_id    uuid NOT NULL,
    -- the API key that acted, and its account and role at the time
    actor_key_id  uuid,
    actor_account uuid,
    actor_role    text,
    action        text NOT NULL,
    target_type   text NOT NULL,
    target_id     uuid NOT NULL,
    details       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_account_idx ON audit_log (account_id, at DESC, id DESC);
CREATE INDEX audit_log_time_idx ON audit_log (at DESC, id DESC);
