-- Keep "does not exist, skipping" notices out of the logs.
SET client_min_messages = warning;

-- The reference outbox table. Applications insert one row per event in the same
-- transaction as their business change; outboxd publishes and then deletes (or marks) it.
CREATE TABLE IF NOT EXISTS outbox (
    id             bigserial   PRIMARY KEY,
    event_id       uuid        NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb       NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Wake-up: one NOTIFY per INSERT statement (not per row), on the channel given as the
-- trigger argument (default 'outboxd'); the payload names the table. Notifications are
-- transactional, so outboxd is woken only once the rows are committed and visible.
CREATE OR REPLACE FUNCTION outboxd_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(coalesce(TG_ARGV[0], 'outboxd'), TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS outbox_notify ON outbox;
CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outboxd_notify('outboxd');
