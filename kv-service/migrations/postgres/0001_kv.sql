-- bytea rather than text: text rejects NUL, and text ordering depends on the database's
-- collation, while bytea sorts by bytes, which for UTF-8 is code point order (what `list`
-- promises, and what the other stores do).
CREATE TABLE kv (
    key bytea PRIMARY KEY,
    value bytea NOT NULL,
    version bigint NOT NULL
);
