-- Who may do what: API tokens (stored hashed), who submitted each action,
-- and the audit log of administrative changes.

ALTER TABLE actions ADD COLUMN submitted_by TEXT;  -- name of the API token that submitted it

CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,           -- the public part of the token (troupe_<id>_<secret>)
    name        TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,              -- comma-separated: read, submit, operate, admin
    kinds       TEXT,                       -- comma-separated kinds a submit token may use; NULL: any
    secret_hash TEXT NOT NULL,              -- SHA-256 of the whole token, hex
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT
);

CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,                  -- token name, or how the server was configured
    event   TEXT NOT NULL,                  -- e.g. bundle.pushed, key.revoked, token.created
    subject TEXT NOT NULL,                  -- what it was done to: a bundle hash, key id, token id
    detail  TEXT                            -- JSON
);

-- Secrets for steps, encrypted (XChaCha20-Poly1305) under a key kept outside
-- the database (the server's --secrets-key file).
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL
);
