-- Single-use recovery codes for a lost authenticator, stored only as keyed hashes.
CREATE TABLE recovery_codes (
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    user_id     TEXT NOT NULL REFERENCES users (id),
    code_hash   BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    used_at     BIGINT,
    PRIMARY KEY (user_id, code_hash)
);
