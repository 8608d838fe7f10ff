-- A cancel is recorded before it is answered, so every path honours it:
-- a crash, a shutdown, a resume.
ALTER TABLE actions ADD COLUMN cancel_requested_at TEXT;  -- when a cancel was first asked for; NULL: never
