-- Revisions, expiry and the change log (see src/store/mod.rs). Rows written before this
-- migration have revision 0: they were written before revisions existed.
ALTER TABLE kv ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
-- Milliseconds since the Unix epoch; NULL: the key never expires.
ALTER TABLE kv ADD COLUMN expires_at INTEGER;
CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;

-- One row: the store's revision, and the highest revision dropped from the change log.
CREATE TABLE kv_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    compacted INTEGER NOT NULL
);
INSERT INTO kv_meta (id, revision, compacted) VALUES (1, 0, 0);

-- kind: 0 put, 1 delete, 2 expire. seq orders the changes of one transaction.
CREATE TABLE kv_log (
    revision INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    key BLOB NOT NULL,
    kind INTEGER NOT NULL,
    value BLOB,
    version INTEGER NOT NULL,
    PRIMARY KEY (revision, seq)
) WITHOUT ROWID;
