-- Event ids in the inbox compare exactly: byte for byte (no case folding) and in full (no
-- 255-character cut). The key is the handler and the SHA-256 of the whole id; the id
-- itself is kept beside it. Existing rows keep their meaning: their hash is computed
-- from the id they hold.
ALTER TABLE outboxd_inbox ADD COLUMN event_hash BINARY(32) NULL;
UPDATE outboxd_inbox SET event_hash = UNHEX(SHA2(event_id, 256));
ALTER TABLE outboxd_inbox
    DROP PRIMARY KEY,
    MODIFY handler VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    MODIFY event_id TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    MODIFY event_hash BINARY(32) NOT NULL,
    ADD PRIMARY KEY (handler, event_hash);
