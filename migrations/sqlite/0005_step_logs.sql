-- What a step logged (`sdk::Context::log`), one row per attempt that logged
-- anything; at most 64 KiB of lines each (a cut is marked in the text).
CREATE TABLE step_logs (
    action_id INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    log       TEXT    NOT NULL,
    logged_at TEXT    NOT NULL,  -- when the attempt ended
    PRIMARY KEY (action_id, seq, attempt)
);
