-- Target records: what an operator keeps about a target (its BMC, the
-- secret that holds its BMC's credentials, its hypervisor), read by step
-- templates as `{{target.KEY}}` and by params that default from them.
-- Names and addresses only: a record names a secret, it never holds one.
-- Read from here when an action is submitted and when a step starts, so
-- every server sees a change at once. Expand only.
CREATE TABLE target_records (
    target     VARCHAR(255) NOT NULL PRIMARY KEY,
    attributes MEDIUMTEXT   NOT NULL,       -- JSON object, string -> string
    updated_at DATETIME(6)  NOT NULL,
    updated_by VARCHAR(255) NOT NULL        -- the token that last changed it
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
