-- Per-target order across servers (engine::schedule). A target's actions
-- take increasing `seq`s from its `targets` row, in the transaction that
-- inserts them, so a visible seq means every lower one committed before;
-- and every start of a target's action (an insert that starts it, a claim
-- of a queued one) writes that row, so two starts of one target are
-- serialized by its row lock (on Galera, by certification). Ids cannot give
-- this order: Galera interleaves them per node, and an id is taken at
-- insert but seen at commit.
CREATE TABLE targets (
    target   VARCHAR(255) NOT NULL PRIMARY KEY,
    last_seq BIGINT       NOT NULL,            -- the seq of its newest action
    starts   BIGINT       NOT NULL DEFAULT 0   -- bumped by every claim of a queued action
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- `seq` orders a target's unfinished actions (finished ones from before
-- this migration have none). A queued action belongs to no server: it is
-- claimed, by whichever server has room, when it is its target's head.
ALTER TABLE actions
    ADD COLUMN seq BIGINT NULL,
    ADD KEY actions_ready (status, target, seq);
UPDATE actions SET seq = id WHERE status IN ('queued', 'running');
UPDATE actions SET owner = NULL WHERE status = 'queued';
INSERT INTO targets (target, last_seq)
    SELECT target, MAX(id) FROM actions WHERE status IN ('queued', 'running') GROUP BY target;
