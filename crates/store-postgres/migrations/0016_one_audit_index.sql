-- The audit log is read one way only: a tenant's events, newest first (`list_audit`: `tenant_id`,
-- then `ORDER BY id DESC`). Two indexes served it, the `id` key and `(tenant_id, at)`, and every
-- event paid for both (a login writes two events: four index entries and four WAL records).
-- One key on `(tenant_id, id)` is what the listing walks, and each event writes one entry.
-- `id` stays unique on its own: it is an identity column, which no statement here sets.
ALTER TABLE audit_events DROP CONSTRAINT audit_events_pkey;
DROP INDEX audit_by_tenant;
ALTER TABLE audit_events ADD PRIMARY KEY (tenant_id, id);
