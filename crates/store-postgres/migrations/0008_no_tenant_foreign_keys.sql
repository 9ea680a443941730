-- Every row of the busy tables named the one tenant row as its parent, so each insert took a
-- KEY SHARE lock on it: under concurrent logins all transactions shared that lock, and
-- PostgreSQL tracked the sharers in MultiXacts, which cost more CPU than the inserts
-- themselves. Tenants are never deleted, and every row is written with the tenant of a request
-- that was authenticated against it, so these constraints only cost.
ALTER TABLE users DROP CONSTRAINT IF EXISTS users_tenant_id_fkey;
ALTER TABLE challenges DROP CONSTRAINT IF EXISTS challenges_tenant_id_fkey;
ALTER TABLE login_tickets DROP CONSTRAINT IF EXISTS login_tickets_tenant_id_fkey;
ALTER TABLE sessions DROP CONSTRAINT IF EXISTS sessions_tenant_id_fkey;
ALTER TABLE totp_factors DROP CONSTRAINT IF EXISTS totp_factors_tenant_id_fkey;
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_tenant_id_fkey;
ALTER TABLE recovery_codes DROP CONSTRAINT IF EXISTS recovery_codes_tenant_id_fkey;
ALTER TABLE devices DROP CONSTRAINT IF EXISTS devices_tenant_id_fkey;
ALTER TABLE revoked_tokens DROP CONSTRAINT IF EXISTS revoked_tokens_tenant_id_fkey;
