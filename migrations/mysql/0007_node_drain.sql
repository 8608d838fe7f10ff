-- A drained node stays drained across server restarts and reconnects.
ALTER TABLE nodes ADD COLUMN draining_since DATETIME(6) NULL;  -- set: it gets no new steps (`troupe nodes drain`); NULL: it does
