-- The same schema as MySQL/MariaDB's 0010 (per-target order across
-- servers). One server serves a SQLite database and orders a target's
-- actions in memory, so neither is written here.
CREATE TABLE targets (
    target   TEXT    NOT NULL PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    starts   INTEGER NOT NULL DEFAULT 0
);
ALTER TABLE actions ADD COLUMN seq INTEGER;
