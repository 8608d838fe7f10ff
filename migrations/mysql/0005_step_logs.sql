-- What a step logged (`sdk::Context::log`), one row per attempt that logged
-- anything; at most 64 KiB of lines each (a cut is marked in the text;
-- MEDIUMTEXT leaves room for masking to lengthen it).
CREATE TABLE step_logs (
    action_id BIGINT      NOT NULL,
    seq       INT         NOT NULL,
    attempt   INT         NOT NULL,
    log       MEDIUMTEXT  NOT NULL,
    logged_at DATETIME(6) NOT NULL,  -- when the attempt ended
    PRIMARY KEY (action_id, seq, attempt)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
