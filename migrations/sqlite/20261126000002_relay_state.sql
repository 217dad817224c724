-- Tables outboxd owns. They are keyed by the configured table name, so one pair serves
-- every relayed outbox table of the database.

-- A row Kafka refused (too large, invalid topic, ...) is counted here; once its count reaches
-- the table's max_attempts it moves to outboxd_dead_rows. Entries of rows that were later
-- published are cleaned up by the relay's maintenance task.
CREATE TABLE IF NOT EXISTS outboxd_relay_attempts (
    source_table    TEXT    NOT NULL,
    row_id          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    last_error      TEXT    NOT NULL,
    first_failed_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (source_table, row_id)
);

-- Rows that will never be published as they are: the whole original row is kept in row_data
-- (a JSON object) so that nothing is lost; an operator can fix and re-insert it.
CREATE TABLE IF NOT EXISTS outboxd_dead_rows (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    source_table TEXT    NOT NULL,
    row_id       TEXT    NOT NULL,
    reason       TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    row_data     TEXT    NOT NULL,
    dead_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS outboxd_dead_rows_source ON outboxd_dead_rows (source_table, dead_at);
