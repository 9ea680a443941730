-- otpgate schema v1 (PostgreSQL). Times are Unix milliseconds; hashes and sealed secrets are BLOBs.
-- Append-only: never edit this file once released; add 0002_… instead.

CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    is_default  BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);
CREATE UNIQUE INDEX tenants_single_default ON tenants (is_default) WHERE is_default = 1;

CREATE TABLE users (
    id                  TEXT PRIMARY KEY,
    tenant_id           TEXT NOT NULL REFERENCES tenants (id),
    username            TEXT NOT NULL,
    email               TEXT,
    phone               TEXT,
    role                TEXT NOT NULL,
    password_hash       TEXT NOT NULL,
    mobile_verified_at  BIGINT,
    email_verified_at   BIGINT,
    failed_logins       BIGINT NOT NULL DEFAULT 0,
    locked_until        BIGINT,
    created_at          BIGINT NOT NULL,
    UNIQUE (tenant_id, username)
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    name        TEXT NOT NULL,
    key_hash    BYTEA NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE challenges (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    user_id       TEXT REFERENCES users (id),
    purpose       TEXT NOT NULL,
    channel       TEXT NOT NULL,
    destination   TEXT NOT NULL,
    code_hash     BYTEA NOT NULL,
    locale        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    last_sent_at  BIGINT NOT NULL,
    send_count    BIGINT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    max_attempts  BIGINT NOT NULL,
    status        TEXT NOT NULL,
    resolved_at   BIGINT
);
CREATE INDEX challenges_pending_by_destination
    ON challenges (tenant_id, destination, purpose, created_at) WHERE status = 'pending';
CREATE INDEX challenges_expiry ON challenges (expires_at);

CREATE TABLE login_tickets (
    hash          BYTEA PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    user_id       TEXT NOT NULL REFERENCES users (id),
    challenge_id  TEXT NOT NULL REFERENCES challenges (id),
    channel       TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used_at       BIGINT
);
CREATE INDEX login_tickets_expiry ON login_tickets (expires_at);

CREATE TABLE sessions (
    hash        BYTEA PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    user_id     TEXT NOT NULL REFERENCES users (id),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX sessions_by_user ON sessions (tenant_id, user_id);
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE totp_factors (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants (id),
    user_id        TEXT NOT NULL REFERENCES users (id),
    secret_sealed  BYTEA NOT NULL,
    algorithm      TEXT NOT NULL,
    digits         BIGINT NOT NULL,
    period         BIGINT NOT NULL,
    confirmed_at   BIGINT,
    last_step      BIGINT,
    created_at     BIGINT NOT NULL
);
CREATE INDEX totp_factors_by_user ON totp_factors (tenant_id, user_id);

CREATE TABLE outbox (
    id                   TEXT PRIMARY KEY,
    tenant_id            TEXT NOT NULL REFERENCES tenants (id),
    challenge_id         TEXT REFERENCES challenges (id),
    channel              TEXT NOT NULL,
    destination          TEXT NOT NULL,
    purpose              TEXT NOT NULL,
    locale               TEXT NOT NULL,
    body                 TEXT,
    code                 TEXT,
    status               TEXT NOT NULL,
    attempts             BIGINT NOT NULL DEFAULT 0,
    next_attempt_at      BIGINT NOT NULL,
    created_at           BIGINT NOT NULL,
    sent_at              BIGINT,
    provider_message_id  TEXT,
    last_error           TEXT
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'queued';
CREATE INDEX outbox_by_destination ON outbox (tenant_id, destination, created_at);
CREATE INDEX outbox_by_challenge ON outbox (challenge_id, created_at);

CREATE TABLE audit_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    user_id     TEXT,
    kind        TEXT NOT NULL,
    detail      TEXT NOT NULL,
    ip          TEXT,
    latitude    DOUBLE PRECISION,
    longitude   DOUBLE PRECISION,
    mode        TEXT,
    at          BIGINT NOT NULL
);
CREATE INDEX audit_by_tenant ON audit_events (tenant_id, at);
