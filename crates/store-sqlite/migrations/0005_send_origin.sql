-- Who asked for each message, for the per-IP and per-account send limits.
ALTER TABLE outbox ADD COLUMN client_ip TEXT;
ALTER TABLE outbox ADD COLUMN user_id TEXT;
CREATE INDEX outbox_by_ip ON outbox (tenant_id, client_ip, created_at);
CREATE INDEX outbox_by_user ON outbox (tenant_id, user_id, created_at);
