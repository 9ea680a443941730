-- The audit log is read one way only: a tenant's events, newest first (`list_audit`: `tenant_id`,
-- then `ORDER BY id DESC`). The index on `(tenant_id, at)` found the tenant's events but not in
-- that order, so every listing sorted all of them to return the newest few. An index on
-- `tenant_id` alone holds the row id after it, in order: the listing walks it backwards and stops
-- at its limit, and each event writes a shorter entry.
DROP INDEX IF EXISTS audit_by_tenant;
CREATE INDEX audit_by_tenant ON audit_events (tenant_id);
