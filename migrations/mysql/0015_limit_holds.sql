-- Concurrency limits (`[limits]` in a bundle's manifest, `serve --limit`):
-- one row per slot held, slots numbered below the limit's max, so the
-- primary key is the claim: an insert that finds its slot taken inserts
-- nothing. A hold is fenced like every write of a running action: it is
-- stale, and any claimer deletes it, once its action no longer runs at
-- that epoch or its step has moved past that attempt. Expand only.
CREATE TABLE limit_holds (
    name      VARCHAR(64)  NOT NULL,       -- the limit (`bmc`)
    lkey      VARCHAR(255) NOT NULL,       -- the key held (the BMC's address); longer ones as sha256:HEX
    slot      INT          NOT NULL,       -- 0 .. max - 1
    action_id BIGINT       NOT NULL,
    epoch     BIGINT       NOT NULL,       -- the action's epoch when claimed
    seq       INT          NOT NULL,       -- the step ...
    attempt   INT          NOT NULL,       -- ... and the attempt holding it
    owner     VARCHAR(64)  NOT NULL,       -- the server that claimed it
    since     DATETIME(6)  NOT NULL,
    PRIMARY KEY (name, lkey, slot),
    KEY limit_holds_by_action (action_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
