-- Phone-identified users (digipay): a user type, unique with the phone per tenant.
ALTER TABLE users ADD COLUMN user_type BIGINT;
CREATE UNIQUE INDEX users_by_phone_and_type ON users (tenant_id, phone, user_type)
    WHERE user_type IS NOT NULL;

-- Each tenant's JWT signing keys, sealed under the master key. The active key has no
-- verify_until; a rotated-out key still verifies until then.
CREATE TABLE tenant_keys (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants (id),
    secret_sealed  BYTEA NOT NULL,
    created_at     BIGINT NOT NULL,
    verify_until   BIGINT
);
CREATE UNIQUE INDEX tenant_keys_single_active ON tenant_keys (tenant_id) WHERE verify_until IS NULL;

-- Devices a user signed in from; tokens are bound to one.
CREATE TABLE devices (
    tenant_id         TEXT NOT NULL REFERENCES tenants (id),
    user_id           TEXT NOT NULL REFERENCES users (id),
    device_unique_id  TEXT NOT NULL,
    device_id         TEXT NOT NULL,
    device_type       TEXT NOT NULL,
    first_seen_at     BIGINT NOT NULL,
    last_seen_at      BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_unique_id)
);

-- Revoked JWTs, by jti, kept until they would have expired anyway.
CREATE TABLE revoked_tokens (
    jti         TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    revoked_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
