-- Several servers on one database (engine::schedule). Expand only: a server
-- of the previous version ignores what it does not know.

-- Each `troupe serve`: its lease is renewed by the database's clock, and a
-- server whose lease ran out is declared `lost` by another in one
-- conditional write, which hands its actions on.
CREATE TABLE servers (
    id               VARCHAR(64)   NOT NULL PRIMARY KEY,
    incarnation      BIGINT        NOT NULL,            -- bumped at every start of this id
    state            VARCHAR(16)   NOT NULL,            -- live, stopped, lost
    address          VARCHAR(255)  NULL,                -- its API address, as it advertises it
    host             VARCHAR(255)  NOT NULL,
    data_dir         VARCHAR(1024) NOT NULL,
    version          VARCHAR(64)   NOT NULL,
    running          INT           NOT NULL DEFAULT 0,  -- actions it runs, at its last renewal
    nodes_connected  INT           NOT NULL DEFAULT 0,
    started_at       DATETIME(6)   NOT NULL,
    heartbeat_at     DATETIME(6)   NOT NULL,
    lease_expires_at DATETIME(6)   NOT NULL,
    stopped_at       DATETIME(6)   NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- `epoch` fences a running action's writes: bumped by every claim and
-- every hand-over, and checked (with `owner`) by every write its runner
-- makes. `progress` is what that check changes, so the check holds the row.
ALTER TABLE actions
    ADD COLUMN epoch    BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN progress BIGINT NOT NULL DEFAULT 0,
    ADD KEY actions_by_owner (owner, status);
