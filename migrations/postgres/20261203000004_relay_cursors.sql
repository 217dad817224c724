-- The positions of cursor-mode lanes (on_published = "cursor"): per table, lane count and
-- lane, the last row the lane published, as (transaction id, order value), and the highest
-- order value it published. Advanced in the transaction that records a batch as published.
CREATE TABLE IF NOT EXISTS outboxd_relay_cursors (
    source_table text        NOT NULL,
    lanes        integer     NOT NULL,
    lane         integer     NOT NULL,
    xid          bigint      NOT NULL,
    position     bigint      NOT NULL,
    high         bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, lanes, lane)
);
