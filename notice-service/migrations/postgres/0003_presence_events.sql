-- How a subscriber holds its name (hub::NameClaim): a name chosen without a token is unique to
-- one client id, across every instance.
ALTER TABLE notice_subscribers ADD COLUMN chosen BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE notice_subscribers ADD COLUMN client TEXT;

-- Presence events (a name joining or leaving a topic), each decided once for every instance:
-- whoever changes presence rows takes one advisory lock first, so these ids commit in order and
-- "every event after the last one I read" never skips one.
CREATE TABLE notice_presence_events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    topic TEXT NOT NULL,
    at BIGINT NOT NULL
);
