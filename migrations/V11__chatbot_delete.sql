-- botflow schema, version 11: deleting a chatbot. The row stays, marked `deleted_at`,
-- while its history is still in the database: the chatbot is gone for the API and for
-- ingest at once, and the pruner removes what it leaves in small batches (all of it at
-- once when `purge_history`, else as its retention says), then the row itself, whose
-- workflows, limits and retention go with it.
ALTER TABLE chatbots
    ADD COLUMN deleted_at     timestamptz,
    ADD COLUMN purge_history  boolean NOT NULL DEFAULT false;
CREATE INDEX chatbots_deleted_idx ON chatbots (deleted_at) WHERE deleted_at IS NOT NULL;
