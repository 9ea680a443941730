-- Server-wide secrets sealed under the master key (the code-hash key), so that a new master
-- key re-seals them instead of changing them.
CREATE TABLE server_secrets (
    id             TEXT PRIMARY KEY,
    secret_sealed  BLOB NOT NULL
);
