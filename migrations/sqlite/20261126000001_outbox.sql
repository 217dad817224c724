-- The reference outbox table. Applications insert one row per event in the same
-- transaction as their business change; outboxd publishes and then deletes (or marks) it.
-- SQLite has no LISTEN/NOTIFY: the relay polls (relay.tables.poll_interval).
-- event_id defaults to a random (version 4) UUID; created_at to UTC time, ISO 8601.
CREATE TABLE IF NOT EXISTS outbox (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL DEFAULT (lower(
                       hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
                       substr(hex(randomblob(2)), 2) || '-' ||
                       substr('89ab', 1 + (abs(random()) % 4), 1) || substr(hex(randomblob(2)), 2) ||
                       '-' || hex(randomblob(6)))),
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    event_type     TEXT    NOT NULL,
    payload        TEXT    NOT NULL,
    headers        TEXT    NOT NULL DEFAULT '{}',
    created_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
