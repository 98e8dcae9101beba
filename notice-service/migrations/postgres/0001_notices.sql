-- An identity column draws from one sequence, which never hands out an id twice.
CREATE TABLE notices (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message TEXT NOT NULL,
    topic TEXT,
    recipient TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX notices_topic ON notices (topic, id);
CREATE INDEX notices_created_at ON notices (created_at);

-- Scheduled notices get their notice id only when published, so ids follow publication order.
CREATE TABLE scheduled_notices (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message TEXT NOT NULL,
    topic TEXT,
    recipient TEXT,
    due_at BIGINT NOT NULL
);
CREATE INDEX scheduled_notices_due ON scheduled_notices (due_at, id);

-- Presence across instances: each instance keeps its row fresh; rows of an instance whose
-- heartbeat stopped are ignored and then deleted (with its subscribers) by the others.
CREATE TABLE notice_instances (
    instance_id TEXT PRIMARY KEY,
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE notice_subscribers (
    instance_id TEXT NOT NULL REFERENCES notice_instances (instance_id) ON DELETE CASCADE,
    subscriber_id BIGINT NOT NULL,
    name TEXT,
    topics TEXT NOT NULL,
    since BIGINT NOT NULL,
    PRIMARY KEY (instance_id, subscriber_id)
);
CREATE INDEX notice_subscribers_name ON notice_subscribers (name);
