-- Signed bundles and the keys trusted to sign them.

CREATE TABLE bundles (
    hash         TEXT    PRIMARY KEY,        -- SHA-256 of content
    name         TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    abi          INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    signer       TEXT    NOT NULL,           -- key id of the signing key
    signature    TEXT    NOT NULL,           -- the detached signature, as text
    content      BLOB    NOT NULL,
    created_at   TEXT    NOT NULL,
    activated_at TEXT    NOT NULL,           -- the active version of a name is the latest activated
    UNIQUE (name, version)
);

CREATE TABLE trusted_keys (
    key_id     TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    added_at   TEXT NOT NULL,
    revoked_at TEXT
);
