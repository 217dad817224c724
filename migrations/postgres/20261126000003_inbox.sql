-- The inbox of `sql` handlers: one row per (handler, event id) handled, inserted in the
-- same transaction as the handler's statement, so a redelivered event has no second effect.
CREATE TABLE IF NOT EXISTS outboxd_inbox (
    handler      text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (handler, event_id)
);
