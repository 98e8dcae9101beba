-- AUTOINCREMENT so that an id is never handed out twice, even after retention deleted the
-- newest rows: subscribers resume from their last id.
CREATE TABLE notices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message TEXT NOT NULL,
    topic TEXT,
    recipient TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX notices_topic ON notices (topic, id);
CREATE INDEX notices_created_at ON notices (created_at);

-- Scheduled notices get their notice id only when published, so ids follow publication order.
CREATE TABLE scheduled_notices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message TEXT NOT NULL,
    topic TEXT,
    recipient TEXT,
    due_at INTEGER NOT NULL
);
CREATE INDEX scheduled_notices_due ON scheduled_notices (due_at, id);
