-- The verified subject of the publisher's token (`from`); NULL for notices published without
-- one, and for every notice stored before senders were recorded.
ALTER TABLE notices ADD COLUMN sender TEXT;
ALTER TABLE scheduled_notices ADD COLUMN sender TEXT;
