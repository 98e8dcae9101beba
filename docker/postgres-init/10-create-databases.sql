-- The kv replicas use the database named by POSTGRES_DB; notice-service gets its own, so each
-- service's migration history stays separate.
CREATE DATABASE notice;
