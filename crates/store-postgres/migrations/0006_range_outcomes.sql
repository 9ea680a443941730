-- The SMS pumping circuit breaker reads a tenant's recent challenges by creation time.
CREATE INDEX challenges_by_tenant_created ON challenges (tenant_id, created_at);
