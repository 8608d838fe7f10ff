-- The same schema as MySQL/MariaDB's 0013 (a target's unfinished actions
-- counted in its row). One server serves a SQLite database and keeps its
-- targets in memory: neither the row nor a trigger is written here.
ALTER TABLE targets ADD COLUMN unfinished INTEGER NOT NULL DEFAULT 0;
