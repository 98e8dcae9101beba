-- Revisions, expiry and the change log (see src/store/mod.rs). Rows written before this
-- migration have revision 0: they were written before revisions existed.
ALTER TABLE kv ADD COLUMN revision bigint NOT NULL DEFAULT 0;
-- Milliseconds since the Unix epoch; NULL: the key never expires.
ALTER TABLE kv ADD COLUMN expires_at bigint;
CREATE INDEX kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;

-- One row: the store's revision (every writer locks it, so writers from all replicas commit in
-- revision order), and the highest revision dropped from the change log.
CREATE TABLE kv_meta (
    id integer PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL,
    compacted bigint NOT NULL
);
INSERT INTO kv_meta (id, revision, compacted) VALUES (1, 0, 0);

-- kind: 0 put, 1 delete, 2 expire. seq orders the changes of one transaction.
CREATE TABLE kv_log (
    revision bigint NOT NULL,
    seq bigint NOT NULL,
    key bytea NOT NULL,
    kind bigint NOT NULL,
    value bytea,
    version bigint NOT NULL,
    PRIMARY KEY (revision, seq)
);
