-- A drained node stays drained across server restarts and reconnects.
ALTER TABLE nodes ADD COLUMN draining_since TEXT;  -- set: it gets no new steps (`troupe nodes drain`); NULL: it does
