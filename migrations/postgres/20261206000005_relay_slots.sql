-- Replication slots outboxd created for WAL capture (capture = "wal"), and whether the
-- initial snapshot the slot was created with has been published in full. A slot whose
-- snapshot did not finish (outboxd stopped midway) is dropped and created again, and its
-- snapshot sent again: duplicates, never a gap. Slots a DBA created have no row here.
CREATE TABLE IF NOT EXISTS outboxd_relay_slots (
    slot_name     text        PRIMARY KEY,
    source_table  text        NOT NULL,
    snapshot_done boolean     NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
