-- Concurrency limits (`[limits]` in a bundle's manifest, `serve --limit`):
-- one row per slot held, slots numbered below the limit's max, so the
-- primary key is the claim. A hold is stale, and any claimer deletes it,
-- once its action no longer runs at that epoch or its step has moved past
-- that attempt. Expand only.
CREATE TABLE limit_holds (
    name      TEXT    NOT NULL,
    lkey      TEXT    NOT NULL,
    slot      INTEGER NOT NULL,
    action_id INTEGER NOT NULL,
    epoch     INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    owner     TEXT    NOT NULL,
    since     TEXT    NOT NULL,
    PRIMARY KEY (name, lkey, slot)
);
CREATE INDEX limit_holds_by_action ON limit_holds (action_id);
