-- Tables outboxd owns. They are keyed by the configured table name, so one pair serves
-- every relayed outbox table of the database.

-- A row Kafka refused (too large, invalid topic, ...) is counted here; once its count reaches
-- the table's max_attempts it moves to outboxd_dead_rows. Entries of rows that were later
-- published are cleaned up by the relay's maintenance task.
CREATE TABLE IF NOT EXISTS outboxd_relay_attempts (
    source_table    text        NOT NULL,
    row_id          text        NOT NULL,
    attempts        integer     NOT NULL,
    last_error      text        NOT NULL,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, row_id)
);

-- Rows that will never be published as they are: the whole original row is kept in row_data
-- so that nothing is lost; an operator can fix and re-insert it.
CREATE TABLE IF NOT EXISTS outboxd_dead_rows (
    id           bigserial   PRIMARY KEY,
    source_table text        NOT NULL,
    row_id       text        NOT NULL,
    reason       text        NOT NULL,
    attempts     integer     NOT NULL,
    row_data     jsonb       NOT NULL,
    dead_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outboxd_dead_rows_source ON outboxd_dead_rows (source_table, dead_at);
