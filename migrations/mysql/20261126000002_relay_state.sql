-- Tables outboxd owns. They are keyed by the configured table name, so one pair serves
-- every relayed outbox table of the database.

-- A row Kafka refused (too large, invalid topic, ...) is counted here; once its count reaches
-- the table's max_attempts it moves to outboxd_dead_rows. Entries of rows that were later
-- published are cleaned up by the relay's maintenance task.
CREATE TABLE IF NOT EXISTS outboxd_relay_attempts (
    source_table    VARCHAR(255) NOT NULL,
    row_id          VARCHAR(255) NOT NULL,
    attempts        INT          NOT NULL,
    last_error      TEXT         NOT NULL,
    first_failed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at      TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (source_table, row_id)
);

-- Rows that will never be published as they are: the whole original row is kept in row_data
-- so that nothing is lost; an operator can fix and re-insert it.
CREATE TABLE IF NOT EXISTS outboxd_dead_rows (
    id           BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    source_table VARCHAR(255) NOT NULL,
    row_id       VARCHAR(255) NOT NULL,
    reason       TEXT         NOT NULL,
    attempts     INT          NOT NULL,
    row_data     JSON         NOT NULL,
    dead_at      TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    INDEX outboxd_dead_rows_source (source_table, dead_at)
);
