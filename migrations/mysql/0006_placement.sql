-- Steps that require capabilities run on remote nodes, and wait for one.
ALTER TABLE action_steps ADD COLUMN waiting_for TEXT NULL;         -- while status = 'waiting': the requirement no node meets
ALTER TABLE action_steps ADD COLUMN node VARCHAR(64) NULL;         -- the node its latest attempt ran on; NULL: the app server
ALTER TABLE action_step_attempts ADD COLUMN node VARCHAR(64) NULL; -- the node the attempt ran on; NULL: the app server

-- Remote nodes that joined or asked to: one row per name.
CREATE TABLE nodes (
    name         VARCHAR(64)  NOT NULL PRIMARY KEY,
    public_key   VARCHAR(80)  NOT NULL,  -- its node key (ed25519:…), which signs its hello
    status       VARCHAR(16)  NOT NULL,  -- pending (waits for `troupe nodes accept`), accepted, removed
    created_at   DATETIME(6)  NOT NULL,
    accepted_at  DATETIME(6)  NULL,
    accepted_by  VARCHAR(255) NULL,      -- the admin token, or the join token it joined with
    capabilities TEXT         NULL,      -- JSON: what it advertised when it last connected
    last_seen_at DATETIME(6)  NULL       -- when it last connected
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
