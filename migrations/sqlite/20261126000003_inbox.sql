-- The inbox of `sql` handlers: one row per (handler, event id) handled, inserted in the
-- same transaction as the handler's statement, so a redelivered event has no second effect.
CREATE TABLE IF NOT EXISTS outboxd_inbox (
    handler      TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    processed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (handler, event_id)
);
