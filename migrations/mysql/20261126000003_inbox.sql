-- The inbox of `sql` handlers: one row per (handler, event id) handled, inserted in the
-- same transaction as the handler's statement, so a redelivered event has no second effect.
CREATE TABLE IF NOT EXISTS outboxd_inbox (
    handler      VARCHAR(255) NOT NULL,
    event_id     VARCHAR(255) NOT NULL,
    processed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (handler, event_id)
);
