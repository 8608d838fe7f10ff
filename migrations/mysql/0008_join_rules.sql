-- What a join token lets a new node claim, and how often it was used
-- (engine::join); which capabilities a node's admission allowed.
ALTER TABLE api_tokens
    ADD COLUMN join_rules TEXT NULL,            -- JSON: names, capabilities, max_uses; NULL: no rules
    ADD COLUMN uses INT NOT NULL DEFAULT 0;     -- nodes admitted with it
ALTER TABLE nodes ADD COLUMN allowed_capabilities TEXT NULL;  -- JSON list of patterns; NULL: any it reports
