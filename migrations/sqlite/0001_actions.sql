-- troupe schema v1 (SQLite). Times are UTC, stored as ISO-8601 text with
-- microseconds ("2026-11-23 19:49:35.123456+00:00"), which sorts correctly.

CREATE TABLE actions (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL,
    target           TEXT    NOT NULL,
    params           TEXT    NOT NULL,               -- JSON object
    status           TEXT    NOT NULL,               -- queued | running | succeeded | failed | cancelled
    bundle           TEXT    NOT NULL,               -- SHA-256 of the bundle the action is pinned to
    current_step     TEXT,                           -- name of the step running or last run
    error            TEXT,
    idempotency_key  TEXT    UNIQUE,
    request_hash     TEXT    NOT NULL,               -- SHA-256 of kind, target and params
    owner            TEXT,                           -- server that runs the action
    lease_expires_at TEXT,                           -- the owner must renew before this
    revision         INTEGER NOT NULL DEFAULT 0,     -- bumped on every change
    created_at       TEXT    NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);
CREATE INDEX actions_by_target ON actions (target, id);
CREATE INDEX actions_by_status ON actions (status, id);

CREATE TABLE action_steps (
    action_id   INTEGER NOT NULL REFERENCES actions (id),
    seq         INTEGER NOT NULL,                    -- 0-based position in the kind's step list
    name        TEXT    NOT NULL,                    -- the step's name within the kind
    step        TEXT    NOT NULL,                    -- the bundle step definition it runs
    status      TEXT    NOT NULL,                    -- pending | running | succeeded | failed | skipped | cancelled
    attempt     INTEGER NOT NULL DEFAULT 0,
    started_at  TEXT,
    finished_at TEXT,
    output      TEXT,                                -- JSON
    error       TEXT,
    PRIMARY KEY (action_id, seq)
);

-- One row per failed attempt of a step (the last attempt is also in action_steps).
CREATE TABLE action_step_attempts (
    action_id   INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  TEXT,
    finished_at TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    PRIMARY KEY (action_id, seq, attempt)
);
