-- The reference outbox table. Applications insert one row per event in the same
-- transaction as their business change; outboxd publishes and then deletes (or marks) it.
-- MySQL has no LISTEN/NOTIFY: the relay polls (relay.tables.poll_interval).
CREATE TABLE IF NOT EXISTS outbox (
    id             BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id       CHAR(36)     NOT NULL DEFAULT (UUID()),
    aggregate_type VARCHAR(255) NOT NULL,
    aggregate_id   VARCHAR(255) NOT NULL,
    event_type     VARCHAR(255) NOT NULL,
    payload        JSON         NOT NULL,
    headers        JSON         NOT NULL DEFAULT ('{}'),
    created_at     TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
);
