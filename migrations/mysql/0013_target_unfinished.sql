-- A target's unfinished actions counted in its `targets` row, so that an
-- insert's busy check reads the row it has just locked and the look for a
-- successor after an end reads `targets` rather than `actions`.
--
-- The database keeps the count: a trigger on `actions` moves it with every
-- insert and every change of status between unfinished (queued, running)
-- and finished, whichever statement makes it (a finish, a cancel, a
-- failure, a takeover's end, a server of the previous version during a
-- rolling upgrade), in the same transaction. An end cannot be counted twice
-- or missed: the trigger sees the row's old and new status. Expand only: a
-- server of the previous version ignores the column, and its writes keep
-- it true all the same.
--
-- Creating a trigger needs the TRIGGER privilege (part of `GRANT ALL ON
-- troupe.*`); where the database writes a binary log, also SUPER, or
-- `log_bin_trust_function_creators = 1`, for the connection that migrates.
ALTER TABLE targets ADD COLUMN unfinished BIGINT NOT NULL DEFAULT 0;

CREATE TRIGGER actions_unfinished_insert AFTER INSERT ON actions FOR EACH ROW
    UPDATE targets SET unfinished = unfinished + 1
     WHERE target = NEW.target AND NEW.status IN ('queued', 'running');

CREATE TRIGGER actions_unfinished_update AFTER UPDATE ON actions FOR EACH ROW
    IF (OLD.status IN ('queued', 'running')) <> (NEW.status IN ('queued', 'running')) THEN
        UPDATE targets SET unfinished = unfinished + IF(NEW.status IN ('queued', 'running'), 1, -1)
         WHERE target = NEW.target;
    END IF;

-- The count as it is now, taken after the triggers exist, so an action
-- inserted or ended meanwhile is counted once either way (the backfill
-- waits for the rows those writes lock). Every target with an unfinished
-- action has a row since 0010.
UPDATE targets t SET unfinished =
    (SELECT COUNT(*) FROM actions a WHERE a.target = t.target AND a.status IN ('queued', 'running'));
