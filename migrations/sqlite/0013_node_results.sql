-- Results a node reported to a server that had no runner waiting for them
-- (a server that restarted follows the call later): kept, sealed under the
-- secrets key, for the runner that follows the call. Expand only.
CREATE TABLE node_results (
    node       TEXT    NOT NULL,
    action_id  INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    status     INTEGER NOT NULL,
    nonce      BLOB    NOT NULL,
    sealed     BLOB    NOT NULL,
    stored_at  TEXT    NOT NULL,
    stored_by  TEXT    NOT NULL,
    PRIMARY KEY (node, action_id, seq, attempt)
);
CREATE INDEX node_results_stored ON node_results (stored_at);
