-- Keys and values are stored as blobs so that any UTF-8 (NUL included) round-trips unchanged
-- and keys sort by their bytes, which for UTF-8 is code point order (the order `list` promises).
CREATE TABLE kv (
    key BLOB PRIMARY KEY NOT NULL,
    value BLOB NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
