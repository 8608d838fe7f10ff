-- Results a node reported to a server that had no runner waiting for them
-- (the call's server stopped, or another took the action over): kept, sealed
-- under the secrets key, for the server that follows the call. Expand only.
CREATE TABLE node_results (
    node       VARCHAR(64) NOT NULL,
    action_id  BIGINT      NOT NULL,
    seq        INT         NOT NULL,
    attempt    INT         NOT NULL,
    status     INT         NOT NULL,          -- troupe_sdk::ffi::STATUS_*
    nonce      VARBINARY(24) NOT NULL,
    sealed     LONGBLOB    NOT NULL,          -- {"body", "log"}, XChaCha20-Poly1305
    stored_at  DATETIME(6) NOT NULL,
    stored_by  VARCHAR(64) NOT NULL,          -- the server that stored it
    PRIMARY KEY (node, action_id, seq, attempt),
    KEY node_results_stored (stored_at)
);
