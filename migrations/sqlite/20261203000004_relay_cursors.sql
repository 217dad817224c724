-- The positions of cursor-mode lanes (on_published = "cursor"): per table, the last row
-- the lane published (its order value; xid is always 0, SQLite has one writer). Advanced
-- in the transaction that records a batch as published.
CREATE TABLE IF NOT EXISTS outboxd_relay_cursors (
    source_table TEXT    NOT NULL,
    lanes        INTEGER NOT NULL,
    lane         INTEGER NOT NULL,
    xid          INTEGER NOT NULL,
    position     INTEGER NOT NULL,
    high         INTEGER NOT NULL,
    updated_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (source_table, lanes, lane)
);
