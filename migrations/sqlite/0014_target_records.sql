-- Target records: what an operator keeps about a target (its BMC, the
-- secret that holds its BMC's credentials, its hypervisor), read by step
-- templates as `{{target.KEY}}` and by params that default from them.
-- Names and addresses only: a record names a secret, it never holds one.
-- Expand only.
CREATE TABLE target_records (
    target     TEXT NOT NULL PRIMARY KEY,
    attributes TEXT NOT NULL,               -- JSON object, string -> string
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL                -- the token that last changed it
);
