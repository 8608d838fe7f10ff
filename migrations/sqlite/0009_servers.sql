-- Several servers on one database (engine::schedule); on SQLite, one
-- server at a time, which this table lets a second one see and refuse.
CREATE TABLE servers (
    id               TEXT    NOT NULL PRIMARY KEY,
    incarnation      INTEGER NOT NULL,            -- bumped at every start of this id
    state            TEXT    NOT NULL,            -- live, stopped, lost
    address          TEXT,                        -- its API address, as it advertises it
    host             TEXT    NOT NULL,
    data_dir         TEXT    NOT NULL,
    version          TEXT    NOT NULL,
    running          INTEGER NOT NULL DEFAULT 0,  -- actions it runs, at its last renewal
    nodes_connected  INTEGER NOT NULL DEFAULT 0,
    started_at       TEXT    NOT NULL,
    heartbeat_at     TEXT    NOT NULL,
    lease_expires_at TEXT    NOT NULL,
    stopped_at       TEXT
);

-- Bumped by every claim and hand-over; a runner's writes check it.
ALTER TABLE actions ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE actions ADD COLUMN progress INTEGER NOT NULL DEFAULT 0;
CREATE INDEX actions_by_owner ON actions (owner, status);
