-- Steps that require capabilities run on remote nodes, and wait for one.
ALTER TABLE action_steps ADD COLUMN waiting_for TEXT;  -- while status = 'waiting': the requirement no node meets
ALTER TABLE action_steps ADD COLUMN node TEXT;         -- the node its latest attempt ran on; NULL: the app server
ALTER TABLE action_step_attempts ADD COLUMN node TEXT; -- the node the attempt ran on; NULL: the app server

-- Remote nodes that joined or asked to: one row per name.
CREATE TABLE nodes (
    name         TEXT PRIMARY KEY,
    public_key   TEXT NOT NULL,  -- its node key (ed25519:…), which signs its hello
    status       TEXT NOT NULL,  -- pending (waits for `troupe nodes accept`), accepted, removed
    created_at   TEXT NOT NULL,
    accepted_at  TEXT,
    accepted_by  TEXT,           -- the admin token, or the join token it joined with
    capabilities TEXT,           -- JSON: what it advertised when it last connected
    last_seen_at TEXT            -- when it last connected
);
